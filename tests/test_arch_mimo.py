"""MiMo (MiMoForCausalLM) is refused (mappings/mimo.yaml): it is remote code transformers does not ship, so no
tiny model of it can be built and checked against megatron-core here. Its real config is refused naming that, and
``list-architectures`` says so."""

from __future__ import annotations

import pytest

from ckptbridge.errors import UnsupportedArchitectureError
from ckptbridge.spec import ModelSpec
from refusals import list_architectures, refused_config


def test_transformers_has_no_mimo_class() -> None:
    import transformers

    assert not hasattr(transformers, "MiMoForCausalLM")  # when it has one, map MiMo (Qwen2 + an mtp section)


def test_real_config_is_refused_naming_the_reason() -> None:
    with pytest.raises(UnsupportedArchitectureError, match=r"refused \(mimo\.yaml\): MiMo .* remote code that transformers does not ship"):
        ModelSpec.from_hf_config(refused_config("mimo-7b"))


def test_list_architectures_says_refused() -> None:
    line = next(x for x in list_architectures().splitlines() if x.startswith("mimo "))
    assert "REFUSED" in line and "remote code" in line
