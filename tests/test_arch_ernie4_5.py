"""ERNIE 4.5 dense is data only (mappings/ernie4_5.yaml): Llama's tensors with tied embeddings, an explicit head_dim
and rotary embedding on interleaved channel pairs, which is megatron-core's ``rotary_interleaved``.

A tiny ERNIE-4.5-0.3B-shaped model (4 layers) round-trips bit-exactly at TP1, TP2, PP2, TP2xPP2 and TP2xPP2xVPP2
in both MCore formats with its config; the torch_dist files written at TP2xPP2 load into megatron-core's GPTModel
at TP2 and TP1 with fp32 logits within 1e-4 of HF's; ``align`` on the preset passes its gate with the long-position
probe (8k..96k). Signature bug: the mapping without ``rotary_interleaved`` (Llama's half-split rope) converts and
round-trips bit-exactly, and fails the gate; the same checkpoint loaded with the setting off differs from HF.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckptbridge.errors import UnsupportedArchitectureError
from ckptbridge.presets import build_tiny_hf, load_preset
from ckptbridge.spec import ModelSpec
from arch_checks import (ATOL, hf_logits, megatron_logits, LAYOUTS, assert_align_gate_passes, assert_broken_mapping_fails_gate,
                         assert_megatron_matches_hf, round_trip)
from mcore_runner import run_distributed
from refusals import refused_config

PRESET = "ernie4.5-0.3b"
TOKENS = torch.randint(0, 1001, (2, 12), generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def ernie(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_hf(PRESET, tmp_path_factory.mktemp("ernie") / "hf", layers=4, seed=12)


def test_preset_translates_to_megatron_args() -> None:
    args = ModelSpec.from_hf_config(load_preset(PRESET)["hf_config"]).args
    assert args["rotary_interleaved"] is True and args["kv_channels"] == 128 and args["num_query_groups"] == 2
    assert args["untie_embeddings_and_output_weights"] is False and args["rotary_base"] == 500000.0


def test_biases_are_refused() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="ernie4_5: use_bias"):
        ModelSpec.from_hf_config({**load_preset(PRESET)["hf_config"], "use_bias": True})


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_round_trip_bit_exact(ernie: Path, tmp_path: Path, fmt: str, tp: int, pp: int) -> None:
    round_trip(ernie, tmp_path, fmt, tp, pp)


def test_vpp_round_trip_bit_exact(ernie: Path, tmp_path: Path) -> None:
    round_trip(ernie, tmp_path, "torch", 2, 2, vpp=2)


def test_loads_in_megatron_with_hf_logits(ernie: Path, tmp_path: Path) -> None:
    iter_dir = assert_megatron_matches_hf(ernie, tmp_path, TOKENS)
    # the interleaving matters: the same weights with megatron's default half-split rope compute something else
    (half,) = run_distributed(megatron_logits, 1, str(iter_dir), 1, TOKENS, {"rotary_interleaved": False}, timeout=180)
    assert (half - hf_logits(ernie, TOKENS)).abs().max() > 100 * ATOL


def test_preset_passes_align_gate_with_long_positions(tmp_path: Path) -> None:
    assert_align_gate_passes(PRESET, tmp_path)


def test_signature_bug_half_split_rope_fails_the_gate(tmp_path: Path) -> None:
    assert_broken_mapping_fails_gate(PRESET, "ernie4_5", tmp_path, 'rotary_interleaved: "True"',
                                     'rotary_interleaved: "False"')


def test_moe_is_refused_naming_the_router() -> None:
    """ERNIE 4.5 MoE (mappings/ernie4_5_moe.yaml): experts are chosen by softmax + e_score_correction_bias, which
    megatron-core's softmax router cannot do."""
    with pytest.raises(UnsupportedArchitectureError,
                       match=r"refused \(ernie4_5_moe\.yaml\): ERNIE 4\.5 MoE cannot be expressed .*e_score_correction_bias.*softmax router"):
        ModelSpec.from_hf_config(refused_config("ernie4.5-21b-a3b"))
