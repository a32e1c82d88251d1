"""OLMo 2 / 3 and OLMoE are refused (mappings/olmo2.yaml, olmoe.yaml): their q/k RMSNorm spans the whole projection
(megatron-core 0.16.1 normalises per head) and OLMo 2/3 normalise after the attention and MLP (megatron-core only
before). The real configs are refused naming that, by the spec and by ``convert`` on a tiny model saved by
transformers; ``list-architectures`` says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptbridge.errors import UnsupportedArchitectureError
from ckptbridge.spec import ModelSpec
from refusals import convert_output, list_architectures, refused_config, tiny_model

REASONS = {
    "olmo2-7b": r"olmo2: OLMo 2/3 cannot be expressed in megatron-core 0\.16\.1: .*post-norm.*"
                r"whole projection \(32 x 128 for q\).*normalises each head",
    "olmoe-1b-7b": r"olmoe: OLMoE cannot be expressed in megatron-core 0\.16\.1: .*whole q and k projections "
                   r"\(16 x 128 for q\).*normalises each head separately",
}


@pytest.mark.parametrize("name", sorted(REASONS))
def test_real_config_is_refused_naming_the_reason(name: str) -> None:
    with pytest.raises(UnsupportedArchitectureError, match=REASONS[name]):
        ModelSpec.from_hf_config(refused_config(name))


@pytest.mark.parametrize("name", sorted(REASONS))
def test_convert_refuses_a_real_tiny_model(name: str, tmp_path: Path) -> None:
    code, output = convert_output(tiny_model(name, tmp_path / "hf"), tmp_path / "mcore")
    assert code == 2 and "cannot be expressed in megatron-core" in output
    assert not (tmp_path / "mcore").exists()


def test_olmo3_is_refused_too() -> None:
    raw = {**refused_config("olmo2-7b"), "architectures": ["Olmo3ForCausalLM"], "model_type": "olmo3"}
    with pytest.raises(UnsupportedArchitectureError, match="OLMo 2/3 cannot be expressed"):
        ModelSpec.from_hf_config(raw)


def test_list_architectures_says_refused() -> None:
    lines = {line.split()[0]: line for line in list_architectures().splitlines()}
    assert "REFUSED" in lines["olmo2"] and "q/k norm over the whole projection" in lines["olmo2"]
    assert "REFUSED" in lines["olmoe"] and "not per head" in lines["olmoe"]
