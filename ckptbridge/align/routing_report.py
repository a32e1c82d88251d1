"""report.md sections for MoE routing agreement and for the ablations that were skipped, and the
routing plot (agreement per MoE layer; expert load HF vs MCore at the worst layer)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .routing import unmeasured_layers  # noqa: E402
from .runner import BASELINE, AlignResult  # noqa: E402
from .table import markdown  # noqa: E402

COLUMNS = {"layer": "MoE layer", "mode": "mode", "position": "position", "router_logits_max_abs": "router logits max_abs",
           "router_logits_rel_err": "router logits rel_err", "topk_agreement": "top-k agreement",
           "mismatched_tokens": "tokens with other experts", "rank_flips": "rank flips",
           "load_max_diff": "load max diff", "first_mismatches": "first mismatches (batch:token hf[...] mc[...])"}


def routing_frame(result: AlignResult) -> pd.DataFrame:
    return pd.DataFrame(result.routing)


def routing_section(result: AlignResult) -> str:
    """The baseline's routing per MoE layer and pass, plus the worst agreement of every other setting."""
    df = routing_frame(result)
    if df.empty:
        return ("No MoE layer in this model (or no router recorded)." if not result.meta.get("moe")
                else "MoE layers were present but no router output was recorded on both sides.")
    missing = unmeasured_note(result)
    if "topk_agreement" not in df:
        return missing
    df = df[df["topk_agreement"].notna()]
    base = df[df["setting"] == BASELINE]
    cols = [c for c in COLUMNS if c in base.columns]
    text = ("Per MoE layer and pass: the router logits' error, **top-k agreement** (share of tokens whose set of "
            "chosen experts is identical on both sides), **rank flips** (same experts, different order by combine "
            "weight) and the largest difference of any expert's load (tokens routed to it). A token routed to other "
            "experts moves that token's hidden state far while the layer's average error barely changes, so this is "
            "gated separately (`routing.min_routing_agreement`). Expert loads of every pass are in `routing.csv`.\n\n")
    text += markdown(base[cols].rename(columns=COLUMNS), ".3g")
    others = df[df["setting"] != BASELINE]
    if len(others) and "topk_agreement" in others:
        worst = others.groupby("setting")["topk_agreement"].min().reset_index()
        text += "\n\nWorst top-k agreement of the other settings (any layer, any pass):\n\n" + markdown(
            worst.rename(columns={"topk_agreement": "min top-k agreement"}), ".4g")
    bad = base[base["topk_agreement"] < 1.0] if "topk_agreement" in base else base.iloc[0:0]
    if len(bad):
        layers = ", ".join(f"layer {int(layer)}" for layer in sorted(bad["layer"].unique()))
        text += (f"\n\n**Routing differs** at {layers}: the tokens listed above go to other experts in MCore than in HF. "
                 "Typical causes: a dropped or mis-mapped expert-score bias (`e_score_correction_bias`), permuted "
                 "experts, a different score function or group-limited top-k, router math in another dtype.")
    return text + ("\n\n" + missing if missing else "")


def unmeasured_note(result: AlignResult) -> str:
    """One line naming the MoE layers whose routing was not measured (no HF router recorded), and why."""
    layers = unmeasured_layers(result.routing)
    if not layers:
        return ""
    return (f"**Routing not measured** at MoE layer(s) {', '.join(map(str, layers))}: MCore has a router there, "
            f"HF recorded none; {result.meta.get('hf_router') or 'no HF router module is known'}.")


def skipped_section(result: AlignResult) -> str:
    lines = []
    if result.meta.get("hf_attention_note"):
        lines.append(f"- HF attention: {result.meta['hf_attention_note']}.")
    lines += [f"- `{s.name}` skipped: {s.skipped}." for s in result.skipped]
    return "\n".join(lines) if lines else "Every requested ablation applied to this model."


def routing_plot(result: AlignResult, path: Path) -> Path | None:
    """Left: top-k agreement per MoE layer (baseline, each mode); right: expert load at the worst layer."""
    df = routing_frame(result)
    if df.empty or "topk_agreement" not in df:
        return None
    df = df[df["topk_agreement"].notna()]
    base = df[(df["setting"] == BASELINE) & (df["position"] == 0)]
    if base.empty:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    modes = list(base["mode"].drop_duplicates())
    width = 0.8 / max(len(modes), 1)
    for j, mode in enumerate(modes):
        sub = base[base["mode"] == mode]
        ax1.bar([x + j * width for x in range(len(sub))], sub["topk_agreement"], width, label=mode)
        ax1.set_xticks([x + width * (len(modes) - 1) / 2 for x in range(len(sub))], [f"L{int(v)}" for v in sub["layer"]])
    ax1.set_ylim(min(0.9, float(base["topk_agreement"].min()) - 0.02), 1.005)
    ax1.set_ylabel("top-k set agreement (share of tokens)")
    ax1.set_title("Routing agreement HF vs MCore, baseline")
    ax1.legend()
    worst = base.sort_values(["topk_agreement", "load_max_diff"], ascending=[True, False]).iloc[0]
    hf = [int(v) for v in str(worst["load_hf"]).split()]
    mc = [int(v) for v in str(worst["load_mcore"]).split()]
    xs = range(len(hf))
    ax2.bar([x - 0.2 for x in xs], hf, 0.4, label="HF")
    ax2.bar([x + 0.2 for x in xs], mc, 0.4, label="MCore")
    ax2.set_xlabel("expert")
    ax2.set_ylabel("tokens routed")
    ax2.set_title(f"Expert load, layer {int(worst['layer'])} ({worst['mode']})")
    ax2.legend()
    if len(hf) > 32:
        ax2.set_xticks([x for x in xs if x % math.ceil(len(hf) / 16) == 0])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
