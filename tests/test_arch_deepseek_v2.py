"""DeepSeek-V2 / V2-Lite, data only: ``mappings/deepseek_v2.yaml`` (DeepSeek-V3's tensors and MLA, a softmax router).

transformers' DeepseekV2 router takes the softmax over every expert, then the top k, and does not renormalise the
chosen probabilities: megatron-core's ``moe_router_pre_softmax``. Left off (the signature bug) megatron softmaxes
only the top-k logits, i.e. renormalises, and the logits differ. Group-limited routing converts only where
megatron-core ranks groups as DeepSeek-V2 does (one expert per selected group); DeepSeek-V2's own config is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoConfig, AutoModelForCausalLM

from ckptbridge.align.cli import align
from ckptbridge.align.mcore_side import checkpoint_args
from ckptbridge.errors import UnsupportedArchitectureError
from ckptbridge.mcore import model as mm
from ckptbridge.presets import build_tiny_hf, load_preset
from ckptbridge.spec import ModelSpec
from helpers import assert_bit_exact, hf_config, hf_tensors, to_hf, to_mcore
from mcore_runner import run_distributed

ATOL = 1e-4
TOKENS = torch.randint(0, 1001, (2, 16), generator=torch.Generator().manual_seed(6))
#: DeepSeek-V2 (not Lite), from memory of the hub's config.json: q-LoRA, 160 experts in 8 groups, top 6 of 3 groups
DEEPSEEK_V2 = {**load_preset("deepseek-v2-lite")["hf_config"], "hidden_size": 5120, "intermediate_size": 12288,
               "num_hidden_layers": 60, "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536,
               "moe_intermediate_size": 1536, "n_routed_experts": 160, "n_group": 8, "topk_group": 3,
               "topk_method": "group_limited_greedy", "routed_scaling_factor": 16.0}


@pytest.fixture(scope="module")
def lite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 layers (one dense, three MoE), 8 experts top 2, greedy, no q-LoRA, yarn with mscale 0.707."""
    return build_tiny_hf("deepseek-v2-lite", tmp_path_factory.mktemp("v2lite") / "hf", layers=4, seed=41)


@pytest.fixture(scope="module")
def grouped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 layers, q-LoRA, 8 experts in 4 groups, top 2 of 2 groups (one expert per group), routed_scaling_factor 16."""
    from ckptbridge.presets import shrink_config

    raw = shrink_config(DEEPSEEK_V2, layers=2)
    raw.update(n_group=4, topk_group=2, num_experts_per_tok=2)
    raw.pop("architectures")
    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(raw.pop("model_type"), **raw), dtype=torch.float32)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + (0.1 if p.dim() == 1 else 0.05) * torch.randn(p.shape, generator=gen))
    out = tmp_path_factory.mktemp("v2grouped") / "hf"
    model.save_pretrained(out)
    return out


def test_lite_values_reach_megatron() -> None:
    spec = ModelSpec.from_hf_config(load_preset("deepseek-v2-lite")["hf_config"])
    a = spec.args
    assert spec.mapping.family == "deepseek_v2"
    assert (a["moe_router_score_function"], a["moe_router_pre_softmax"], a["moe_router_enable_expert_bias"]) == (
        "softmax", True, False)
    assert a["moe_router_num_groups"] is None and a["moe_router_group_topk"] is None
    assert (a["num_moe_experts"], a["moe_router_topk"], a["moe_shared_expert_intermediate_size"]) == (64, 6, 2 * 1408)
    assert a["moe_router_topk_scaling_factor"] == 1.0 and list(a["moe_layer_freq"]) == [0] + [1] * 26
    assert a["q_lora_rank"] is None and a["mtp_num_layers"] is None
    assert (a["rope_type"], a["rotary_scaling_factor"], a["mscale"], a["mscale_all_dim"]) == ("yarn", 40, 0.707, 0.707)


@pytest.mark.parametrize("change, message", [
    ({}, "group_limited_greedy with top 6 of 3 groups: DeepSeek-V2 ranks a group by its best expert"),
    ({"topk_group": 6}, None),
    ({"topk_group": 6, "norm_topk_prob": True}, "norm_topk_prob=true: transformers' DeepseekV2 ignores it"),
    ({"topk_group": 6, "scoring_func": "sigmoid"}, "router scoring_func 'sigmoid' is not DeepSeek-V2's softmax"),
    ({"topk_method": "noaux_tc"}, "router topk_method 'noaux_tc' is not"),
])
def test_deepseek_v2_routers_megatron_cannot_compute_are_refused(change: dict, message: str | None) -> None:
    """DeepSeek-V2's own router (top 6 of 3 groups) is refused; with one expert per group it converts."""
    if message is None:
        args = ModelSpec.from_hf_config({**DEEPSEEK_V2, **change}).args
        assert (args["moe_router_num_groups"], args["moe_router_group_topk"]) == (8, 6)
        assert args["moe_router_topk_scaling_factor"] == 16.0 and args["q_lora_rank"] == 1536
        return
    with pytest.raises(UnsupportedArchitectureError, match=message.replace("(", r"\(")):
        ModelSpec.from_hf_config({**DEEPSEEK_V2, **change})


LAYOUTS = {"tp1": {}, "tp2": dict(tp=2), "pp2": dict(pp=2), "tp2pp2": dict(tp=2, pp=2), "ep2": dict(ep=2),
           "tp2ep2etp1": dict(tp=2, ep=2, etp=1), "pp2vpp2": dict(pp=2, vpp=2)}


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lite_round_trip_bit_exact(lite: Path, tmp_path: Path, layout: str, fmt: str) -> None:
    back = to_hf(to_mcore(lite, tmp_path / "mcore", fmt, **LAYOUTS[layout]), tmp_path / "hf")
    assert_bit_exact(hf_tensors(lite), hf_tensors(back))
    assert hf_config(back) == hf_config(lite)


def test_grouped_round_trip_bit_exact(grouped: Path, tmp_path: Path) -> None:
    back = to_hf(to_mcore(grouped, tmp_path / "mcore", "torch_dist", tp=2, ep=2), tmp_path / "hf")
    assert_bit_exact(hf_tensors(grouped), hf_tensors(back))
    assert hf_config(back) == hf_config(grouped)


def hf_logits(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(TOKENS).logits


def _logits_pre_and_post_softmax(rank: int, world: int, iter_dir: str, tp: int, pp: int, ep: int):
    """Megatron's logits as the checkpoint's args say (softmax, then top-k), then with the router renormalising."""
    args = checkpoint_args(iter_dir, tp, pp, ep, 1)
    mm.init_parallel(tp, pp, seed=100 + rank, ep=ep, etp=1)
    models = mm.build_gpt_model(args, dtype=torch.float32)
    result = mm.load_torch_dist(models, iter_dir)
    pre = mm.forward_logits(models, TOKENS, vocab_size=args.vocab_size)
    routers = [m for model in models for n, m in model.named_modules() if n.endswith("mlp.router")]
    assert routers and all(r.config.moe_router_pre_softmax for r in routers)
    for r in routers:  # the router reads the flag at every forward
        r.config.moe_router_pre_softmax = False
    post = mm.forward_logits(models, TOKENS, vocab_size=args.vocab_size)
    return pre, post, sorted(result["unexpected"]) + sorted(result["missing"])


@pytest.mark.parametrize("name, written, loaded", [
    ("lite", dict(tp=2, ep=2, etp=1), (1, 2, 1)),
    ("grouped", dict(pp=2), (2, 1, 2)),
])
def test_megatron_loads_at_another_layout_with_hf_logits(lite: Path, grouped: Path, tmp_path: Path, name: str,
                                                         written: dict, loaded: tuple) -> None:
    """Signature bug: the router renormalising the chosen probabilities (megatron without pre_softmax)."""
    src = {"lite": lite, "grouped": grouped}[name]
    mcore = to_mcore(src, tmp_path / "mcore", "torch_dist", **written)
    expected = hf_logits(src)
    got = [r for r in run_distributed(_logits_pre_and_post_softmax, 2, str(mcore / "release"), *loaded, timeout=240)
           if r[0] is not None]
    assert got
    for pre, post, problems in got:
        assert problems == []
        assert (pre - expected).abs().max() <= ATOL
        assert (post - expected).abs().max() > 100 * ATOL


def test_lite_preset_passes_the_default_gate_past_the_yarn_length(tmp_path: Path) -> None:
    res = CliRunner().invoke(align, ["--model", "deepseek-v2-lite", "--random-init", "--layers", "2", "--shrink",
                                     "--out", str(tmp_path), "--run", "lite"])
    assert res.exit_code == 0, res.output
    assert "gate: passed" in res.output
    summary = json.loads((tmp_path / "lite" / "summary.json").read_text())
    assert summary["meta"]["probe_positions"] == [8192, 16384, 32768]
    routing = [c for c in summary["gate"]["checks"] if c["name"].startswith("routing.")]
    assert routing and all(c["value"] == 1.0 for c in routing)
