"""The ablation table (one row per setting) and its ranking, computed with pandas from the rows.

``contribution`` is the share of the baseline's logit error (relative Frobenius error, propagated
mode; see :func:`contribution_basis` for isolated-only runs) that a setting removes: 100 % means the setting makes the logits identical to HF's, 0 %
changes nothing, negative values add error.  Errors from independent roundings add roughly in
quadrature and are amplified by later layers, so single contributions do not sum to 100 %.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from .runner import BASELINE, AlignResult

#: Per-layer columns shown in report.md (all layers go to the CSV).
MAX_LAYER_COLUMNS = 8


def frame(result: AlignResult) -> pd.DataFrame:
    """All metric rows as a DataFrame."""
    return pd.DataFrame(result.rows)


def _layer_columns(num_layers: int) -> list[int]:
    if num_layers <= MAX_LAYER_COLUMNS:
        return list(range(num_layers))
    step = math.ceil(num_layers / (MAX_LAYER_COLUMNS - 1))
    return sorted(set(range(0, num_layers, step)) | {num_layers - 1})


def ablation_table(result: AlignResult, all_layers: bool = True) -> pd.DataFrame:
    """One row per setting: per-layer output error (propagated), worst isolated layer error, logit
    metrics, contribution; sorted baseline first, then by contribution (largest first)."""
    df = frame(result)
    main = df[df["position"] == 0]
    layers = list(range(result.num_layers)) if all_layers else _layer_columns(result.num_layers)
    records: list[dict[str, Any]] = []
    for s in result.settings:
        rows = main[main["setting"] == s.name]
        rec: dict[str, Any] = {"setting": s.name, "side": s.side, "implementation": s.implementation,
                               "hf_order": s.hf_order}
        prop, iso = rows[rows["mode"] == "propagated"], rows[rows["mode"] == "isolated"]
        per_layer = prop if len(prop) else iso  # isolated-only runs (--layerwise) show isolated errors here
        outs = per_layer[per_layer["kind"] == "output"].set_index("layer")["rel_err"]
        for i in layers:
            rec[f"L{i} rel_err"] = float(outs.get(i, math.nan))
        iso_out = iso[iso["kind"] == "output"]["rel_err"]
        rec["isolated max layer rel_err"] = float(iso_out.max()) if len(iso_out) else math.nan
        rec["isolated mean layer rel_err"] = float(iso_out.mean()) if len(iso_out) else math.nan
        logits = (prop if len(prop) else iso)
        lg = logits[logits["point"] == "logits"]
        lg = lg.iloc[0] if len(lg) else None
        for col, key in (("logits rel_err", "rel_err"), ("logits max_abs", "max_abs"), ("logits cosine", "cosine"),
                         ("KL", "kl"), ("top-1", "top1"), ("loss delta", "loss_delta")):
            rec[col] = float(lg[key]) if lg is not None else math.nan
        records.append(rec)
    table = pd.DataFrame(records)
    basis = contribution_basis(result)
    base = float(table.loc[table["setting"] == BASELINE, basis].iloc[0])
    table["contribution"] = [(base - v) / base if base > 0 else (0.0 if v == 0 else -math.inf)
                             for v in table[basis]]
    table["identical_to_baseline"] = [_identical(df, s.name) for s in result.settings]
    rest = table[table["setting"] != BASELINE].sort_values(["contribution", "setting"], ascending=[False, True], kind="stable")
    return pd.concat([table[table["setting"] == BASELINE], rest], ignore_index=True)


def contribution_basis(result: AlignResult) -> str:
    """The error a contribution is a share of: the propagated logits' when propagated mode ran;
    in isolated-only runs the logits see only the final norm and output layer, so the mean
    isolated layer-output error is used instead."""
    return "logits rel_err" if "propagated" in result.meta["modes"] else "isolated mean layer rel_err"


def _identical(df: pd.DataFrame, name: str) -> bool:
    """Every metric at every point and mode equals the baseline's (bit-identical outputs)."""
    if name == BASELINE:
        return True
    cols = ["mode", "position", "point", "max_abs", "mean_abs", "rel_err"]
    a = df[(df["setting"] == BASELINE) & (df["position"] == 0)][cols].reset_index(drop=True)
    b = df[(df["setting"] == name) & (df["position"] == 0)][cols].reset_index(drop=True)
    return len(a) == len(b) and bool((a == b).all().all())


def markdown(df: pd.DataFrame, floatfmt: str = ".3g") -> str:
    """A GitHub-flavoured markdown table (no extra dependency).  Columns named like ``cosine`` get
    six decimals: at ``.3g`` every cosine of a working conversion would read ``1``."""
    def cell(v: Any, fmt: str) -> str:
        if isinstance(v, bool):
            return "yes" if v else ""
        if isinstance(v, float):
            return "-" if math.isnan(v) else format(v, fmt)
        return str(v).replace("|", "\\|")

    fmts = [".6f" if "cosine" in str(c) else floatfmt for c in df.columns]
    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v, f) for v, f in zip(row, fmts)) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def display_table(result: AlignResult) -> pd.DataFrame:
    """The ablation table as shown in report.md: few layer columns, percentages, short names."""
    t = ablation_table(result, all_layers=False)
    t = t.drop(columns=["identical_to_baseline", "isolated mean layer rel_err"])
    t["contribution"] = [f"{100 * c:+.1f} %" if math.isfinite(c) else "-" for c in t["contribution"]]
    t["top-1"] = [f"{100 * v:.1f} %" if not math.isnan(v) else "-" for v in t["top-1"]]
    t["hf_order"] = t["hf_order"].astype(bool)
    return t.rename(columns={"hf_order": "HF order", "isolated max layer rel_err": "isolated max"})
