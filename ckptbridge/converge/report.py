"""``reports/<run>/`` of a convergence run: report.md, summary.json, losses.csv, junit.xml, loss_curves.png."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402

from ..harness.junit import JUnitCase, write_junit_cases  # noqa: E402
from .runner import ConvergeResult, Curve  # noqa: E402
from .verdict import envelope  # noqa: E402


def _envelope(result: ConvergeResult) -> list[float] | None:
    env = next((c for c in result.curves if c.variant.role == "envelope"), None)
    return envelope(result.curve("baseline").losses, env.losses) if env is not None else None


def plot_curves(result: ConvergeResult, path: Path) -> Path:
    """Loss per step (baseline bold, tolerance band shaded, resumes dashed) and each variant minus baseline."""
    base = result.curve("baseline")
    steps = [r["step"] for r in base.rows]
    env = _envelope(result) or [0.0] * len(steps)
    band = [max(result.options.rtol * abs(b), e) for b, e in zip(base.losses, env)]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 8), sharex=True, height_ratios=[3, 2])
    top.fill_between(steps, [b - w for b, w in zip(base.losses, band)], [b + w for b, w in zip(base.losses, band)],
                     color="grey", alpha=0.25, label=f"baseline ± max(rtol {result.options.rtol:g}, envelope)")
    bottom.fill_between(steps, [-w for w in band], band, color="grey", alpha=0.25)
    for c in result.curves:
        is_base = c.variant.name == "baseline"
        style: dict[str, Any] = {"color": "black", "linewidth": 2.2} if is_base else {"linewidth": 1.2}
        label = c.variant.name + (" (emulated)" if c.fp8 and "emulated" in c.fp8 else "")
        line, = top.plot(steps[: len(c.losses)], c.losses, label=label, **style)
        if not is_base:
            bottom.plot(steps[: len(c.losses)], [x - b for x, b in zip(c.losses, base.losses)], color=line.get_color(),
                        linewidth=1.2)
        if c.resumed:
            rs = [r["step"] for r in c.resumed]
            top.plot(rs, [r["loss"] for r in c.resumed], linestyle="--", color=line.get_color(), linewidth=1.0,
                     label=f"{c.variant.name} resumed at {rs[0]}")
            bottom.plot(rs, [r["loss"] - base.losses[s] for r, s in zip(c.resumed, rs)], linestyle="--",
                        color=line.get_color(), linewidth=1.0)
    top.set_ylabel("lm loss")
    top.set_title(f"{result.meta.get('source', '')[:90]}\n{result.meta['dtype']} on {result.meta['device']}", fontsize=9)
    top.legend(fontsize=7, loc="upper right")
    top.grid(True, alpha=0.3)
    bottom.set_ylabel("loss - baseline")
    bottom.set_xlabel("step")
    bottom.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _row(c: Curve, base: Curve) -> str:
    rel = max((abs(x - b) / abs(b) for x, b in zip(c.losses, base.losses) if b), default=0.0)
    impl = c.implementation + (f"; {c.fp8}" if c.fp8 else "")
    return (f"| {c.variant.name} | {c.variant.description} | {impl} | {c.losses[0]:.4f} | {c.losses[-1]:.4f} | "
            f"{rel:.3g} |")


def markdown(result: ConvergeResult, command: str | None) -> str:
    m = result.meta
    base = result.curve("baseline")
    lines = [
        f"# Convergence: {'PASSED' if result.passed else 'FAILED'}",
        "",
        f"- weights: {m['source']}",
        f"- data: {m['data']}",
        f"- measured on: {m['device']}, {m['dtype']}, torch {m['versions']['torch']}, megatron-core "
        f"{m['versions']['megatron-core']}; TP {m['tp']} x PP {m['pp']}",
        f"- {m['steps']} steps, lr {m['lr']:g} (warmup {m['warmup']}), {m['num_microbatches']} x {m['micro_batch_size']} "
        f"sequences of {m['seq_len']} tokens per step; resume checks save at step {m['resume_at']}",
        f"- curve tolerance: per step max(rtol {m['rtol']:g} x |baseline|, envelope = largest |baseline - {m['envelope']}| within 2 steps); "
        f"resume tolerance {m['resume_rtol']:g} relative",
    ]
    if command:
        lines.append(f"- command: `{command}`")
    lines += [f"- note: {n}" for n in m["notes"]]
    lines += ["", "## Verdicts", "", "| | variant | check | detail |", "|---|---|---|---|"]
    lines += [f"| {'PASS' if v.passed else '**FAIL**'} | {v.variant} | {v.check} | {v.detail} |" for v in result.verdicts]
    lines += ["", "## Runs", "", "| variant | what | ran as | first loss | last loss | max rel. diff to baseline |",
              "|---|---|---|---|---|---|"]
    lines += [_row(c, base) for c in result.curves]
    fp8 = [c for c in result.curves if c.fp8_stats]
    for c in fp8:
        stats = ", ".join(f"{k} {v:.3g}" for k, v in c.fp8_stats.items())
        lines += ["", f"FP8 statistics of `{c.variant.name}` (last step): {stats}"]
    lines += ["", "![loss curves](loss_curves.png)", ""]
    return "\n".join(lines)


def summary(result: ConvergeResult, command: str | None) -> dict[str, Any]:
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return clean({
        "passed": result.passed, "command": command, "meta": result.meta,
        "verdicts": [v.as_dict() for v in result.verdicts],
        "runs": {c.variant.name: {"description": c.variant.description, "implementation": c.implementation,
                                  "fp8": c.fp8, "fp8_stats": c.fp8_stats, "rows": c.rows, "resumed": c.resumed}
                 for c in result.curves},
    })


def write_report(result: ConvergeResult, out_dir: Path, command: str | None = None) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"report": out_dir / "report.md", "summary": out_dir / "summary.json", "csv": out_dir / "losses.csv",
             "junit": out_dir / "junit.xml", "plot": out_dir / "loss_curves.png"}
    plot_curves(result, paths["plot"])
    paths["report"].write_text(markdown(result, command))
    paths["summary"].write_text(json.dumps(summary(result, command), indent=2) + "\n")
    with paths["csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "run", "step", "loss", "grad_norm", "lr", "seconds"])
        for c in result.curves:
            for run, rows in (("main", c.rows), ("resumed", c.resumed or [])):
                for r in rows:
                    w.writerow([c.variant.name, run, r["step"], r["loss"], r["grad_norm"], r["lr"], f"{r['seconds']:.3f}"])
    cases = [JUnitCase(v.variant, v.check, v.passed, v.detail) for v in result.verdicts]
    write_junit_cases(cases, paths["junit"], "ckptbridge-converge", "converge", "ConvergenceCheckFailed",
                      float(result.meta.get("seconds", 0.0)))
    return paths
