"""Gemma 2 and Gemma 3 are refused (mappings/gemma2.yaml, gemma3.yaml): megatron-core 0.16.1 has no post-attention /
post-feedforward norms, no sqrt(hidden_size) embedding multiplier, no logit soft-capping and one rotary base for
every layer. The real configs are refused naming those reasons, by the spec, by ``convert`` on a tiny model saved
by transformers (nothing written), and ``list-architectures`` says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from refusals import assert_convert_refuses, assert_refused, list_architectures, refused_config

REASONS = {
    "gemma2-9b": r"refused \(gemma2\.yaml\): Gemma 2 cannot be expressed in megatron-core 0\.16\.1: .*post-feedforward "
                 r"RMSNorms.*sqrt\(hidden_size\).*soft-capping of attention scores and final logits",
    "gemma3-1b": r"refused \(gemma3\.yaml\): Gemma 3 cannot be expressed in megatron-core 0\.16\.1: .*post-feedforward "
                 r"RMSNorms.*sqrt\(hidden_size\).*rope_local_base_freq on sliding layers",
}


@pytest.mark.parametrize("name", sorted(REASONS))
def test_real_config_is_refused_naming_the_reason(name: str) -> None:
    assert_refused(refused_config(name), REASONS[name])


@pytest.mark.parametrize("name", sorted(REASONS))
def test_convert_refuses_a_real_tiny_model(name: str, tmp_path: Path) -> None:
    assert_convert_refuses(name, tmp_path, "cannot be expressed in megatron-core")


def test_multimodal_gemma3_is_refused_too() -> None:
    raw = {**refused_config("gemma3-1b"), "architectures": ["Gemma3ForConditionalGeneration"]}
    assert_refused(raw, "Gemma 3 cannot be expressed")


def test_list_architectures_says_refused() -> None:
    lines = {line.split()[0]: line for line in list_architectures().splitlines()}
    assert "REFUSED" in lines["gemma2"] and "soft-capping" in lines["gemma2"]
    assert "REFUSED" in lines["gemma3"] and "rotary base per layer kind" in lines["gemma3"]
