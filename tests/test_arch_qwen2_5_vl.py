"""Qwen2.5-VL is refused (mappings/qwen2_5_vl.yaml), naming what is missing: its vision tower has no place in
GPTModel and is not carried through. The real config is refused by the spec; ``list-architectures`` says so.
(Moved unchanged from tests/test_arch_qwen3_next.py when Qwen3-Next became convertible.)"""

from __future__ import annotations

from refusals import assert_refused, list_architectures, refused_config


def test_real_config_is_refused_naming_the_reason() -> None:
    assert_refused(refused_config("qwen2.5-vl-7b"),
                   r"refused \(qwen2_5_vl\.yaml\): Qwen2\.5-VL cannot be converted: .*no vision tower.*with mrope")


def test_list_architectures_says_refused() -> None:
    lines = {line.split()[0]: line for line in list_architectures().splitlines()}
    assert "REFUSED" in lines["qwen2_5_vl"] and "vision tower" in lines["qwen2_5_vl"]
