"""Step ``align``: run HF and Megatron-Core side by side (:func:`ckptbridge.align.runner.run_alignment`)
and judge the baseline with align's thresholds (:mod:`ckptbridge.align.gate`, defaults per dtype).

The MCore side is the checkpoint under test: ``source.mcore`` if given, else the first
torch_dist conversion of ``convert`` whose dtype is the alignment dtype (megatron reloads it at
the alignment's TP/PP).  Only when no conversion qualifies (legacy format only, or another dtype)
does align convert the HF weights itself.  The full align report (report.md, CSV, plots) goes
to ``<report dir>/align/``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...align.gate import Thresholds, evaluate, thresholds_from_mapping
from ...errors import CkptBridgeError
from ..config import MISSING, ConfigError, Section, SourceConfig
from ..context import GateContext
from ..results import SKIP, Check
from . import step

MODES = ("propagated", "isolated")


@dataclass(frozen=True)
class AlignStepOptions:
    dtype: str = "fp32"
    tp: int = 1
    pp: int = 1
    seq_len: int | None = None
    prompt: str | None = None
    modes: tuple[str, ...] = MODES
    probe: bool = True
    probe_positions: tuple[int, ...] | None = None
    thresholds: Thresholds | None = None  # merged: dtype defaults, then the config's


def parse(raw: Any, source: SourceConfig, enabled: dict[str, Any]) -> AlignStepOptions | None:
    """``false``, ``true`` (defaults) or a mapping; left out: on, with the defaults."""
    if raw is False:
        return None
    if raw is MISSING or raw is True:
        return AlignStepOptions(thresholds=thresholds_from_mapping("fp32", {}, "align.thresholds"))
    s = Section(raw, "align")
    dtype = s.take("dtype", str, "fp32", choices=("fp32", "bf16", "fp16"))
    tp, pp = s.take("tp", int, 1, minimum=1), s.take("pp", int, 1, minimum=1)
    seq_len = s.take("seq_len", int, minimum=2, nullable=True)
    prompt = s.take("prompt", str, nullable=True)
    modes = s.take("modes", list, list(MODES))
    probe = s.take("probe", bool, True)
    positions = s.take("probe_positions", list, nullable=True)
    raw_thresholds = s.take("thresholds", dict, {})
    s.finish()
    if not modes or any(m not in MODES for m in modes) or len(set(modes)) != len(modes):
        raise ConfigError(f"align.modes: a non-empty list of distinct {' / '.join(MODES)}, got {modes!r}")
    if positions is not None and not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in positions):
        raise ConfigError(f"align.probe_positions: a list of positive integers, got {positions!r}")
    if positions is not None and not probe:
        raise ConfigError("align.probe_positions: given with probe: false")
    try:
        thresholds = thresholds_from_mapping(dtype, raw_thresholds, "align.thresholds")
    except CkptBridgeError as exc:
        raise ConfigError(str(exc)) from None
    return AlignStepOptions(dtype, tp, pp, seq_len, prompt, tuple(modes), probe,
                            tuple(positions) if positions is not None else None, thresholds)


def _mcore_under_test(ctx: GateContext, dtype: str) -> tuple[Path | None, str | None]:
    """(checkpoint, None) to align; (None, None) to let align convert; (None, why) to skip."""
    from ...align.runner import DTYPES

    if ctx.config.source.mcore is not None:
        return ctx.config.source.mcore, None
    if not ctx.candidates:
        return None, None
    made = [c for c in ctx.candidates if c.path is not None]
    if not made:
        return None, "no MCore checkpoint to align: every conversion failed"
    fit = [c for c in made if c.ckpt_format == "torch_dist" and c.dtype == DTYPES[dtype]]
    return (fit[0].path, None) if fit else (None, None)


@step("align", parse)
def run(ctx: GateContext, opts: AlignStepOptions) -> list[Check]:
    from ...align.report import write_report
    from ...align.runner import AlignOptions, run_alignment

    mcore, skip = _mcore_under_test(ctx, opts.dtype)
    if skip:
        return [Check("align", "run", SKIP, skip)]
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")  # megatron's fp32-weight norm, every call
    result = run_alignment(AlignOptions(
        preset=ctx.preset, hf=ctx.hf, mcore=mcore, seq_len=opts.seq_len, prompt=opts.prompt, dtype=opts.dtype,
        tp=opts.tp, pp=opts.pp, modes=opts.modes, probe=opts.probe, probe_positions=opts.probe_positions,
        work_dir=ctx.work / "align"))
    assert opts.thresholds is not None
    verdicts = evaluate(result.rows, opts.thresholds, list(result.meta["modes"]), result.num_layers, result.routing)
    paths = write_report(result, ctx.report_dir / "align", verdicts)
    ctx.files["align_report"] = str(paths["report"])
    if not verdicts:
        raise CkptBridgeError("align: no threshold applied to any measured point (check align.thresholds)")
    return [Check.from_align(c) for c in verdicts]
