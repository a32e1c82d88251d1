"""Checks and what the gate writes about them: console lines, ``summary.json``, ``junit.xml``.

A gate check is wider than an alignment :class:`ckptbridge.align.gate.Check` (which is always a
metric against a limit): a conversion either works or fails with the converter's message, and a
check whose input never came to be is *skipped*, not failed twice.  The JUnit XML is written by
align's own writer (:func:`ckptbridge.align.gate.write_junit_cases`), so both commands produce
the same shape of report for CI.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..align.gate import ThresholdCheck
from ..harness.junit import JUnitCase, write_junit_cases

PASS, FAIL, SKIP = "pass", "fail", "skip"


@dataclass
class Check:
    """One verdict of one step; becomes one JUnit test case (classname = step)."""

    step: str
    name: str
    status: str  # PASS | FAIL | SKIP
    message: str  # "value vs limit" when passed or failed on a metric, the error when a step failed, why when skipped
    value: float | None = None
    limit: float | None = None
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    @classmethod
    def from_align(cls, c: ThresholdCheck) -> Check:
        return cls("align", c.name, PASS if c.passed else FAIL, c.message, c.value, c.limit)


@dataclass
class GateResult:
    config: Path
    checks: list[Check] = field(default_factory=list)
    step_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not any(c.failed for c in self.checks)

    def counts(self) -> dict[str, int]:
        return {s: sum(c.status == s for c in self.checks) for s in (PASS, FAIL, SKIP)}


def check_line(c: Check) -> str:
    return f"{c.status.upper():4s} {c.step}/{c.name}: {c.message}"


def verdict_line(result: GateResult) -> str:
    n = result.counts()
    total = len(result.checks)
    if result.passed:
        return f"gate: PASSED ({n[PASS]}/{total} checks passed{f', {n[SKIP]} skipped' if n[SKIP] else ''}) in {result.seconds:.1f} s"
    failed = [f"{c.step}/{c.name}" for c in result.checks if c.failed]
    shown = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
    return f"gate: FAILED ({n[FAIL]} of {total} checks failed: {shown}) in {result.seconds:.1f} s"


def _finite(v: float | None) -> float | str | None:
    """JSON has no NaN/inf: those become strings rather than invalid JSON."""
    return v if v is None or math.isfinite(v) else str(v)


def summary(result: GateResult, source: dict[str, Any], steps: dict[str, Any]) -> dict[str, Any]:
    return {
        "passed": result.passed,
        "verdict": verdict_line(result),
        "config": str(result.config),
        "source": source,
        "steps": [{"name": name, "options": options, "seconds": round(result.step_seconds.get(name, 0.0), 2),
                   "passed": not any(c.failed for c in result.checks if c.step == name)}
                  for name, options in steps.items()],
        "counts": result.counts(),
        "checks": [{**asdict(c), "value": _finite(c.value), "limit": _finite(c.limit), "seconds": round(c.seconds, 2)}
                   for c in result.checks],
        "seconds": round(result.seconds, 2),
        "files": result.files,
    }


def write_summary(data: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(data, indent=1, default=_jsonable, allow_nan=False) + "\n")


def _jsonable(o: Any) -> Any:
    """Paths and dtypes in the echoed options; anything else is a bug worth a TypeError."""
    if isinstance(o, Path):
        return str(o)
    if type(o).__module__ == "torch":
        return str(o).replace("torch.", "")
    raise TypeError(f"not JSON serialisable: {o!r}")


def write_junit(result: GateResult, path: Path) -> None:
    cases = [JUnitCase(c.step, c.name, not c.failed, c.message, skipped=c.status == SKIP, seconds=c.seconds)
             for c in result.checks]
    write_junit_cases(cases, path, "ckptbridge-gate", f"gate:{result.config.name}", "GateCheckFailed", result.seconds)
