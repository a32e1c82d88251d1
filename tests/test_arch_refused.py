"""Architectures megatron-core 0.16.1 cannot compute are refused with the reason, never converted: the real
public configs (tests/data/refused/) and tiny models saved by the real transformers classes; ``list-architectures``
says REFUSED and why. (Qwen3-Next, Qwen3-VL, MiMo, ERNIE-4.5 MoE and MiniMax-M2 have their own test files: they
also prove what megatron-core lacks on the real modules.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from refusals import assert_convert_refuses, assert_refused, list_architectures, refused_config

#: config name -> (the refusal's pattern, a fragment list-architectures shows for its family, the family)
REFUSALS = {
    "gemma2-9b": (r"refused \(gemma2\.yaml\): Gemma 2 cannot be expressed in megatron-core 0\.16\.1: .*post-feedforward "
                  r"RMSNorms.*sqrt\(hidden_size\).*soft-capping of attention scores and final logits",
                  "soft-capping", "gemma2"),
    "gemma3-1b": (r"refused \(gemma3\.yaml\): Gemma 3 cannot be expressed in megatron-core 0\.16\.1: .*post-feedforward "
                  r"RMSNorms.*sqrt\(hidden_size\).*rope_local_base_freq on sliding layers",
                  "rotary base per layer kind", "gemma3"),
    "olmo2-7b": (r"refused \(olmo2\.yaml\): OLMo 2/3 cannot be expressed in megatron-core 0\.16\.1: .*post-norm.*"
                 r"whole projection \(num_heads x head_dim for q\).*normalises each head",
                 "span the whole projection", "olmo2"),
    "olmoe-1b-7b": (r"refused \(olmoe\.yaml\): OLMoE cannot be expressed in megatron-core 0\.16\.1: .*whole q and k "
                    r"projections \(num_heads x head_dim for q\).*normalises each head separately",
                    "normalises each head separately", "olmoe"),
}
#: other architectures the same files refuse (config name, architecture, model_type or None)
SIBLINGS = [("gemma3-1b", "Gemma3ForConditionalGeneration", None), ("olmo2-7b", "Olmo3ForCausalLM", "olmo3")]


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_real_config_is_refused_naming_the_reason(name: str) -> None:
    assert_refused(refused_config(name), REFUSALS[name][0])


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_convert_refuses_a_real_tiny_model(name: str, tmp_path: Path) -> None:
    assert_convert_refuses(name, tmp_path, "cannot be expressed in megatron-core")


@pytest.mark.parametrize("name,arch,model_type", SIBLINGS)
def test_sibling_architectures_are_refused_too(name: str, arch: str, model_type: str | None) -> None:
    raw = {**refused_config(name), "architectures": [arch], **({"model_type": model_type} if model_type else {})}
    assert_refused(raw, "cannot be expressed")


def test_list_architectures_says_refused() -> None:
    lines = {line.split()[0]: line for line in list_architectures().splitlines()}
    for _, fragment, family in REFUSALS.values():
        assert "REFUSED" in lines[family] and fragment in lines[family], lines[family]
