"""Llama 4 text is data: ``mappings/llama4.yaml`` (NoPE layers, interleaved dense / top-1 MoE with a shared expert,
fused experts, interleaved-pair rotary). Chunked attention, attention temperature tuning and a q/k L2 norm
restricted to the rope layers have no megatron-core counterpart: refused, naming the feature.

A tiny Llama-4-Maverick-shaped model (4 layers: dense, MoE, dense, MoE; layer 3 NoPE) converts at TP2 x PP2 x EP2
in both MCore formats, round-trips bit-exactly, and loads into megatron-core's own GPTModel at other layouts with
fp32 logits equal to HF's. The signature bug, rope on every layer, is the NoPE test: the same checkpoint with
``no_rope_freq`` dropped computes something else.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ckptbridge.align.mcore_side import checkpoint_args
from ckptbridge.errors import CkptBridgeError
from ckptbridge.mcore import model as mm
from ckptbridge.presets import build_tiny_hf, convertible_config, load_preset
from ckptbridge.spec import ModelSpec
from helpers import assert_bit_exact, hf_config, hf_tensors, to_hf, to_mcore
from mcore_runner import run_distributed

ATOL = 1e-4
TOKENS = torch.randint(0, 1001, (2, 16), generator=torch.Generator().manual_seed(13))


@pytest.fixture(scope="module")
def llama4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_hf("llama4-maverick", tmp_path_factory.mktemp("llama4") / "hf", layers=4, seed=41)


def hf_logits(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(TOKENS).logits


def _logits(rank: int, world: int, iter_dir: str, tp: int, pp: int, ep: int, every_layer_rope: bool):
    args = checkpoint_args(iter_dir, tp, pp, ep, None)
    if every_layer_rope:
        args.no_rope_freq = None
    mm.init_parallel(tp, pp, seed=100 + rank, ep=ep)
    models = mm.build_gpt_model(args, dtype=torch.float32)
    mm.load_torch_dist(models, iter_dir)
    return mm.forward_logits(models, TOKENS, vocab_size=args.vocab_size)


def megatron_logits(iter_dir: Path, tp: int, pp: int, ep: int, every_layer_rope: bool = False) -> list[torch.Tensor]:
    world = math.lcm(tp, ep * tp) * pp
    return [r for r in run_distributed(_logits, world, str(iter_dir), tp, pp, ep, every_layer_rope, timeout=240)
            if r is not None]


def test_preset_translates_to_megatron_settings() -> None:
    args = ModelSpec.from_hf_config(convertible_config(load_preset("llama4-maverick"))).args
    assert list(args["no_rope_freq"]) == [0, 0, 0, 1] * 12 and list(args["moe_layer_freq"]) == [0, 1] * 24
    assert args["rotary_interleaved"] and args["moe_apply_probs_on_input"] and args["moe_router_topk"] == 1
    assert args["moe_router_score_function"] == "sigmoid" and args["moe_shared_expert_intermediate_size"] == 8192
    assert args["ffn_hidden_size"] == 16384 and args["moe_ffn_hidden_size"] == 8192 and not args["qk_l2_norm"]


@pytest.mark.parametrize("change, message", [
    ({}, "chunked attention"),  # the real config: 8192-token chunks
    ({"attention_chunk_size": None}, "temperature tuning"),
    ({"attention_chunk_size": None, "attn_temperature_tuning": False, "use_qk_norm": True}, "rope layers only"),
    ({"attention_chunk_size": None, "attn_temperature_tuning": False, "rope_scaling": {
        "rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
        "original_max_position_embeddings": 8192}}, "differs from megatron-core's fixed"),  # Scout's rope
])
def test_what_megatron_cannot_express_is_refused(change: dict, message: str) -> None:
    with pytest.raises(CkptBridgeError, match=message):
        ModelSpec.from_hf_config({**load_preset("llama4-maverick")["hf_config"], **change})


@pytest.mark.parametrize("layout", [dict(tp=2, pp=2, ep=2), dict(tp=2, ep=2, etp=1), dict(pp=2, vpp=2, ep=4)])
@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_tp2pp2ep2_round_trip_bit_exact(llama4: Path, tmp_path: Path, fmt: str, layout: dict) -> None:
    mcore = to_mcore(llama4, tmp_path / "mcore", fmt, **layout)
    back = to_hf(mcore, tmp_path / "hf")
    assert_bit_exact(hf_tensors(llama4), hf_tensors(back))
    assert hf_config(back) == hf_config(llama4)


def test_nope_layers_load_in_megatron_with_hf_logits(llama4: Path, tmp_path: Path) -> None:
    """The signature bug: rope on every layer. Layer 3 is NoPE; megatron with the converted args matches HF
    at two layouts, and the same weights with rope on every layer do not."""
    mcore = to_mcore(llama4, tmp_path / "mcore", "torch_dist", tp=2, pp=2, ep=2)
    expected = hf_logits(llama4)
    for tp, pp, ep in ((1, 1, 2), (2, 1, 1)):
        got = megatron_logits(mcore / "release", tp, pp, ep)
        assert got and all((g - expected).abs().max() <= ATOL for g in got), (tp, pp, ep)
    (rope_everywhere,) = megatron_logits(mcore / "release", 1, 1, 1, every_layer_rope=True)
    assert (rope_everywhere - expected).abs().max() > 100 * ATOL
