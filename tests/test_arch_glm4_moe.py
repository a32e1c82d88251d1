"""GLM-4.5 / 4.6 / 4.5-Air, data only: ``mappings/glm4_moe.yaml`` (Llama's attention with QKV biases and q/k norms,
DeepSeek-V3's MoE, dense-first and MTP tensors).

Signature bug: GLM rotates only the first half of each head's channels (``partial_rotary_factor`` 0.5, rotate-half
as megatron's ``rotary_percent``); left at 1.0 the conversion round-trips bit-exactly and computes something else.
The tiny model carries a non-zero expert-score bias, so a dropped bias would show too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ckptbridge.align.gate import evaluate, load_thresholds
from ckptbridge.align.mcore_side import checkpoint_args
from ckptbridge.align.runner import AlignOptions, run_alignment
from ckptbridge.errors import UnsupportedArchitectureError
from ckptbridge.mcore import model as mm
from ckptbridge.presets import build_tiny_hf, load_preset
from ckptbridge.spec import ModelSpec
from helpers import add_mtp_blocks, assert_bit_exact, hf_config, hf_tensors, to_hf, to_mcore
from mcore_runner import run_distributed
from test_arch_kimi import with_expert_bias

ATOL = 1e-4
TOKENS = torch.randint(0, 1001, (2, 16), generator=torch.Generator().manual_seed(8))


@pytest.fixture(scope="module")
def glm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GLM-4.5 shaped: 4 layers (one dense, three MoE), q/k norm, QKV bias, 8 experts top 2, expert bias N(0, 0.5)."""
    return with_expert_bias(build_tiny_hf("glm-4.5", tmp_path_factory.mktemp("glm") / "hf", layers=4, seed=51), 0.5)


def test_glm_4_5_values_reach_megatron() -> None:
    spec = ModelSpec.from_hf_config(load_preset("glm-4.5")["hf_config"])
    a = spec.args
    assert spec.mapping.family == "glm4_moe"
    assert a["rotary_percent"] == 0.5 and a["kv_channels"] == 128 and a["rotary_base"] == 1000000
    assert a["add_qkv_bias"] is True and a["add_bias_linear"] is False and a["qk_layernorm"] is True
    assert (a["num_attention_heads"], a["num_query_groups"]) == (96, 8)
    assert list(a["moe_layer_freq"]) == [0, 0, 0] + [1] * 89 and a["mtp_num_layers"] == 1
    assert (a["num_moe_experts"], a["moe_router_topk"], a["moe_shared_expert_intermediate_size"]) == (160, 8, 1536)
    assert a["moe_router_topk_scaling_factor"] == 2.5 and a["moe_router_enable_expert_bias"] is True
    air = ModelSpec.from_hf_config(load_preset("glm-4.5-air")["hf_config"]).args
    assert air["qk_layernorm"] is False and list(air["moe_layer_freq"]) == [0] + [1] * 45 and air["rotary_percent"] == 0.5


@pytest.mark.parametrize("rope", [{"partial_rotary_factor": 0.5},
                                  {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}},
                                  {}], ids=["hub-top-level", "transformers5-rope-parameters", "class-default"])
def test_partial_rotary_factor_read_where_either_writer_puts_it(rope: dict) -> None:
    raw = {k: v for k, v in load_preset("glm-4.5-air")["hf_config"].items() if k != "partial_rotary_factor"}
    assert ModelSpec.from_hf_config({**raw, **rope}).args["rotary_percent"] == 0.5


@pytest.mark.parametrize("change, message", [
    ({"norm_topk_prob": False}, "norm_topk_prob=false: megatron-core's sigmoid router always renormalises"),
    ({"n_group": 4, "topk_group": 2}, "group-limited routing with top 8 of 2 groups"),
])
def test_routers_megatron_cannot_compute_are_refused(change: dict, message: str) -> None:
    with pytest.raises(UnsupportedArchitectureError, match=message):
        ModelSpec.from_hf_config({**load_preset("glm-4.5")["hf_config"], **change})


LAYOUTS = {"tp1": {}, "tp2": dict(tp=2), "pp2": dict(pp=2), "tp2pp2": dict(tp=2, pp=2), "ep2": dict(ep=2),
           "tp2ep2etp1": dict(tp=2, ep=2, etp=1), "pp2vpp2": dict(pp=2, vpp=2)}


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_round_trip_bit_exact(glm: Path, tmp_path: Path, layout: str, fmt: str) -> None:
    back = to_hf(to_mcore(glm, tmp_path / "mcore", fmt, **LAYOUTS[layout]), tmp_path / "hf")
    assert_bit_exact(hf_tensors(glm), hf_tensors(back))
    assert hf_config(back) == hf_config(glm)


def test_mtp_block_round_trip_bit_exact(glm: Path, tmp_path: Path) -> None:
    """The hub checkpoint's MTP layer (model.layers.{num_hidden_layers}.*, DeepSeek-V3's names) converts too."""
    src = add_mtp_blocks(glm, tmp_path / "mtp", depth=1)
    back = to_hf(to_mcore(src, tmp_path / "mcore", "torch_dist", tp=2, pp=2), tmp_path / "hf")
    assert_bit_exact(hf_tensors(src), hf_tensors(back))


def hf_logits(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(TOKENS).logits


def _logits_partial_and_full_rotary(rank: int, world: int, iter_dir: str, tp: int, pp: int, ep: int):
    """Megatron's logits as the checkpoint's args say, then with every channel rotated (rotary_percent 1.0)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    args = checkpoint_args(iter_dir, tp, pp, ep, 1)
    mm.init_parallel(tp, pp, seed=100 + rank, ep=ep, etp=1)
    models = mm.build_gpt_model(args, dtype=torch.float32)
    result = mm.load_torch_dist(models, iter_dir)
    with mm.main_logits_only(models):
        partial = mm.forward_logits(models, TOKENS, vocab_size=args.vocab_size)
    mtp = sorted(k for k in models[-1].state_dict() if k.startswith("mtp.") and not k.endswith("_extra_state"))
    for m in models:
        assert m.rotary_pos_emb.inv_freq.numel() == args.kv_channels // 4  # half the channels, in pairs
        m.rotary_pos_emb = RotaryEmbedding(kv_channels=args.kv_channels, rotary_percent=1.0,
                                           rotary_base=args.rotary_base, use_cpu_initialization=True)
    with mm.main_logits_only(models):
        full = mm.forward_logits(models, TOKENS, vocab_size=args.vocab_size)
    return partial, full, mtp, sorted(result["unexpected"]) + sorted(result["missing"])


def test_megatron_loads_at_another_layout_with_hf_logits_and_partial_rotary_matters(glm: Path, tmp_path: Path) -> None:
    """With an MTP block, written at TP2 x EP2, loaded strictly at PP2 (the MTP block on the last stage): HF's
    logits; the same weights rotating every channel differ."""
    src = add_mtp_blocks(glm, tmp_path / "mtp", depth=1)
    mcore = to_mcore(src, tmp_path / "mcore", "torch_dist", tp=2, ep=2, etp=1)
    expected = hf_logits(glm)
    got = [r for r in run_distributed(_logits_partial_and_full_rotary, 2, str(mcore / "release"), 1, 2, 1,
                                      timeout=240) if r[0] is not None]
    assert len(got) == 1
    partial, full, mtp, problems = got[0]
    assert problems == []  # every checkpoint tensor and every model tensor, MTP block included
    assert "mtp.layers.0.eh_proj.weight" in mtp and "mtp.layers.0.transformer_layer.self_attention.linear_qkv.bias" in mtp
    assert (partial - expected).abs().max() <= ATOL
    assert (full - expected).abs().max() > 100 * ATOL


def test_long_positions_and_routing_agree(glm: Path) -> None:
    """ckptbridge's alignment of the tiny GLM-4.5 (biased routers): logits at 8k/16k/32k and every router's choices."""
    r = run_alignment(AlignOptions(hf=glm, dtype="fp32", seq_len=16, modes=("propagated",)))
    assert r.probe_positions == [8192, 16384, 32768]
    checks = evaluate(r.rows, load_thresholds("fp32"), list(r.meta["modes"]), r.num_layers, r.routing)
    assert all(c.passed for c in checks), [c.message for c in checks if not c.passed]
    routing = [c for c in checks if c.name.startswith("routing.")]
    assert len(routing) == 3 and all(c.value == 1.0 for c in routing)
