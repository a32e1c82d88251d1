"""Shared steps of the refusal tests (tests/test_arch_refused.py and the per-family refusal tests): the real public config of a
refused architecture, and a tiny model of it saved by the real transformers class, which ``convert`` must refuse
with the mapping's one-line reason before writing anything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from ckptbridge.cli import main
from ckptbridge.errors import UnsupportedArchitectureError
from ckptbridge.presets import shrink_config
from ckptbridge.spec import ModelSpec

REFUSED = Path(__file__).parent / "data" / "refused"


def refused_config(name: str) -> dict[str, Any]:
    return json.loads((REFUSED / f"{name}.json").read_text())


def tiny_model(name: str, out: Path) -> Path:
    """A 2-layer model of the config's architecture, saved with ``save_pretrained`` (real tensor names)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = shrink_config(refused_config(name), layers=2)
    model_type = raw.pop("model_type")
    raw.pop("architectures")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **raw)).save_pretrained(out)
    return out


def convert_output(src: Path, dst: Path) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["convert", "--src", "hf", "--dst", "mcore", str(src), str(dst)])
    return result.exit_code, result.output


def list_architectures() -> str:
    return CliRunner().invoke(main, ["list-architectures"]).output


def assert_refused(raw: dict[str, Any], reason: str) -> None:
    """Translating the config is refused with a message matching the ``reason`` pattern."""
    with pytest.raises(UnsupportedArchitectureError, match=reason):
        ModelSpec.from_hf_config(raw)


def assert_convert_refuses(name: str, work: Path, says: str) -> None:
    """``convert`` of a tiny real model of the config exits 2 saying ``says`` and writes nothing."""
    code, output = convert_output(tiny_model(name, work / "hf"), work / "mcore")
    assert code == 2 and says in output, output
    assert not (work / "mcore").exists()
