"""The ``ckptbridge gate`` command (registered in ``ckptbridge/cli.py`` with ``main.add_command(gate)``)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import CkptBridgeError

EXIT_PASSED, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

EPILOG = """\b
Config keys (YAML or TOML; unknown keys are errors; relative paths are relative to the config file):
  source:      what is under test (required)
    hf:          local HF checkpoint folder
    preset:      model preset (alignment/presets); alone: its hub id from the local HF cache
    random_init: true = seeded random weights of `preset` (no download)   [false]
    layers, shrink, seed:  with random_init: depth, tiny widths, seed    [preset's, false, 0]
    mcore:       an existing MCore checkpoint to check against the HF source instead of converting
  convert:     a layout, a list of layouts, true or false   [tp 1 pp 1 torch_dist; false with source.mcore]
    tp, pp, vpp, pp_first, pp_last, ep, etp:   MCore layout   [1, 1, -, -, -, 1, = tp]
    format: torch_dist | torch    spec: te | local    dtype: null | fp32 | bf16 | fp16
    vocab_divisible_by   [128]    moe_grouped_gemm   [false]
  roundtrip:   true, false or {bit_exact, max_abs}: MCore -> HF must equal the source   [bit_exact: true]
  align:       true, false or a mapping: HF vs MCore forward, gated   [on, fp32 defaults]
    dtype: fp32 | bf16 | fp16    tp, pp   [1, 1]    seq_len, prompt   [64-token built-in sample]
    modes: [propagated, isolated]    probe: true    probe_positions: [8192, ...]
    thresholds:  as `align --gate`: {logits|points|probe: {max_abs, max_kl, min_top1, min_cosine,
                 max_rel_err, max_growth}}, optional fp32:/bf16:/fp16: sections; unset = dtype defaults
  converge:    off | true | {steps, variants, dtype, rtol, resume_rtol, envelope, lr, seq_len, micro_batch_size}
  report:
    dir:         summary.json, junit.xml and align/ go here   [reports/gate]

\b
Example:
  source: {preset: llama3.2-1b, random_init: true, layers: 2, shrink: true}
  convert: [{tp: 2, pp: 2}, {tp: 2, pp: 2, format: torch}]
  roundtrip: {bit_exact: true}
  align: {dtype: fp32, thresholds: {logits: {max_abs: 1.0e-4, max_kl: 1.0e-4, min_top1: 1.0}}}
  report: {dir: reports/gate}

See docs/ci-gate.md for the whole reference and a GitHub Actions workflow.
"""


@click.command("gate", epilog=EPILOG)
@click.argument("config", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--work-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Keep conversions and exports here (default: a temporary folder, deleted afterwards).")
@click.option("--report-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Write summary.json, junit.xml and align/ here instead of the config's report.dir.")
@click.option("--json", "as_json", is_flag=True,
              help="Print summary.json to stdout; the per-check lines then go to stderr.")
def gate(config: Path, work_dir: Path | None, report_dir: Path | None, as_json: bool) -> None:
    """Check a conversion for CI: convert, round-trip, align, each against thresholds from CONFIG.

    Exit status: 0 when every check passes, 1 when a check fails (each failed check prints its
    reason), 2 on a usage, config or input error.  Prints one line per check and a verdict, and
    writes summary.json and junit.xml (one test case per check, classname = step).
    """
    from .config import load_config
    from .results import check_line, summary, verdict_line, write_junit, write_summary
    from .runner import jsonable_options, run_gate

    try:
        cfg = load_config(config, report_dir)
        result = run_gate(cfg, work_dir)
    except CkptBridgeError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(EXIT_USAGE)
    paths = {"summary": cfg.report_dir / "summary.json", "junit": cfg.report_dir / "junit.xml"}
    result.files.update({k: str(v) for k, v in paths.items()})
    data = summary(result, jsonable_options(cfg.source), {n: jsonable_options(o) for n, o in cfg.steps.items()})
    write_summary(data, paths["summary"])
    write_junit(result, paths["junit"])
    for c in result.checks:
        click.secho(check_line(c), fg="red" if c.failed else None, err=as_json)
    click.echo(f"wrote {paths['summary']} and {paths['junit']}", err=as_json)
    click.secho(verdict_line(result), fg="green" if result.passed else "red", bold=True, err=as_json)
    if as_json:
        click.echo(paths["summary"].read_text(), nl=False)
    sys.exit(EXIT_PASSED if result.passed else EXIT_FAILED)
