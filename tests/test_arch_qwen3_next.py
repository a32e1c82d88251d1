"""Qwen3-Next / Qwen3.5 and Qwen2.5-VL are refused (mappings/qwen3_next.yaml, qwen2_5_vl.yaml), naming what is
missing: megatron-core 0.16.1's gated delta-net needs flash-linear-attention and Transformer Engine norms on CPU and
ckptbridge has no rule yet for its per-key-head projection layout and per-part TP split; Qwen2.5-VL's vision tower
has no place in GPTModel and is not carried through. The real configs are refused by the spec and by ``convert``
on a tiny model saved by transformers (nothing written); ``list-architectures`` says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from refusals import assert_convert_refuses, assert_refused, list_architectures, refused_config

REASONS = {
    "qwen3-next-80b-a3b": r"qwen3_next: Qwen3-Next / Qwen3\.5 hybrid gated delta-net models are not supported yet: "
                          r".*flash-linear-attention.*in_proj_qkvz/in_proj_ba layout and its per-part TP split",
    "qwen2.5-vl-7b": r"qwen2_5_vl: Qwen2\.5-VL cannot be converted: .*no vision tower.*mrope \[16, 24, 24\]",
}


@pytest.mark.parametrize("name", sorted(REASONS))
def test_real_config_is_refused_naming_the_reason(name: str) -> None:
    assert_refused(refused_config(name), REASONS[name])


@pytest.mark.parametrize("arch", ["Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM"])
def test_qwen3_5_is_refused_too(arch: str) -> None:
    raw = {**refused_config("qwen3-next-80b-a3b"), "architectures": [arch]}
    assert_refused(raw, "gated delta-net models are not supported yet")


def test_convert_refuses_a_real_tiny_qwen3_next(tmp_path: Path) -> None:
    assert_convert_refuses("qwen3-next-80b-a3b", tmp_path, "gated delta-net models are not supported yet")


def test_list_architectures_says_refused() -> None:
    lines = {line.split()[0]: line for line in list_architectures().splitlines()}
    assert "REFUSED" in lines["qwen3_next"] and "flash-linear-attention" in lines["qwen3_next"]
    assert "REFUSED" in lines["qwen2_5_vl"] and "vision tower" in lines["qwen2_5_vl"]
