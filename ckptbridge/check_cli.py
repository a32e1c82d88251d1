"""``ckptbridge check-mapping``: prove a mapping file right against megatron-core's own model.

Loading a mapping already refuses what it can see alone (unknown fields and Megatron settings,
non-invertible transforms). This command goes further without any weights: from an HF config it plans
the conversion at the given layouts and compares every planned torch_dist key and global shape, and every
legacy per-stage key and local shape, with the ``GPTModel`` megatron-core builds for that layout on the
``meta`` device (see :mod:`ckptbridge.mcore.plan_check`). It imports megatron-core (a few seconds).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import click
import torch

from .errors import CkptBridgeError

_LAYOUT = click.Choice(["torch_dist", "torch"])


def _hf_config(source: str) -> dict:
    from .hf_config import read_config
    from .presets import load_preset, preset_names

    path = Path(source)
    if path.is_dir():
        return read_config(path)
    if path.is_file():
        return json.loads(path.read_text())
    if source in preset_names():
        return load_preset(source)["hf_config"]
    raise CkptBridgeError(f"{source}: neither an HF folder, a config.json nor a preset ({', '.join(preset_names())})")


@click.command("check-mapping")
@click.option("--mappings", "folder", type=click.Path(path_type=Path, file_okay=False, exists=True), default=None,
              help="Folder of mapping files to use instead of the shipped ones (e.g. a new architecture's).")
@click.option("--tp", type=int, multiple=True, help="Tensor-parallel sizes to check (repeatable; default 1 and 2).")
@click.option("--pp", type=int, default=None, help="Pipeline-parallel size of every checked layout (default: 1, then 2 where the layers split).")
@click.option("--ep", type=int, default=None, help="Expert-parallel size (MoE; default 1 and 2).")
@click.option("--format", "formats", type=_LAYOUT, multiple=True, help="MCore formats to check (default both).")
@click.argument("config")
def check_mapping(folder, tp, pp, ep, formats, config):
    """Check the mapping of CONFIG (an HF folder, a config.json or a preset name) against megatron-core.

    Exit status 0 when every planned name and shape equals megatron-core's model at every checked
    layout, format and spec (te, local); 1 with one line per mismatch (the tensor, the expected and the
    actual shape); 2 when the mapping or config is refused before that.
    """
    from .layout import ParallelLayout
    from .mapping.registry import MappingRegistry, default_registry
    from .mcore.plan_check import check_plans
    from .spec import ModelSpec

    try:
        registry = MappingRegistry(folder) if folder else default_registry()
        spec = ModelSpec.from_hf_config(_hf_config(config), registry)
        moe = bool(spec.args.get("num_moe_experts"))
        layouts = []
        for t in tp or (1, 2):
            for p in [pp] if pp else ([1, 2] if spec.num_layers % 2 == 0 else [1]):
                for e in [ep] if ep else ([1, 2] if moe else [1]):
                    layouts.append(ParallelLayout(t, p, ep=e))
        cases, names = [], []
        for layout in layouts:
            for fmt in formats or ("torch_dist", "torch"):
                for spec_name in ("te", "local"):
                    cases.append((spec, spec.megatron_args(layout, torch.bfloat16, spec_name, fmt), fmt, spec_name))
                    names.append(f"{layout.describe()} {fmt} {spec_name}")
    except CkptBridgeError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)
    with warnings.catch_warnings():  # megatron-core's import-time notes (no TransformerEngine/Apex): not ours to show
        warnings.filterwarnings("ignore", module=r"megatron\.")
        problems = check_plans(cases)
    failed = 0
    for name, problem in zip(names, problems):
        failed += bool(problem)
        click.echo(f"{'FAIL' if problem else 'ok  '} {spec.mapping.family} {name}" + (f": {problem}" if problem else ""))
    sys.exit(1 if failed else 0)
