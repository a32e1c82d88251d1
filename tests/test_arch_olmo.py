"""OLMo 2 / 3 and OLMoE are refused (mappings/olmo2.yaml, olmoe.yaml): their q/k RMSNorm spans the whole projection
(megatron-core 0.16.1 normalises per head) and OLMo 2/3 normalise after the attention and MLP (megatron-core only
before). The real configs are refused naming that, by the spec and by ``convert`` on a tiny model saved by
transformers; ``list-architectures`` says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from refusals import assert_convert_refuses, assert_refused, list_architectures, refused_config

REASONS = {
    "olmo2-7b": r"refused \(olmo2\.yaml\): OLMo 2/3 cannot be expressed in megatron-core 0\.16\.1: .*post-norm.*"
                r"whole projection \(num_heads x head_dim for q\).*normalises each head",
    "olmoe-1b-7b": r"refused \(olmoe\.yaml\): OLMoE cannot be expressed in megatron-core 0\.16\.1: .*whole q and k "
                   r"projections \(num_heads x head_dim for q\).*normalises each head separately",
}


@pytest.mark.parametrize("name", sorted(REASONS))
def test_real_config_is_refused_naming_the_reason(name: str) -> None:
    assert_refused(refused_config(name), REASONS[name])


@pytest.mark.parametrize("name", sorted(REASONS))
def test_convert_refuses_a_real_tiny_model(name: str, tmp_path: Path) -> None:
    assert_convert_refuses(name, tmp_path, "cannot be expressed in megatron-core")


def test_olmo3_is_refused_too() -> None:
    raw = {**refused_config("olmo2-7b"), "architectures": ["Olmo3ForCausalLM"], "model_type": "olmo3"}
    assert_refused(raw, "OLMo 2/3 cannot be expressed")


def test_list_architectures_says_refused() -> None:
    lines = {line.split()[0]: line for line in list_architectures().splitlines()}
    assert "REFUSED" in lines["olmo2"] and "span the whole projection" in lines["olmo2"]
    assert "REFUSED" in lines["olmoe"] and "normalises each head separately" in lines["olmoe"]
