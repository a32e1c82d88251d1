"""``ckptbridge converge``: weights -> one megatron-core run per variant (+ resumes) -> verdicts.

The weights come the way ``align`` finds them (``--hf``, the preset's cached hub checkpoint or
``--random-init``), converted to torch_dist by ckptbridge, so a convergence run starts from exactly
what the converter wrote; ``--mcore`` trains an existing torch_dist checkpoint instead.
"""

from __future__ import annotations

import platform
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..harness.checkpoint_args import checkpoint_args
from ..errors import CkptBridgeError
from ..formats.mcore_common import iteration_dir
from ..presets import load_preset
from .data import TokenStream, load_stream
from .megatron_save import MegatronSave
from .trainer import TrainJob, run_job
from .variants import ENVELOPE, Variant, select
from .verdict import (DEFAULT_RESUME_RTOL, DEFAULT_RTOL, Verdict, envelope, judge_curve, judge_falls, judge_resume,
                      judge_step0)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class ConvergeOptions:
    preset: str | None = None
    hf: Path | None = None
    mcore: Path | None = None
    random_init: bool = False
    layers: int | None = None
    shrink: bool = False
    seed: int = 0  # of --random-init weights
    variants: tuple[str, ...] = ("offload", "fp8")
    envelope: bool = True
    steps: int = 30
    lr: float = 1e-4
    warmup: int = 5
    micro_batch_size: int = 1
    num_microbatches: int = 1
    seq_len: int = 64
    dtype: str = "fp32"
    tp: int = 1
    pp: int = 1
    data: Path | None = None
    data_seed: int = 0
    rtol: float = DEFAULT_RTOL
    resume_rtol: float = DEFAULT_RESUME_RTOL
    resume_at: int | None = None  # default: RESUME_TAIL steps before the end
    step0: bool = True
    work_dir: Path | None = None
    verbose: bool = False  # a progress line per training step (stderr)
    save: Path | None = None  # keep the baseline's trained model + optimizer here, as Megatron-LM saves
    save_format: str = "torch_dist"  # or "torch" (Megatron-LM's --ckpt-format)


@dataclass
class Curve:
    variant: Variant
    rows: list[dict[str, Any]]
    resumed: list[dict[str, Any]] | None = None
    implementation: str = ""
    fp8: str | None = None
    fp8_stats: dict[str, float] | None = None

    @property
    def losses(self) -> list[float]:
        return [float(r["loss"]) for r in self.rows]


@dataclass
class ConvergeResult:
    options: ConvergeOptions
    curves: list[Curve]
    verdicts: list[Verdict]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.verdicts)

    def curve(self, name: str) -> Curve:
        return next(c for c in self.curves if c.variant.name == name)


def _weights(opts: ConvergeOptions, work: Path) -> tuple[Path | None, Path, str]:
    """(HF folder or None, torch_dist iteration folder, how they were obtained)."""
    if opts.mcore is not None and opts.hf is None and opts.preset is None:
        return None, iteration_dir(Path(opts.mcore)), f"--mcore {opts.mcore}"
    from ..harness.weights import resolve_weights

    std = float(load_preset(opts.preset)["hf_config"].get("initializer_range", 0.02)) if opts.preset else 0.02
    w = resolve_weights(opts.preset, opts.hf, opts.mcore, opts.random_init, opts.layers, opts.shrink, opts.seed,
                        DTYPES[opts.dtype], work, matrix_std=std)
    return w.hf_path, w.mcore_iter, f"{w.hf_source}; MCore: {w.mcore_source}"


def _check_options(opts: ConvergeOptions, variants: list[Variant]) -> None:
    """What can be refused before any weights are made or converted."""
    if opts.dtype not in DTYPES:
        raise CkptBridgeError(f"--dtype must be one of {', '.join(DTYPES)}")
    if opts.steps < 4:
        raise CkptBridgeError("--steps must be at least 4 (a curve, a resume point and steps after it)")
    if not torch.cuda.is_available() and opts.dtype != "fp32" and any(v.optimizer.get("optimizer_cpu_offload")
                                                                    for v in variants):
        raise CkptBridgeError(
            "optimizer CPU offload in bf16 needs megatron's distributed optimizer, which on CPU fails on the local "
            "spec's fp32 norm weights (optimizer/distrib_optimizer.py:420 views them as non-leaf shards that "
            "HybridDeviceOptimizer refuses); run offload variants with --dtype fp32 on CPU")


def _check_model(opts: ConvergeOptions, args: Any) -> None:
    """What needs the checkpoint's own arguments."""
    if getattr(args, "num_moe_experts", None) and opts.tp > 1 and not torch.cuda.is_available():
        raise CkptBridgeError("MoE training with --tp > 1 needs sequence parallelism, which megatron-core cannot run "
                              "on CPU (transformer/torch_norm.py:32); use --tp 1 (EP is not needed for a convergence check)")


#: steps run after a resume by default: a lost optimizer state moves the loss by > 1e-3 within 3 steps
#: (measured on the tiny presets), and every resumed step is a step the run pays for twice
RESUME_TAIL = 5


def _resume_at(opts: ConvergeOptions) -> int:
    k = opts.resume_at if opts.resume_at is not None else opts.steps - min(RESUME_TAIL, opts.steps // 2)
    if not 0 < k < opts.steps:
        raise CkptBridgeError(f"--resume-at must be between 1 and {opts.steps - 1}")
    return k


def hf_first_batch_loss(hf_path: Path, stream: TokenStream, opts: ConvergeOptions) -> float:
    """HF's mean next-token loss on the batches MCore's first step sees (same tokens, same averaging)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_path, dtype=DTYPES[opts.dtype]).eval()
    losses = []
    with torch.no_grad():
        for batch in stream.step_batches(opts.data_seed, 0, opts.num_microbatches, opts.micro_batch_size,
                                         opts.seq_len):
            logits = model(input_ids=batch[:, :-1]).logits.float()
            losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()))
    return float(torch.stack(losses).mean())


def _run_variant(v: Variant, base: TrainJob, work: Path, resume_at: int, progress: Any, verbose: bool,
                 megatron_save: MegatronSave | None = None) -> Curve:
    save_dir = str(work / "resume" / v.name) if v.resume else None
    job = replace(base, optimizer=dict(v.optimizer), fp8=v.fp8, data_seed=base.data_seed + v.data_seed,
                  save_at=resume_at if v.resume else None, save_dir=save_dir,
                  step0_batch=v.name == "baseline", label=v.name if verbose else "",
                  megatron_save=megatron_save if v.name == "baseline" else None)
    t0 = time.perf_counter()
    out = run_job(job)
    curve = Curve(v, out["rows"], implementation=out.get("optimizer", ""), fp8=out.get("fp8"),
                  fp8_stats=out.get("fp8_stats"))
    curve.rows[0]["step0_loss"] = out.get("step0_loss")
    curve.rows[0]["step0_loss_padded_vocab"] = out.get("step0_loss_padded_vocab")
    if v.resume:
        again = run_job(replace(job, save_at=None, save_dir=None, megatron_save=None, resume_from=save_dir, fault=v.fault,
                                step0_batch=False, label=f"{v.name} (resumed)" if verbose else ""))
        curve.resumed = again["rows"]
    progress(f"{v.name}: {len(curve.rows)} steps, loss {curve.losses[0]:.4f} -> {curve.losses[-1]:.4f} "
             f"({time.perf_counter() - t0:.1f} s{', + resume' if v.resume else ''})")
    return curve


def verdicts_for(curves: list[Curve], opts: ConvergeOptions, resume_at: int, hf_loss: float | None) -> list[Verdict]:
    base = next(c for c in curves if c.variant.name == "baseline")
    env_curve = next((c for c in curves if c.variant.role == "envelope"), None)
    env = envelope(base.losses, env_curve.losses) if env_curve is not None else None
    out = [judge_falls("baseline", base.losses)]
    if hf_loss is not None and base.rows[0].get("step0_loss") is not None:
        out.append(judge_step0(float(base.rows[0]["step0_loss"]), hf_loss, opts.dtype,
                               padded=base.rows[0].get("step0_loss_padded_vocab")))
    for c in curves:
        if c.variant.name != "baseline" and c.variant.role != "envelope":
            out.append(judge_curve(c.variant.name, base.losses, c.losses, env, opts.rtol))
        if c.resumed is not None:
            out.append(judge_resume(c.variant.name, c.losses, [float(r["loss"]) for r in c.resumed], resume_at,
                                    opts.resume_rtol))
    return out


def run_converge(opts: ConvergeOptions, progress: Any = print) -> ConvergeResult:
    """Run every selected variant (baseline and envelope first) and judge them."""
    variants = select(list(opts.variants), envelope=opts.envelope)
    _check_options(opts, variants)
    resume_at = _resume_at(opts)
    tmp = None
    if opts.work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ckptbridge-converge-")
        work = Path(tmp.name)
    else:
        work = Path(opts.work_dir)
        work.mkdir(parents=True, exist_ok=True)
    try:
        hf_path, iter_dir, source = _weights(opts, work)
        args = checkpoint_args(iter_dir)
        _check_model(opts, args)
        stream = load_stream(opts.data, hf_path, int(args.vocab_size))
        base = TrainJob(iter_dir=str(iter_dir), stream=stream, steps=opts.steps, lr=opts.lr, warmup=opts.warmup,
                        micro_batch_size=opts.micro_batch_size, num_microbatches=opts.num_microbatches,
                        seq_len=opts.seq_len, dtype=DTYPES[opts.dtype], tp=opts.tp, pp=opts.pp,
                        data_seed=opts.data_seed)
        progress(f"weights: {source}")
        progress(f"data: {stream.source}")
        saved = MegatronSave(str(opts.save), opts.save_format) if opts.save is not None else None
        curves = [_run_variant(v, base, work, resume_at, progress, opts.verbose, saved) for v in variants]
        if saved is not None:
            progress(f"saved the baseline's model and optimizer after {opts.steps} steps as Megatron-LM does "
                     f"({opts.save_format}): {opts.save}")
        hf_loss = hf_first_batch_loss(hf_path, stream, opts) if (opts.step0 and hf_path is not None) else None
        verdicts = verdicts_for(curves, opts, resume_at, hf_loss)
        meta = _meta(opts, source, stream, resume_at, hf_loss, variants)
        return ConvergeResult(opts, curves, verdicts, meta)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _meta(opts: ConvergeOptions, source: str, stream: TokenStream, resume_at: int, hf_loss: float | None,
          variants: list[Variant]) -> dict[str, Any]:
    import megatron.core

    on_cpu = not torch.cuda.is_available()
    notes = []
    if on_cpu and any(v.optimizer.get("optimizer_cpu_offload") for v in variants):
        notes.append("Optimizer CPU offload is emulated on this host-only machine: megatron's HybridDeviceOptimizer "
                     "runs its own split, gradient copies, CPU Adam and copy-back, with the model parameters standing "
                     "in for device memory (ckptbridge/mcore/compat.py P10); every copy is a host memcpy.")
    if any(v.fp8 for v in variants) and on_cpu:
        notes.append("FP8 is emulated (fake-quantised linears, ckptbridge/converge/fp8.py): TransformerEngine and "
                     "an FP8-capable GPU are absent.")
    return {
        "source": source, "data": stream.source, "device": "cuda" if not on_cpu else f"cpu ({platform.machine()})",
        "dtype": opts.dtype, "steps": opts.steps, "lr": opts.lr, "warmup": opts.warmup,
        "micro_batch_size": opts.micro_batch_size, "num_microbatches": opts.num_microbatches, "seq_len": opts.seq_len,
        "tp": opts.tp, "pp": opts.pp, "rtol": opts.rtol, "resume_rtol": opts.resume_rtol, "resume_at": resume_at,
        "envelope": ENVELOPE if opts.envelope else None, "hf_step0_loss": hf_loss,
        "versions": {"torch": torch.__version__, "megatron-core": megatron.core.__version__},
        "notes": notes,
    }
