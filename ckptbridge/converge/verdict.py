"""Verdicts on loss curves: variant vs baseline, resumed vs uninterrupted, step 0 vs HF, loss falls.

A variant's curve is judged against a per-step band ``max(rtol * |baseline|, envelope)``, where the
envelope is the distance between the baseline and the same run on another batch order (its largest value
within two steps): Megatron-LM's
functional tests use ``rtol = 0.05`` alone; the envelope widens the band where the data noise is larger
than that.  Like those tests a few steps may fall outside: ``min(max(N // 100, 1), 50)``.

Resumes are judged much tighter (``resume_rtol``): the continued run must reproduce the uninterrupted
curve.  On CPU that is bit-exact; a dropped optimizer state (Megatron-LM #862's class of bug) moves
the loss by ~0.5-1 % within a few steps, well outside ``1e-3``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_RTOL = 0.05
DEFAULT_RESUME_RTOL = 1e-3
#: |MCore loss - HF loss| on the first batch, per dtype (the alignment tolerances of numerics.md, on a loss)
STEP0_ATOL = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 2e-2}


@dataclass(frozen=True)
class Verdict:
    """One pass/fail judgement; becomes one JUnit test case and one report row."""

    variant: str
    check: str  # curve | resume | step0 | falls
    passed: bool
    value: float
    limit: float
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'} {self.variant}.{self.check}: {self.detail}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def allowed_failures(n: int) -> int:
    """Megatron-LM's functional tests: ``min(max(N // 100, 1), 50)`` steps may miss the tolerance."""
    return min(max(n // 100, 1), 50)


#: steps on each side of a step whose baseline-vs-baseline distance sets its envelope
ENVELOPE_HALF_WIDTH = 2


def envelope(baseline: list[float], other: list[float], half_width: int = ENVELOPE_HALF_WIDTH) -> list[float]:
    """The noise level at each step: the largest |baseline - other| within ``half_width`` steps.

    The two runs see different batches, so their distance jumps from step to step and is near 0 wherever
    the curves happen to cross; the noise level itself changes smoothly with training, so a crossing must
    not make a narrow tolerance."""
    d = [abs(a - b) for a, b in zip(baseline, other)]
    return [max(d[max(0, i - half_width): i + half_width + 1]) for i in range(len(d))]


def judge_curve(name: str, baseline: list[float], curve: list[float], env: list[float] | None,
                rtol: float = DEFAULT_RTOL) -> Verdict:
    """Worst ratio ``|curve - baseline| / band`` over the steps, after dropping the allowed misses."""
    if len(curve) != len(baseline):
        return Verdict(name, "curve", False, float("inf"), 1.0, f"{len(curve)} steps vs baseline's {len(baseline)}")
    env = env or [0.0] * len(baseline)
    ratios = []
    for b, c, e in zip(baseline, curve, env):
        band = max(rtol * abs(b), e)
        ratios.append(abs(c - b) / band if band > 0 else (0.0 if c == b else float("inf")))
    misses = sorted(ratios, reverse=True)
    k = allowed_failures(len(ratios))
    worst_counted = misses[k] if len(misses) > k else 0.0
    rel = max(abs(c - b) / abs(b) for b, c in zip(baseline, curve) if b != 0)
    outside = sum(r > 1 for r in ratios)
    detail = (f"max |loss - baseline| / baseline = {rel:.3g} (rtol {rtol:g}); {outside}/{len(ratios)} steps outside "
              f"max(rtol, envelope), {k} allowed")
    return Verdict(name, "curve", worst_counted <= 1.0, worst_counted, 1.0, detail)


def judge_resume(name: str, uninterrupted: list[float], resumed: list[float], start: int,
                 rtol: float = DEFAULT_RESUME_RTOL) -> Verdict:
    """The resumed run's steps ``start..`` against the same steps of the uninterrupted run."""
    ref = uninterrupted[start:]
    if len(resumed) != len(ref) or not ref:
        return Verdict(name, "resume", False, float("inf"), rtol, f"{len(resumed)} resumed steps vs {len(ref)} expected")
    rel = [abs(r - u) / max(abs(u), 1e-12) for u, r in zip(ref, resumed)]
    worst = max(rel)
    at = start + rel.index(worst)
    detail = (f"resumed at step {start}: max relative difference to the uninterrupted run {worst:.3g} at step {at} "
              f"(limit {rtol:g})")
    return Verdict(name, "resume", worst <= rtol, worst, rtol, detail)


def judge_step0(mcore_loss: float, hf_loss: float, dtype: str, atol: float | None = None,
                padded: float | None = None) -> Verdict:
    """``mcore_loss`` over the real vocabulary; ``padded`` (reported, not judged) is megatron's training loss,
    whose softmax also spans the padded vocabulary rows."""
    atol = STEP0_ATOL[dtype] if atol is None else atol
    diff = abs(mcore_loss - hf_loss)
    detail = f"MCore {mcore_loss:.6f} vs HF {hf_loss:.6f} on the first batch: |diff| {diff:.3g} (limit {atol:g}, {dtype})"
    if padded is not None and abs(padded - mcore_loss) > atol:
        detail += f"; megatron's training loss {padded:.6f} also spans the padded vocabulary rows"
    return Verdict("baseline", "step0", diff <= atol, diff, atol, detail)


def judge_falls(name: str, curve: list[float]) -> Verdict:
    """Mean of the last tenth of the steps below the mean of the first tenth."""
    k = max(1, len(curve) // 10)
    first, last = sum(curve[:k]) / k, sum(curve[-k:]) / k
    drop = 1.0 - last / first if first else 0.0
    detail = f"loss {first:.4f} (first {k} steps) -> {last:.4f} (last {k}): {100 * drop:.1f} % lower"
    return Verdict(name, "falls", drop > 0.0, drop, 0.0, detail)
