"""The ``ckptbridge converge`` command (registered in ``ckptbridge/cli.py``)."""

from __future__ import annotations

import shlex
import sys
import time
import warnings
from pathlib import Path

import click

from ..harness.quiet import collected_stderr
from ..errors import CkptBridgeError
from ..option_checks import refuse_given
from ..weight_options import weight_source_options

EXIT_FAILED = 1
EXIT_USAGE = 2


@click.command("converge")
@weight_source_options(
    hf_help="Local HF checkpoint: converted to MCore by ckptbridge, then trained.",
    mcore_help="MCore torch_dist checkpoint to train (with --hf too, the step-0 check compares the two).")
@click.option("--variants", default="offload,fp8", show_default=True,
              help="Comma list from alignment/converge_variants.yaml (baseline and its second-seed envelope always run): "
                   "offload (= offload-1.0, offload-0.5), fp8, broken-resume, ...")
@click.option("--no-envelope", is_flag=True, help="Skip the second-seed baseline (the band is then rtol alone).")
@click.option("--steps", type=click.IntRange(4), default=30, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Peak learning rate (linear warmup, then constant).")
@click.option("--warmup", type=click.IntRange(0), default=5, show_default=True, help="Warmup steps.")
@click.option("--micro-batch-size", type=click.IntRange(1), default=1, show_default=True)
@click.option("--num-microbatches", type=click.IntRange(1), default=1, show_default=True,
              help="Microbatches per step (gradient accumulation; >= --pp keeps the pipeline busy).")
@click.option("--seq-len", type=click.IntRange(2), default=64, show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--tp", type=click.IntRange(1), default=1, show_default=True, help="Tensor-parallel size (gloo workers on CPU).")
@click.option("--pp", type=click.IntRange(1), default=1, show_default=True, help="Pipeline-parallel size.")
@click.option("--data", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help='Training data: .jsonl with {"text": ...} (tokenized with the checkpoint tokenizer) or {"ids": [...]} '
                   "per line, or .npy ids. Default: a built-in deterministic corpus.")
@click.option("--data-seed", type=int, default=0, show_default=True, help="Batch order (the envelope run adds 1).")
@click.option("--rtol", type=float, default=0.05, show_default=True, help="Curve tolerance vs baseline (Megatron-LM's).")
@click.option("--resume-rtol", type=float, default=1e-3, show_default=True, help="Resumed vs uninterrupted curve.")
@click.option("--resume-at", type=click.IntRange(1), default=None, help="Step to save and resume at (default: 5 steps before the end).")
@click.option("--no-step0", is_flag=True, help="Skip the step-0 loss check against HF.")
@click.option("--out", "out_root", type=click.Path(path_type=Path, file_okay=False), default=Path("reports"),
              show_default=True, help="Reports go to OUT/RUN/.")
@click.option("--run", "run_name", default=None, help="Report folder name (default: converge-<model>-<dtype>-<time>).")
@click.option("--work-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Keep converted weights and resume checkpoints here (default: a temporary folder).")
@click.option("--save", "save_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Keep the baseline's trained model and optimizer here, laid out as Megatron-LM's save_checkpoint "
                   "writes them at the run's --tp/--pp (latest_checkpointed_iteration.txt, iter_NNNNNNN/).")
@click.option("--save-format", type=click.Choice(["torch_dist", "torch"]), default="torch_dist", show_default=True,
              help="Megatron-LM's --ckpt-format for --save: torch_dist, or the legacy per-rank torch files.")
@click.option("-q", "--quiet", is_flag=True, help="No per-step progress lines.")
def converge(preset, hf_path, mcore_path, random_init, layers, shrink, seed, variants, no_envelope, steps, lr, warmup,
             micro_batch_size, num_microbatches, seq_len, dtype, tp, pp, data, data_seed, rtol, resume_rtol, resume_at,
             no_step0, out_root, run_name, work_dir, save_dir, save_format, quiet):
    """Short megatron-core training runs that confirm a converted checkpoint still converges.

    Every variant trains the same weights on the same batches with megatron-core's GPTModel, DDP,
    optimizer and forward-backward schedule; its loss curve is judged against the baseline within
    max(rtol x loss, envelope), the envelope being the baseline's distance to itself on another batch
    order.  Variants marked `resume` also save at --resume-at (default: 5 steps before the end), reload in a fresh process and must continue
    the uninterrupted curve (optimizer state survives the reload).  The first batch's loss is checked
    against HF's.  --save keeps the baseline's trained model and optimizer as Megatron-LM's
    save_checkpoint writes them (args, RNG states and scheduler included).  Writes report.md,
    summary.json, losses.csv, junit.xml and loss_curves.png.

    Exit status: 0 when every verdict passes, 1 when one fails, 2 on a usage or input error.
    Library warnings go to OUT/RUN/stderr.log; one line summarises them.

    \b
    Examples:
      ckptbridge converge --model llama3.2-1b --random-init --layers 2 --steps 30 --variants baseline,offload,fp8
      ckptbridge converge --hf ./Llama-3.2-1B --data corpus.jsonl --steps 50 --tp 2
      ckptbridge converge --model qwen3-8b --random-init --layers 2 --shrink --variants broken-resume
      ckptbridge converge --hf ./Llama-3.2-1B --steps 20 --tp 2 --pp 2 --save ./trained --save-format torch_dist
    """
    ctx = click.get_current_context()
    if not random_init:
        refuse_given(ctx, ("seed",), "would have no effect without --random-init (it seeds random weights)")
    if save_dir is None:
        refuse_given(ctx, ("save_format",), "would have no effect without --save")
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
    if preset is None and hf_path is None and mcore_path is None:
        raise click.UsageError("give --model PRESET (with --random-init or a cached checkpoint), --hf PATH or --mcore PATH")
    names = tuple(v.strip() for v in variants.split(",") if v.strip() and v.strip() != "baseline")
    t0 = time.perf_counter()
    name = run_name or f"converge-{preset or Path(hf_path or mcore_path).name}-{dtype}-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir = Path(out_root) / name
    try:
        # megatron-core's import-time TE/Apex-absent warnings and the workers' stderr go to the log
        with collected_stderr(out_dir / "stderr.log") as log:
            from .report import write_report
            from .runner import ConvergeOptions, run_converge

            opts = ConvergeOptions(
                preset=preset, hf=hf_path, mcore=mcore_path, random_init=random_init, layers=layers, shrink=shrink,
                seed=seed, variants=names, envelope=not no_envelope, steps=steps, lr=lr, warmup=warmup,
                micro_batch_size=micro_batch_size, num_microbatches=num_microbatches, seq_len=seq_len, dtype=dtype,
                tp=tp, pp=pp, data=data, data_seed=data_seed, rtol=rtol, resume_rtol=resume_rtol, resume_at=resume_at,
                step0=not no_step0, work_dir=work_dir, save=save_dir, save_format=save_format, verbose=not quiet)
            result = run_converge(opts, progress=lambda msg: click.echo(msg, file=log.terminal))
    except CkptBridgeError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(EXIT_USAGE)
    click.echo(log.summary())
    result.meta["seconds"] = time.perf_counter() - t0
    paths = write_report(result, out_dir, shlex.join(["ckptbridge", "converge", *sys.argv[2:]]))
    for v in result.verdicts:
        click.echo(v.line())
    click.echo(f"report: {paths['report']}")
    click.echo(f"converge: {'passed' if result.passed else 'FAILED'} ({sum(v.passed for v in result.verdicts)}"
               f"/{len(result.verdicts)} verdicts, {result.meta['seconds']:.0f} s)")
    sys.exit(0 if result.passed else EXIT_FAILED)
