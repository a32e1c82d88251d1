"""What ``pip install ckptbridge`` gives: the converter without megatron-core or transformers.

The converter writes Megatron-LM's ``args`` (which hold megatron enums) without importing
megatron-core; megatron-core's own ``weights_only`` load must still read real enums back. A clean
virtual environment (no system site-packages, no extras) converts HF -> torch_dist -> HF bit-exactly
and refuses ``align`` in one line naming the ``[align]`` extra.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest
import torch

from ckptbridge.extras import EXTRAS
from ckptbridge.megatron_args import megatron_lm_defaults

from helpers import assert_bit_exact, hf_tensors

ROOT = Path(__file__).resolve().parents[1]


def _megatron_load(path: Path) -> dict:
    """megatron-core's own reading: ``weights_only`` with its SAFE_GLOBALS (imports megatron-core)."""
    from megatron.core.safe_globals import SAFE_GLOBALS

    with torch.serialization.safe_globals(SAFE_GLOBALS):
        return torch.load(path, weights_only=True)


def _assert_real_megatron_enums(args) -> None:  # noqa: ANN001
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    assert args.model_type is ModelType.encoder_or_decoder
    assert args.attention_backend is AttnBackend.auto


def test_python_version_is_stated_once() -> None:
    """pyproject's requires-python (pip enforces it) is what the README says and what the code needs."""
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11"  # enum.EnumType, tomllib
    assert "Python 3.11+" in (ROOT / "README.md").read_text()
    assert "3.10" not in (ROOT / "README.md").read_text()


def test_extras_agree_with_pyproject() -> None:
    """ckptbridge/extras.py (the refusal message) names exactly what pyproject's [align] installs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    align = {re.split(r"[<>=\[]", r)[0] for r in project["optional-dependencies"]["align"]}
    assert align == {dist for _, dist in EXTRAS["align"]}
    base = {re.split(r"[<>=\[]", r)[0] for r in project["dependencies"]}
    assert not base & align
    assert "ckptbridge[align]" in project["optional-dependencies"]["test"]


def test_stored_megatron_enum_values_are_megatrons() -> None:
    """The enum values stored as data (written without megatron-core) are megatron-core's own."""
    import importlib

    data = megatron_lm_defaults()
    encoded = [v for section in ("args", "added_at_save") for v in data[section].values()
               if isinstance(v, dict) and str(v.get("enum", "")).startswith("megatron.")]
    assert encoded
    for e in encoded:
        module, _, name = e["enum"].rpartition(".")
        assert getattr(importlib.import_module(module), name)[e["name"]].value == e["value"], e


def test_args_written_without_importing_megatron(tmp_path: Path, tiny_hf: dict[str, Path]) -> None:
    """A conversion never imports megatron-core, yet megatron-core reads real enums from what it wrote."""
    script = (
        "import sys; from ckptbridge.cli import main\n"
        f"for fmt in ('torch_dist', 'torch'):\n"
        f"    try: main(['convert', '--src', 'hf', '--dst', 'mcore', '--tp', '2', '--format', fmt, '-q',"
        f" {str(tiny_hf['llama3.2-1b'])!r}, {str(tmp_path)!r} + '/' + fmt])\n"
        "    except SystemExit as e: assert e.code == 0, e.code\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('megatron', 'transformers')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
    _assert_real_megatron_enums(_megatron_load(tmp_path / "torch_dist" / "release" / "common.pt")["args"])
    _assert_real_megatron_enums(_megatron_load(tmp_path / "torch" / "release" / "mp_rank_01" / "model_optim_rng.pt")["args"])


def test_clean_venv_without_extras(tmp_path: Path, tiny_hf: dict[str, Path]) -> None:
    """``pip install ckptbridge`` (no extras) in a clean venv: HF -> torch_dist -> HF is bit-exact, the
    checkpoint it wrote is read by megatron-core here, and ``align`` is refused naming ``[align]``."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    py = env_dir / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # the project's own torch build first (a bare `torch` could pull CUDA wheels); pip finds it locally
    subprocess.run([*pip, f"torch=={torch.__version__}"], check=True, capture_output=True, text=True)
    subprocess.run([*pip, str(ROOT)], check=True, capture_output=True, text=True)
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=json"], check=True, capture_output=True, text=True)
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert not installed & {dist for _, dist in EXTRAS["align"]}, installed

    cli = str(env_dir / "bin" / "ckptbridge")
    src, mcore, back = tiny_hf["llama3.2-1b"], tmp_path / "mcore", tmp_path / "back"
    run = dict(capture_output=True, text=True, cwd=tmp_path)  # not the repository: the installed package's data
    for argv in (["convert", "--src", "hf", "--dst", "mcore", "--tp", "2", "--pp", "2", str(src), str(mcore)],
                 ["convert", "--src", "mcore", "--dst", "hf", str(mcore), str(back)],
                 ["inspect", "--no-tensors", str(mcore)],
                 ["compare", str(src), str(back)]):
        done = subprocess.run([cli, *argv], **run)
        assert done.returncode == 0, (argv, done.stderr)
    assert_bit_exact(hf_tensors(src), hf_tensors(back))
    _assert_real_megatron_enums(_megatron_load(mcore / "release" / "common.pt")["args"])

    refused = subprocess.run([cli, "align", "--model", "llama3.2-1b", "--random-init"], **run)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "[align]" in lines[0] and "pip install" in lines[0], refused.stderr
