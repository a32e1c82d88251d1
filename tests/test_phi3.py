"""Phi-3, added as data only (mappings/phi3.yaml): its fused ``qkv_proj`` is split by sizes, then
interleaved per query group, and its fused ``gate_up_proj`` already is MCore's ``linear_fc1``.
Converted at TP2 x PP2 in both MCore formats, it round-trips bit-exactly, and megatron-core's own
GPTModel loads it (at other layouts than written) with HF's fp32 logits."""

from __future__ import annotations

import pytest

from ckptbridge.errors import UnsupportedArchitectureError
from ckptbridge.presets import build_tiny_hf, load_preset
from ckptbridge.spec import ModelSpec

from helpers import assert_bit_exact, hf_config, hf_tensors, to_hf, to_mcore
from mcore_runner import run_distributed
from test_mcore_load import ATOL, _load_legacy, _load_torch_dist, hf_logits


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    """4 layers, 8 heads in 4 query groups (GQA, as Phi-3-medium), sliding_window null."""
    return build_tiny_hf("phi3-mini", tmp_path_factory.mktemp("phi3") / "hf", layers=4, seed=5)


def test_fused_names_are_the_checkpoints(phi3):
    names = hf_tensors(phi3)
    assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.0.mlp.gate_up_proj.weight" in names


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_tp2pp2_round_trip_bit_exact(phi3, tmp_path, fmt):
    mcore = to_mcore(phi3, tmp_path / "mcore", fmt, tp=2, pp=2)
    back = to_hf(mcore, tmp_path / "hf")
    assert_bit_exact(hf_tensors(phi3), hf_tensors(back))
    assert hf_config(back) == hf_config(phi3)


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_logits_match_hf(phi3, tmp_path, tp):
    mcore = to_mcore(phi3, tmp_path / "mcore", "torch_dist", tp=2, pp=2)
    expected = hf_logits(phi3)
    results = run_distributed(_load_torch_dist, tp, str(mcore / "release"), tp, 1, None, timeout=180)
    got = [r for r in results if r is not None]
    assert got
    for logits in got:
        assert (logits - expected).abs().max() <= ATOL


def test_legacy_tp2pp2_logits_match_hf(phi3, tmp_path):
    mcore = to_mcore(phi3, tmp_path / "mcore", "torch", tp=2, pp=2)
    expected = hf_logits(phi3)
    results = run_distributed(_load_legacy, 4, str(mcore / "release"), False, timeout=180)
    got = [r for r in results if r is not None]
    assert got
    for logits in got:
        assert (logits - expected).abs().max() <= ATOL


def test_real_config_with_short_sliding_window_refused():
    """Phi-3-mini-4k's own config has sliding_window 2047 < 4096 positions: megatron-core would
    attend to the whole context, so the conversion is refused, naming the field."""
    with pytest.raises(UnsupportedArchitectureError, match="sliding_window=2047 is shorter than the context"):
        ModelSpec.from_hf_config(load_preset("phi3-mini")["hf_config"])
