"""PNG plots of the error per point: one line per setting, and propagated vs isolated per setting.

Exact agreement (error 0) cannot sit on a log axis; it is drawn at :data:`FLOOR` and said so in
the axis label.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from . import points as P  # noqa: E402
from .runner import BASELINE, AlignResult  # noqa: E402

FLOOR = 1e-12


def _floor(df: pd.DataFrame) -> float:
    """Where exact zeros are drawn: a decade below the smallest non-zero error (at most 1e-3)."""
    nz = df.loc[df["rel_err"] > 0, "rel_err"]
    return min(1e-3, float(nz.min()) / 10) if len(nz) else FLOOR


def _series(df: pd.DataFrame, setting: str, mode: str, position: int, kinds: tuple[str, ...],
            floor: float = FLOOR) -> tuple[list[str], list[float]]:
    sub = df[(df["setting"] == setting) & (df["mode"] == mode) & (df["position"] == position)]
    sub = sub[sub["kind"].isin(kinds) | (sub["layer"] < 0)]
    order = {name: i for i, name in enumerate(sub["point"])}
    labels = sorted(order, key=order.get)
    vals = [max(float(sub[sub["point"] == n]["rel_err"].iloc[0]), floor) for n in labels]
    return [n.replace(".output", "") for n in labels], vals


def error_vs_layer(result: AlignResult, path: Path, mode: str = "propagated") -> Path:
    """Relative error of each layer's output (plus embedding, final norm, logits), one line per setting."""
    df = pd.DataFrame(result.rows)
    if mode not in set(df["mode"]):
        mode = "isolated"
    floor = _floor(df)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.6 * result.num_layers + 5), 5.0))
    for s in result.settings:
        labels, vals = _series(df, s.name, mode, 0, ("output",), floor)
        style = {"linewidth": 2.5, "color": "black"} if s.name == BASELINE else {"linewidth": 1.2}
        ax.plot(labels, vals, marker="o", markersize=3, label=s.name + (" (emulated)" if "emulated" in s.implementation else ""), **style)
    ax.set_yscale("log")
    ax.set_ylabel(f"relative Frobenius error vs HF (0 drawn at {floor:.0e})")
    ax.set_title(f"{result.meta.get('preset') or result.meta.get('architecture')} {result.meta['dtype']}: error per layer ({mode})")
    ax.tick_params(axis="x", rotation=60)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def propagated_vs_isolated(result: AlignResult, path: Path) -> Path:
    """Small multiples: for each setting, the error at every point in both modes."""
    df = pd.DataFrame(result.rows)
    n = len(result.settings)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, sharey=True)
    kinds = P.LAYER_POINTS
    floor = _floor(df)
    for ax, s in zip(axes.flat, result.settings):
        for mode, color in (("propagated", "tab:red"), ("isolated", "tab:blue")):
            if mode in set(df[df["setting"] == s.name]["mode"]):
                labels, vals = _series(df, s.name, mode, 0, kinds, floor)
                ax.plot(range(len(vals)), vals, color=color, marker=".", markersize=3, linewidth=1, label=mode)
        ax.set_yscale("log")
        ax.set_title(s.name + (" *" if "emulated" in s.implementation else ""), fontsize=9)
        ax.set_xlabel("point (embedding ... layers ... logits)", fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    axes.flat[0].set_ylabel(f"relative error vs HF (0 at {floor:.0e})", fontsize=8)
    fig.suptitle("propagated (own state) vs isolated (HF input per layer); * = emulated", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def probe_plot(result: AlignResult, path: Path) -> Path | None:
    """Logit error vs probe position for the settings that ran the long-position probe."""
    df = pd.DataFrame(result.rows)
    lg = df[(df["point"] == P.LOGITS) & (df["mode"].isin(["probe", "propagated" if "propagated" in set(df["mode"]) else "isolated"]))]
    probed = [s for s in result.settings if s.probed]
    if not result.probe_positions or not probed:
        return None
    floor = _floor(lg)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in probed:
        sub = lg[lg["setting"] == s.name].sort_values("position")
        ax.plot(sub["position"], [max(v, floor) for v in sub["rel_err"]], marker="o",
                label=s.name, linewidth=2.5 if s.name == BASELINE else 1.2)
    ax.set_yscale("log")
    ax.set_xlabel("probe position P (second half of the sample at P..)")
    ax.set_ylabel(f"logits relative error vs HF (0 at {floor:.0e})")
    ax.set_title("long-position probe (RoPE at large positions)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
