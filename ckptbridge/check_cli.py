"""``ckptbridge check-mapping``: everything ckptbridge can prove about one mapping file, before use.

First what the file proves alone and on a real HF config (:mod:`ckptbridge.mapping.check`: schema,
every rule's operations invertible, the config translation both ways). Then, unless ``--no-megatron``,
the plan against megatron-core itself: for each layout, format and spec, every planned torch_dist key and
global shape and every legacy per-stage key and local shape must equal those of the ``GPTModel``
megatron-core builds on the ``meta`` device (:mod:`ckptbridge.mcore.plan_check`; imports megatron-core).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click

from .errors import CkptBridgeError

_FORMATS = click.Choice(["torch_dist", "torch"])


@click.command("check-mapping")
@click.option("--hf", "hf", type=click.Path(path_type=Path, exists=True), default=None,
              help="An HF folder or config.json to check on (default: the shipped preset of the file's architecture).")
@click.option("--megatron/--no-megatron", default=True, show_default=True,
              help="Also check every planned name and shape against megatron-core's own model (a few seconds).")
@click.option("--tp", type=int, multiple=True, help="Tensor-parallel sizes to check (repeatable; default 1 and 2).")
@click.option("--pp", type=int, default=None, help="Pipeline-parallel size (default: 1, then 2 where the layers split).")
@click.option("--ep", type=int, default=None, help="Expert-parallel size (MoE; default 1 and 2).")
@click.option("--format", "formats", type=_FORMATS, multiple=True, help="MCore formats to check (default both).")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
def check_mapping(hf, megatron, tp, pp, ep, formats, file):
    """Validate mapping FILE: schema, invertibility of every rule, config translation both ways, and the
    plan against megatron-core's model at several layouts, formats and both specs.

    \b
    Examples:
      ckptbridge check-mapping mappings/llama.yaml
      ckptbridge --mappings ./my-mappings check-mapping ./my-mappings/phi3.yaml --hf ./Phi-3-mini

    Exit status 0 when everything passes; 1 with one line per mismatch against megatron-core (the
    tensor, the expected and the actual shape); 2 when the file or config is refused before that,
    naming the rule, section or field.
    """
    from .mapping import default_registry
    from .mapping.check import check_mapping as run
    from .presets import load_preset, preset_names

    try:
        report = run(file, default_registry(), hf, {n: load_preset(n) for n in preset_names()})
        cases, names = _cases(report.spec, tp, pp, ep, formats) if megatron and report.spec is not None else ([], [])
    except CkptBridgeError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)
    for line in report.lines:
        click.echo(line)
    failed = 0
    if cases:
        from .mcore.plan_check import check_plans

        with warnings.catch_warnings():  # megatron-core's import-time notes (no TransformerEngine/Apex): not ours
            warnings.filterwarnings("ignore", module=r"megatron\.")
            problems = check_plans(cases)
        for name, problem in zip(names, problems):
            failed += bool(problem)
            click.echo(f"{'FAIL' if problem else 'ok  '} megatron-core {name}" + (f": {problem}" if problem else ""))
    if failed:
        sys.exit(1)
    click.echo(f"{file}: mapping {report.family} passes")


def _cases(spec, tp, pp, ep, formats):  # noqa: ANN001, ANN202 - click's values
    import torch

    from .layout import ParallelLayout

    moe = bool(spec.args.get("num_moe_experts"))
    cases, names = [], []
    for t in tp or (1, 2):
        for p in [pp] if pp else ([1, 2] if spec.num_layers % 2 == 0 else [1]):
            for e in [ep] if ep else ([1, 2] if moe else [1]):
                biased = moe and spec.args.get("add_bias_linear")  # megatron-core: biased experts only at ETP 1
                layout = ParallelLayout(t, p, ep=e, etp=1 if biased else None)
                for fmt in formats or ("torch_dist", "torch"):
                    for layer_spec in ("te", "local"):
                        cases.append((spec, spec.megatron_args(layout, torch.bfloat16, layer_spec, fmt), fmt, layer_spec))
                        names.append(f"{layout.describe()} {fmt} {layer_spec}")
    return cases, names
