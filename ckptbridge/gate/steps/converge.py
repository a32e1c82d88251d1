"""Step ``converge``: a short megatron-core training run of the checkpoint under test
(:func:`ckptbridge.converge.runner.run_converge`), one check per verdict.

Off unless asked for: even a short run costs minutes on CPU.  The run trains the first torch_dist
conversion of ``convert`` in the run's dtype (or ``source.mcore``), so the gate checks the files it
made; only when there is none does converge convert the HF weights itself.  Its report goes to
``<report dir>/converge/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import MISSING, ConfigError, Section, SourceConfig
from ..context import GateContext
from ..results import FAIL, PASS, SKIP, Check
from . import step


@dataclass(frozen=True)
class ConvergeStepOptions:
    steps: int = 20
    variants: tuple[str, ...] = ()
    dtype: str = "fp32"
    rtol: float = 0.05
    resume_rtol: float = 1e-3
    lr: float = 1e-4
    seq_len: int = 64
    micro_batch_size: int = 1
    envelope: bool = True


def parse(raw: Any, source: SourceConfig, enabled: dict[str, Any]) -> ConvergeStepOptions | None:
    """``false``/left out (off), ``true`` (defaults: baseline, envelope, resume and step-0 checks) or a mapping."""
    if raw is MISSING or raw is False:
        return None
    if raw is True:
        return ConvergeStepOptions()
    s = Section(raw, "converge")
    opts = ConvergeStepOptions(
        steps=s.take("steps", int, 20, minimum=4),
        variants=tuple(s.take("variants", list, [])),
        dtype=s.take("dtype", str, "fp32", choices=("fp32", "bf16")),
        rtol=s.take("rtol", float, 0.05, minimum=0),
        resume_rtol=s.take("resume_rtol", float, 1e-3, minimum=0),
        lr=s.take("lr", float, 1e-4, minimum=0),
        seq_len=s.take("seq_len", int, 64, minimum=2),
        micro_batch_size=s.take("micro_batch_size", int, 1, minimum=1),
        envelope=s.take("envelope", bool, True),
    )
    s.finish()
    from ...converge.variants import select
    from ...errors import CkptBridgeError

    try:
        select([v for v in opts.variants if v != "baseline"])
    except CkptBridgeError as exc:
        raise ConfigError(f"converge.variants: {exc}") from None
    return opts


@step("converge", parse)
def run(ctx: GateContext, opts: ConvergeStepOptions) -> list[Check]:
    from ...converge.report import write_report
    from ...converge.runner import DTYPES, ConvergeOptions, run_converge

    mcore = ctx.config.source.mcore
    if mcore is None:
        made = [c for c in ctx.candidates if c.path is not None and c.ckpt_format == "torch_dist"
                and c.dtype == DTYPES[opts.dtype]]
        if ctx.candidates and not any(c.path is not None for c in ctx.candidates):
            return [Check("converge", "run", SKIP, "no MCore checkpoint to train: every conversion failed")]
        mcore = made[0].path if made else None
    result = run_converge(ConvergeOptions(
        preset=ctx.preset, hf=ctx.hf, mcore=mcore, variants=tuple(v for v in opts.variants if v != "baseline"),
        envelope=opts.envelope, steps=opts.steps, lr=opts.lr, seq_len=opts.seq_len,
        micro_batch_size=opts.micro_batch_size, dtype=opts.dtype, rtol=opts.rtol, resume_rtol=opts.resume_rtol,
        work_dir=ctx.work / "converge"), progress=lambda msg: None)
    paths = write_report(result, ctx.report_dir / "converge")
    ctx.files["converge_report"] = str(paths["report"])
    return [Check("converge", f"{v.variant}.{v.check}", PASS if v.passed else FAIL, v.detail, v.value, v.limit)
            for v in result.verdicts]
