"""The ``ckptbridge align`` command (registered in ``ckptbridge/cli.py`` with
``main.add_command(align)``)."""

from __future__ import annotations

import shlex
import sys
import time
import traceback
import warnings
from pathlib import Path

import click

from ..errors import CkptBridgeError
from ..option_checks import refuse_given
from ..weight_options import weight_source_options
from ..harness.quiet import collected_stderr

EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3  # an unexpected crash: not a failed gate (1), not a bad input (2)


def _positions(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(p) for p in text.replace(",", " ").split())
    except ValueError:
        raise click.BadParameter(f"expected integers, got {text!r}") from None


@click.command("align")
@weight_source_options(
    hf_help="Local HF checkpoint folder (else the preset's hub id from the local HF cache).",
    mcore_help="MCore torch_dist checkpoint to compare (else the HF weights are converted by ckptbridge).")
@click.option("--prompt", default=None, help="Text to run instead of the built-in sample.")
@click.option("--tokens", default=None, help="Explicit token ids, comma separated.")
@click.option("--seq-len", type=click.IntRange(2), default=None, help="Truncate the token ids (built-in sample: 64).")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--tp", type=click.IntRange(1), default=1, show_default=True, help="MCore tensor-parallel size (workers if > 1).")
@click.option("--pp", type=click.IntRange(1), default=1, show_default=True, help="MCore pipeline-parallel size (workers if > 1).")
@click.option("--mode", type=click.Choice(["both", "propagated", "isolated"]), default="both", show_default=True)
@click.option("--ablate", default=None, help="'all' or a comma list of ablation names / ops (alignment/ablations.yaml).")
@click.option("--probe/--no-probe", default=True, show_default=True, help="Long-position RoPE probe.")
@click.option("--probe-positions", default=None, help="Probe positions, e.g. 8192,16384,32768 (default: the preset's, else these).")
@click.option("--layerwise", is_flag=True, help="Isolated mode streaming one layer of each model at a time (models larger than RAM).")
@click.option("--gate", "gate_file", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="YAML/JSON thresholds (see ckptbridge/align/gate.py); exit 1 when a check fails.")
@click.option("--max-logit-abs", type=float, default=None, help="Gate: logits max abs.")
@click.option("--max-kl", type=float, default=None, help="Gate: logits KL(HF||MCore).")
@click.option("--min-top1", type=float, default=None, help="Gate: logits top-1 agreement (0..1).")
@click.option("--min-cosine", type=float, default=None, help="Gate: cosine at every point.")
@click.option("--min-routing-agreement", type=click.FloatRange(0, 1), default=None,
              help="Gate: share of tokens whose top-k experts agree, every MoE layer (default fp32 1.0, bf16 0.9).")
@click.option("--out", "out_root", type=click.Path(path_type=Path, file_okay=False), default=Path("reports"), show_default=True,
              help="Reports are written to OUT/RUN/.")
@click.option("--run", "run_name", default=None, help="Report folder name (default: <model>-<dtype>-<time>).")
@click.option("--work-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Keep generated weights here (default: a temporary folder, deleted afterwards).")
def align(preset, hf_path, mcore_path, random_init, layers, shrink, seed, prompt, tokens, seq_len, dtype, device, tp, pp,
          mode, ablate, probe, probe_positions, layerwise, gate_file, max_logit_abs, max_kl, min_top1, min_cosine,
          min_routing_agreement, out_root, run_name, work_dir):
    """Run HF and Megatron-Core side by side, layer by layer, and write an ablation error report.

    Exit status: 0 when the gate passes, 1 when a gate check fails, 2 on a usage or input error
    (one line naming the cause), 3 on an unexpected crash (traceback in the run's stderr.log).
    Library warnings and progress bars go to OUT/RUN/stderr.log; one line summarises them.
    Every run is gated (defaults per dtype, see ckptbridge/align/gate.py); --gate and the --max-*/--min-*
    flags replace individual thresholds.

    \b
    Examples:
      ckptbridge align --model llama3.2-1b --random-init --layers 2
      ckptbridge align --model llama3.2-1b --random-init --layers 2 --dtype bf16 --ablate all
      ckptbridge align --model qwen3-8b --random-init --layers 2 --shrink --tp 2 --gate gate.yaml
      ckptbridge align --hf ./Llama-3.1-8B --mcore ./llama-mcore --dtype bf16 --layerwise
    """
    ctx = click.get_current_context()
    if not random_init:
        refuse_given(ctx, ("seed",), "would have no effect without --random-init (it seeds random weights)")
    if not probe:
        refuse_given(ctx, ("probe_positions",), "would have no effect with --no-probe")
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")  # megatron's fp32-weight norm, every call
    from .gate import evaluate, load_thresholds
    from .report import write_report
    from .routing_report import unmeasured_note
    from .runner import MODES, AlignOptions, run_alignment

    if preset is None and hf_path is None:
        raise click.UsageError("give --model PRESET (with --random-init or a cached/--hf checkpoint) or --hf PATH")
    modes = MODES if mode == "both" else (mode,)
    if layerwise:
        if mode == "propagated":
            raise click.UsageError("--layerwise runs isolated mode only")
        modes = ("isolated",)
    overrides: dict[str, dict[str, float]] = {}
    for value, group, key in ((max_logit_abs, "logits", "max_abs"), (max_kl, "logits", "max_kl"),
                              (min_top1, "logits", "min_top1"), (min_cosine, "points", "min_cosine"),
                              (min_cosine, "logits", "min_cosine"),
                              (min_routing_agreement, "routing", "min_routing_agreement")):
        if value is not None:
            overrides.setdefault(group, {})[key] = value
    opts = AlignOptions(preset=preset, hf=hf_path, mcore=mcore_path, random_init=random_init, layers=layers, shrink=shrink,
                        seed=seed, prompt=prompt, tokens=tokens, seq_len=seq_len, dtype=dtype, device=device, tp=tp, pp=pp,
                        modes=modes, ablate=ablate, probe=probe, probe_positions=_positions(probe_positions),
                        layerwise=layerwise, work_dir=work_dir)
    name = run_name or f"{preset or Path(hf_path).name}-{dtype}-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir = Path(out_root) / name
    try:
        thresholds = load_thresholds(dtype, gate_file, overrides)
        with collected_stderr(out_dir / "stderr.log") as log:
            try:
                result = run_alignment(opts)
            except CkptBridgeError:
                raise
            except Exception:  # an internal crash: traceback to the log, one line (exit 3) on the terminal
                traceback.print_exc()
                raise
    except CkptBridgeError as exc:
        click.secho(f"error: {str(exc).splitlines()[0]}", fg="red", err=True)
        sys.exit(EXIT_USAGE)
    except Exception as exc:
        last = (str(exc).strip().splitlines() or [""])[-1]
        click.secho(f"internal error: {type(exc).__name__}: {last} (traceback in {out_dir / 'stderr.log'})", fg="red", err=True)
        sys.exit(EXIT_INTERNAL)
    click.echo(log.summary())
    checks = evaluate(result.rows, thresholds, list(result.meta["modes"]), result.num_layers, result.routing)
    paths = write_report(result, out_dir, checks, _command(click.get_current_context()))
    failed = [c for c in checks if not c.passed]
    for s in result.skipped:
        click.echo(f"skipped {s.name}: {s.skipped}")
    if result.meta.get("hf_attention_note"):
        click.echo(f"note: {result.meta['hf_attention_note']}")
    if unmeasured_note(result):
        click.echo("note: " + unmeasured_note(result).replace("**", ""))
    click.echo(f"report: {paths['report']}")
    click.echo(f"gate: {'FAILED' if failed else 'passed'} ({len(checks) - len(failed)}/{len(checks)} checks)")
    for c in failed:
        click.echo(f"  FAIL {c.name}: {c.message}")
    sys.exit(EXIT_GATE_FAILED if failed else 0)


def _command(ctx: click.Context) -> str:
    """The command line equivalent to this invocation (non-default options only), for the report."""
    argv = ["ckptbridge", "align"]
    for param in ctx.command.params:
        if not isinstance(param, click.Option):
            continue
        value = ctx.params.get(param.name)
        flag = max(param.opts, key=len)
        if param.is_flag:
            if param.secondary_opts:  # --x/--no-x: show the one that was chosen, if not the default
                if bool(value) != bool(param.get_default(ctx)):
                    argv.append(flag if value else max(param.secondary_opts, key=len))
            elif value:
                argv.append(flag)
        elif value is not None and value != param.get_default(ctx):
            argv += [flag, str(value)]
    return shlex.join(argv)
