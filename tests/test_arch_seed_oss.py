"""Seed-OSS is data only (mappings/seed_oss.yaml): Llama's layer with q/k/v biases and an explicit head_dim.

A tiny Seed-OSS-36B-shaped model (4 layers, head_dim 16 != hidden/heads) round-trips bit-exactly at TP1, TP2, PP2,
TP2xPP2 and TP2xPP2xVPP2 in both MCore formats with its config; the torch_dist files written at TP2xPP2 load into
megatron-core's GPTModel at TP2 and TP1 with fp32 logits within 1e-4 of HF's; ``align`` on the preset passes its
gate including the long-position probe (8k..256k). Signature bug: the q/k/v biases concatenated instead of
interleaved per query group round-trip bit-exactly and fail the gate.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckptbridge.errors import UnsupportedArchitectureError
from ckptbridge.presets import build_tiny_hf, load_preset
from ckptbridge.spec import ModelSpec
from arch_checks import (LAYOUTS, assert_align_gate_passes, assert_broken_mapping_fails_gate,
                         assert_megatron_matches_hf, round_trip)

PRESET = "seed-oss-36b"
TOKENS = torch.randint(0, 1001, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def seed_oss(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_hf(PRESET, tmp_path_factory.mktemp("seed_oss") / "hf", layers=4, seed=11)


def test_preset_translates_to_megatron_args() -> None:
    args = ModelSpec.from_hf_config(load_preset(PRESET)["hf_config"]).args
    assert args["kv_channels"] == 128 and args["num_attention_heads"] == 80 and args["num_query_groups"] == 8
    assert args["add_qkv_bias"] is True and args["rotary_base"] == 1e7 and args["untie_embeddings_and_output_weights"]


def test_o_proj_bias_is_refused() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="seed_oss: attention_out_bias"):
        ModelSpec.from_hf_config({**load_preset(PRESET)["hf_config"], "attention_out_bias": True})


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_round_trip_bit_exact(seed_oss: Path, tmp_path: Path, fmt: str, tp: int, pp: int) -> None:
    round_trip(seed_oss, tmp_path, fmt, tp, pp)


def test_vpp_round_trip_bit_exact(seed_oss: Path, tmp_path: Path) -> None:
    round_trip(seed_oss, tmp_path, "torch_dist", 2, 2, vpp=2)


def test_loads_in_megatron_with_hf_logits(seed_oss: Path, tmp_path: Path) -> None:
    assert_megatron_matches_hf(seed_oss, tmp_path, TOKENS)


def test_preset_passes_align_gate_with_long_positions(tmp_path: Path) -> None:
    assert_align_gate_passes(PRESET, tmp_path)


BIAS_CONCATENATED = """tensors:
  include: llama
  exclude:
    - decoder.layers.{L}.self_attention.linear_qkv.bias
  add:
    - mcore: decoder.layers.{L}.self_attention.linear_qkv.bias
      hf:
        - model.layers.{L}.self_attn.q_proj.bias
        - model.layers.{L}.self_attn.k_proj.bias
        - model.layers.{L}.self_attn.v_proj.bias
      shapes: [[num_attention_heads * kv_channels], [num_query_groups * kv_channels], [num_query_groups * kv_channels]]
      transform: concat
      shard: qkv
      when: add_qkv_bias
"""


def test_signature_bug_qkv_bias_not_interleaved_fails_the_gate(tmp_path: Path) -> None:
    """[q; k; v] biases written as one block instead of per query group: every tensor round-trips, megatron adds
    k's bias to q's heads."""
    assert_broken_mapping_fails_gate(PRESET, "seed_oss", tmp_path, "tensors:\n  include: llama\n", BIAS_CONCATENATED)
