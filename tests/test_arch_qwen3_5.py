"""Qwen3.5 text models (mappings/qwen3_5.yaml dense, qwen3_5_moe.yaml): Qwen3-Next's hybrid with the delta-net
projections stored apart (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a). Tiny models of transformers' own
config classes (no text-only Qwen3.5 is published: the presets are the class defaults) round-trip bit-exactly at
TP1, TP2, PP2, TP2xPP2 (and EP2 for the MoE) in both formats; megatron-core's GatedDeltaNet at TP2, given the
in_proj/conv1d shards ckptbridge writes, computes what transformers' Qwen3_5GatedDeltaNet computes; the whole
converted model loads into megatron-core's hybrid GPTModel (torch_dist at another layout, legacy at TP2) with fp32
logits equal to transformers' at 160 positions. The
vision-language Qwen3_5*ForConditionalGeneration are refused (mappings/qwen3_5_vl.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest

from arch_checks import LAYOUTS, assert_align_gate_passes, assert_legacy_matches_hf, assert_megatron_matches_hf, round_trip
from ckptbridge.presets import build_tiny_hf, convertible_config, load_preset
from mcore_runner import run_distributed
from refusals import assert_refused
from test_arch_qwen3_next import _gdn_errors, convert_cli, tokens_for

PRESETS = ["qwen3.5-text", "qwen3.5-moe-text"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qwen3_5")
    return {name: build_tiny_hf(name, root / name, layers=2) for name in PRESETS}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_round_trip_bit_exact(tiny: dict[str, Path], tmp_path: Path, preset: str, fmt: str, tp: int, pp: int) -> None:
    round_trip(tiny[preset], tmp_path, fmt, tp, pp)


def test_moe_round_trip_expert_parallel(tiny: dict[str, Path], tmp_path: Path) -> None:
    round_trip(tiny["qwen3.5-moe-text"], tmp_path, "torch_dist", 2, 1, ep=2)


def test_gated_delta_net_tp2_shards_compute_what_hf_computes(tiny: dict[str, Path], tmp_path: Path) -> None:
    ckpt = tmp_path / "mcore"
    convert_cli(tiny["qwen3.5-text"], ckpt, "--tp", "2", "--format", "torch")
    for errors in run_distributed(_gdn_errors, 2, str(tiny["qwen3.5-text"]), {"shipped": str(ckpt)}, timeout=300):
        assert errors["shipped"] <= 1e-5, errors


@pytest.mark.parametrize("preset,written", [("qwen3.5-text", dict(tp=2, pp=2)), ("qwen3.5-moe-text", dict(pp=2, ep=2))])
def test_megatron_loads_converted_checkpoint_at_another_layout(tiny: dict[str, Path], tmp_path: Path, preset: str,
                                                               written: dict[str, int]) -> None:
    assert_megatron_matches_hf(tiny[preset], tmp_path, tokens_for(tiny[preset]), **written)


@pytest.mark.parametrize("preset,spec", [("qwen3.5-text", "local"), ("qwen3.5-moe-text", "te")])
def test_legacy_tp2_loads_into_megatron(tiny: dict[str, Path], tmp_path: Path, preset: str, spec: str) -> None:
    assert_legacy_matches_hf(tiny[preset], tmp_path, tokens_for(tiny[preset]), spec)


@pytest.mark.parametrize("preset", PRESETS)
def test_align_gate_passes(tmp_path: Path, preset: str) -> None:
    assert_align_gate_passes(preset, tmp_path, probes=2)  # the class defaults' 32768 positions: probes at 8k, 16k


@pytest.mark.parametrize("arch", ["Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"])
def test_vision_language_models_are_refused(arch: str) -> None:
    raw = {**convertible_config(load_preset("qwen3.5-text")), "architectures": [arch]}
    assert_refused(raw, r"refused \(qwen3_5_vl\.yaml\): Qwen3\.5 vision-language models cannot be converted yet: "
                        r".*vision tower")
