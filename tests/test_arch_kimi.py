"""Kimi-K2 and Moonlight are DeepSeek-V3 (``DeepseekV3ForCausalLM``) with their own values: data only,
presets ``kimi-k2`` / ``moonlight-16b-a3b`` on ``mappings/deepseek_v3.yaml``.

Kimi-K2: 384 experts (top 8), one shared, one expert group, routed_scaling_factor 2.827, q-LoRA, YaRN
x32 over 4096 positions with beta_fast = beta_slow = 1. Moonlight: 64 experts (top 6), two shared, no
q-LoRA, plain RoPE. The tiny Kimi model carries a non-zero expert-score bias (transformers initialises
that buffer to zeros, which would hide a dropped bias): megatron-core's own GPTModel loads our
checkpoint at another layout with HF's fp32 logits, and the same weights with the bias zeroed route
differently (the signature bug of a DeepSeek-V3-family converter).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ckptbridge.align.cli import align
from ckptbridge.align.gate import evaluate, load_thresholds
from ckptbridge.align.runner import AlignOptions, run_alignment
from ckptbridge.align.mcore_side import checkpoint_args
from ckptbridge.mcore import model as mm
from ckptbridge.presets import build_tiny_hf, load_preset
from ckptbridge.spec import ModelSpec
from helpers import assert_bit_exact, hf_config, hf_tensors, to_hf, to_mcore
from mcore_runner import run_distributed

ATOL = 1e-4
TOKENS = torch.randint(0, 1001, (2, 16), generator=torch.Generator().manual_seed(4))


def with_expert_bias(folder: Path, scale: float, seed: int = 0) -> Path:
    """Set every MoE layer's expert-score bias to ``scale`` x N(0, 1) (0: the bias left at zero)."""
    f = folder / "model.safetensors"
    t = load_file(f)
    gen = torch.Generator().manual_seed(seed)
    for name in sorted(n for n in t if n.endswith("e_score_correction_bias")):
        t[name] = scale * torch.randn(t[name].shape, generator=gen, dtype=torch.float32)
    save_file(t, f, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def kimi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 layers (one dense, three MoE), 8 experts top 2, one group, q-LoRA, yarn; bias N(0, 0.5)."""
    return with_expert_bias(build_tiny_hf("kimi-k2", tmp_path_factory.mktemp("kimi") / "hf", layers=4, seed=31), 0.5)


@pytest.fixture(scope="module")
def moonlight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_expert_bias(build_tiny_hf("moonlight-16b-a3b", tmp_path_factory.mktemp("moon") / "hf", layers=2,
                                          seed=32), 0.5, seed=1)


def test_kimi_k2_values_reach_megatron() -> None:
    """The hub config as is (model_type kimi_k2): the family comes from ``architectures``."""
    raw = load_preset("kimi-k2")["hf_config"]
    assert raw["model_type"] == "kimi_k2"
    spec = ModelSpec.from_hf_config(raw)
    a = spec.args
    assert spec.mapping.family == "deepseek_v3"
    assert (a["num_moe_experts"], a["moe_router_topk"], a["moe_ffn_hidden_size"]) == (384, 8, 2048)
    assert a["moe_shared_expert_intermediate_size"] == 2048 and list(a["moe_layer_freq"]) == [0] + [1] * 60
    assert a["moe_router_topk_scaling_factor"] == 2.827
    assert (a["moe_router_num_groups"], a["moe_router_group_topk"]) == (1, 1)
    assert a["moe_router_score_function"] == "sigmoid" and a["moe_router_enable_expert_bias"] is True
    assert (a["q_lora_rank"], a["kv_lora_rank"], a["num_attention_heads"]) == (1536, 512, 64)
    assert (a["rope_type"], a["rotary_scaling_factor"], a["original_max_position_embeddings"]) == ("yarn", 32.0, 4096)
    assert (a["beta_fast"], a["beta_slow"], a["mscale"], a["mscale_all_dim"]) == (1.0, 1.0, 1.0, 1.0)
    assert a["rotary_base"] == 50000.0 and a["mtp_num_layers"] is None


def test_moonlight_values_reach_megatron() -> None:
    a = ModelSpec.from_hf_config(load_preset("moonlight-16b-a3b")["hf_config"]).args
    assert (a["num_moe_experts"], a["moe_router_topk"], a["moe_shared_expert_intermediate_size"]) == (64, 6, 2 * 1408)
    assert a["q_lora_rank"] is None and a["rope_type"] == "rope" and a["rotary_scaling_factor"] == 1.0
    assert a["moe_router_topk_scaling_factor"] == 2.446 and a["moe_router_num_groups"] == 1
    assert a["norm_epsilon"] == 1e-5 and list(a["moe_layer_freq"]) == [0] + [1] * 26


LAYOUTS = {"tp1": {}, "tp2": dict(tp=2), "pp2": dict(pp=2), "tp2pp2": dict(tp=2, pp=2), "ep2": dict(ep=2),
           "tp2ep2etp1": dict(tp=2, ep=2, etp=1), "pp2vpp2": dict(pp=2, vpp=2)}


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_kimi_round_trip_bit_exact(kimi: Path, tmp_path: Path, layout: str, fmt: str) -> None:
    back = to_hf(to_mcore(kimi, tmp_path / "mcore", fmt, **LAYOUTS[layout]), tmp_path / "hf")
    assert_bit_exact(hf_tensors(kimi), hf_tensors(back))
    assert hf_config(back) == hf_config(kimi)


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_moonlight_round_trip_bit_exact(moonlight: Path, tmp_path: Path, fmt: str) -> None:
    back = to_hf(to_mcore(moonlight, tmp_path / "mcore", fmt, tp=2, pp=2, ep=2), tmp_path / "hf")
    assert_bit_exact(hf_tensors(moonlight), hf_tensors(back))
    assert hf_config(back) == hf_config(moonlight)


def hf_logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(TOKENS).logits


def _logits_with_and_without_bias(rank: int, world: int, iter_dir: str, tp: int, pp: int, ep: int):
    """Megatron's logits from the loaded checkpoint, then with every router's expert bias zeroed."""
    args = checkpoint_args(iter_dir, tp, pp, ep, 1)
    mm.init_parallel(tp, pp, seed=100 + rank, ep=ep, etp=1)
    models = mm.build_gpt_model(args, dtype=torch.float32)
    result = mm.load_torch_dist(models, iter_dir)
    loaded = mm.forward_logits(models, TOKENS, vocab_size=args.vocab_size)
    biases = [b for m in models for n, b in m.named_buffers() if n.endswith("router.expert_bias")]
    with torch.no_grad():
        for b in biases:
            b.zero_()
    zeroed = mm.forward_logits(models, TOKENS, vocab_size=args.vocab_size)
    return loaded, zeroed, len(biases), sorted(result["unexpected"]) + sorted(result["missing"])


def test_kimi_expert_bias_reaches_megatron_and_decides_the_routing(kimi: Path, tmp_path: Path) -> None:
    """Signature bug: the router's ``e_score_correction_bias`` dropped or left at zero. Written at TP2 x EP2,
    loaded at PP2: megatron's logits equal HF's, and the same model with its biases zeroed does not."""
    mcore = to_mcore(kimi, tmp_path / "mcore", "torch_dist", tp=2, ep=2, etp=1)
    expected = hf_logits(kimi)
    results = [r for r in run_distributed(_logits_with_and_without_bias, 2, str(mcore / "release"), 1, 2, 1,
                                          timeout=240) if r[0] is not None]
    assert len(results) == 1
    loaded, zeroed, _, problems = results[0]
    assert problems == []
    assert (loaded - expected).abs().max() <= ATOL
    assert (zeroed - expected).abs().max() > 100 * ATOL


def test_kimi_yarn_beyond_the_original_length_and_routing_agree(kimi: Path, tmp_path: Path) -> None:
    """ckptbridge's alignment of the biased tiny Kimi-K2: logits at 8k/16k/32k (past yarn's 4096) and every
    router's choices match HF's in fp32."""
    r = run_alignment(AlignOptions(hf=kimi, dtype="fp32", seq_len=16, modes=("propagated",)))
    assert r.probe_positions == [8192, 16384, 32768]
    checks = evaluate(r.rows, load_thresholds("fp32"), list(r.meta["modes"]), r.num_layers, r.routing)
    assert all(c.passed for c in checks), [c.message for c in checks if not c.passed]
    routing = [c for c in checks if c.name.startswith("routing.")]
    assert len(routing) == 3 and all(c.value == 1.0 for c in routing)


def test_moonlight_preset_passes_the_default_gate(tmp_path: Path) -> None:
    res = CliRunner().invoke(align, ["--model", "moonlight-16b-a3b", "--random-init", "--layers", "2", "--shrink",
                                     "--out", str(tmp_path), "--run", "m"])
    assert res.exit_code == 0, res.output
    assert "gate: passed" in res.output
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert summary["meta"]["probe_positions"] == [2048, 4096, 8000]


@pytest.mark.parametrize("change, message", [
    ({"norm_topk_prob": False}, "norm_topk_prob=false: megatron-core's sigmoid router always renormalises"),
    ({"n_group": 8, "topk_group": 2}, "group-limited routing with top 8 of 2 groups"),
])
def test_deepseek_v3_routers_megatron_cannot_compute_are_refused(change: dict, message: str) -> None:
    """transformers' DeepseekV3 router renormalises only with norm_topk_prob and ranks groups by their best two
    experts; megatron-core always renormalises and ranks by the best topk / group_topk."""
    from ckptbridge.errors import UnsupportedArchitectureError

    with pytest.raises(UnsupportedArchitectureError, match=message):
        ModelSpec.from_hf_config({**load_preset("kimi-k2")["hf_config"], **change})
