"""Write ``reports/<run>/``: report.md (from ``reports/templates/align_report.md``), metrics.csv,
ablations.csv, summary.json, junit.xml and the PNG plots."""

from __future__ import annotations

import json
import math
import string
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from . import plots
from .gate import ThresholdCheck, checks_json, write_junit
from .routing_report import routing_plot, routing_section, skipped_section
from .runner import BASELINE, AlignResult
from .table import ablation_table, contribution_basis, display_table, markdown


#: Contributions smaller than this (in either direction) are reported as "same error level".
NOISE = 0.01


def template_path() -> Path:
    here = Path(__file__).resolve()
    packaged = here.parents[1] / "_data" / "reports" / "templates" / "align_report.md"
    return packaged if packaged.exists() else here.parents[2] / "reports" / "templates" / "align_report.md"


def _facts(result: AlignResult, command: str | None) -> str:
    m = result.meta
    rows = [
        ("command", f"`{command}`" if command else "-"),
        ("preset", f"{m.get('preset') or '-'} ({m.get('hub_id') or 'no hub id'})"),
        ("architecture", f"{m['architecture']}, {m['num_layers']} layers, hidden {m['hidden_size']}, vocab {m['vocab_size']}"),
        ("HF weights", m["hf_weights"]),
        ("MCore weights", m["mcore_weights"]),
        ("rope scaling in the HF config", f"`{json.dumps(m.get('rope_scaling'))}`"),
        ("token ids", f"{m['tokens']} (first ids: {m['token_ids_head']})"),
        ("dtype", m["dtype"]),
        ("device", m["environment"]["device"]),
        ("MCore layout", f"TP={m['tp']} PP={m['pp']}" + (" (gloo worker processes)" if m["tp"] * m["pp"] > 1 else " (in-process gloo, world size 1)")),
        ("modes", ", ".join(m["modes"]) + (" (layer-streaming, --layerwise)" if m["layerwise"] else "")),
        ("HF attention (baseline)", m.get("hf_attention", "-") + (f" ({m['hf_attention_note']})" if m.get("hf_attention_note") else "")),
        ("HF inv_freq dtype", m.get("hf_inv_freq_dtype", "-")),
        ("settings", ", ".join(s.name for s in result.settings)),
        ("skipped (not applicable)", ", ".join(s.name for s in result.skipped) or "none"),
        ("emulated variants", ", ".join(s.name for s in result.settings if "emulated" in s.implementation) or "none"),
        ("wall time", f"{m.get('seconds', '?')} s"),
    ]
    return "\n".join(f"- **{k}**: {v}" for k, v in rows)


def _environment(result: AlignResult) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in result.meta["environment"].items())


def _gate(checks: list[ThresholdCheck]) -> str:
    if not checks:
        return "No checks were evaluated."
    failed = [c for c in checks if not c.passed]
    head = (f"**FAILED**: {len(failed)} of {len(checks)} checks." if failed else f"**PASSED**: all {len(checks)} checks.")
    df = pd.DataFrame([{"check": c.name, "threshold": c.metric, "value": c.value, "limit": c.limit,
                        "result": "pass" if c.passed else "FAIL", "worst point": c.where} for c in checks])
    return head + " Thresholds apply to the baseline setting.\n\n" + markdown(df, ".4g")


def rope_words(meta: dict[str, Any]) -> str:
    """This checkpoint's RoPE in words, for the ``{rope}`` placeholder of recipe texts: a sentence
    about rope scaling must be true for the model at hand (issue 11: "megatron's fixed llama3
    parameters match" was printed for a model without any rope scaling)."""
    rs = meta.get("rope_scaling") or {}
    kind = rs.get("rope_type", rs.get("type", "default")) or "default"
    if kind == "default":
        return "plain RoPE without scaling"
    if kind == "llama3":
        return (f"llama3 scaling, factor {rs.get('factor')}, low/high frequency factors {rs.get('low_freq_factor')}/"
                f"{rs.get('high_freq_factor')}, original length {rs.get('original_max_position_embeddings')}: "
                "megatron's fixed values, which the mapping checks")
    return f"{kind} scaling, factor {rs.get('factor')}"


def _say(text: str, result: AlignResult) -> str:
    """A recipe's why/same_because with its placeholders filled for this model."""
    return text.format_map({"rope": rope_words(result.meta), "dtype": result.meta["dtype"]})


def _ranking(result: AlignResult, table: pd.DataFrame) -> str:
    """The ablation ranking explained in words, from the numbers and each recipe's ``why``."""
    by_name = {s.name: s for s in result.settings}
    base = table.iloc[0]
    rest = table.iloc[1:]
    if rest.empty:
        return ""
    basis = contribution_basis(result)
    out = ["## Ranking, in words", "",
           f"The baseline's logits differ from HF's by a relative error of {base['logits rel_err']:.3g} "
           f"(max abs {base['logits max_abs']:.3g}, KL {base['KL']:.3g}, top-1 agreement {100 * base['top-1']:.1f} %). "
           + ("Settings are ranked by how much of that error they remove." if basis == "logits rel_err" else
              f"Only isolated mode ran, where the logits see nothing but the final norm and output layer, so settings "
              f"are ranked by how much of the mean isolated layer-output error ({base[basis]:.3g}) they remove.")]
    same = rest["identical_to_baseline"]
    helpful = rest[(rest["contribution"] >= NOISE) & ~same]
    identical = rest[same]
    level = rest[(rest["contribution"].abs() < NOISE) & ~same]
    harmful = rest[(rest["contribution"] <= -NOISE) & ~same]
    if len(helpful):
        out += ["", "**Closer to HF:**", ""]
        for i, row in enumerate(helpful.to_dict("records"), 1):
            s = by_name[row["setting"]]
            exact = " -- the logits become bit-identical to HF's" if row[basis] == 0 else ""
            out.append(f"{i}. `{s.name}` ({s.side} side, {s.implementation}) removes {100 * row['contribution']:.1f} %{exact}: {_say(s.why, result)}")
    if len(identical):
        out += ["", "**Bit-identical to the baseline at every point**, so this op is not where HF and MCore differ here:", ""]
        out += [f"- `{r}` ({by_name[r].implementation}): {_say(by_name[r].same_because or by_name[r].why, result)}"
                for r in identical["setting"]]
    if len(level):
        out += ["", f"**Different values, same error level** (within {100 * NOISE:.0f} % of the baseline: another rounding, "
                "neither closer to HF nor further):", ""]
        out += [f"- `{r['setting']}` ({by_name[r['setting']].implementation}, {100 * r['contribution']:+.1f} %): "
                f"{_say(by_name[r['setting']].why, result)}"
                for r in level.to_dict("records")]
    if len(harmful):
        out += ["", "**Further from HF:**", ""]
        for r in harmful.sort_values("contribution", ascending=False).to_dict("records"):
            s = by_name[r["setting"]]
            out.append(f"- `{s.name}` ({s.side} side, {s.implementation}) adds {-100 * r['contribution']:.1f} %: {_say(s.why, result)}")
    hf_order = [s.name for s in result.settings if s.hf_order]
    if hf_order:
        best = rest.iloc[0]["setting"]
        closest = "an HF-order variant" if by_name[best].hf_order else "not an HF-order variant"
        out += ["", f"The setting closest to HF is `{best}` ({closest}). HF-order variants: {', '.join(f'`{n}`' for n in hf_order)}."]
    out += ["", "Single rows do not add up to 100 %: roundings from independent sources add roughly in quadrature "
            "and later layers amplify earlier errors, so removing one source removes less than its share; the "
            "`isolated max` column shows each layer's own error without that accumulation."]
    return "\n".join(out)


def _baseline_table(result: AlignResult) -> str:
    df = pd.DataFrame(result.rows)
    b = df[(df["setting"] == BASELINE) & (df["position"] == 0)]
    cols = ["max_abs", "mean_abs", "rel_err", "cosine"]
    wide = None
    for mode in result.meta["modes"]:
        part = b[b["mode"] == mode].set_index("point")[cols].add_prefix(f"{mode[:4]} ")
        wide = part if wide is None else wide.join(part, how="outer")
    if wide is None:
        return "-"
    order = [p for p in b["point"].drop_duplicates()]
    wide = wide.loc[order].reset_index()
    return markdown(wide, ".3g")


def _probe(result: AlignResult) -> str:
    if not result.probe_positions:
        return "Not run (no probe position fits max_position_embeddings, or --no-probe)."
    df = pd.DataFrame(result.rows)
    lg = df[(df["point"] == "logits") & ((df["mode"] == "probe") | ((df["position"] == 0) & (df["mode"] == result.meta["modes"][0])))]
    lg = lg[lg["setting"].isin([s.name for s in result.settings if s.probed])]
    if "growth" not in lg:
        lg = lg.assign(growth=float("nan"))
    show = lg[["setting", "position", "max_abs", "rel_err", "growth", "cosine", "kl", "top1"]].sort_values(["setting", "position"], kind="stable")
    text = (f"Method: {result.meta['probe_method']}. Row `position` P = 0 is the plain run. A rope-scaling field that one "
            "side ignores (HF's `rope_scaling` vs megatron's fixed llama3 parameters, or a field dropped by a converter) "
            "changes only the low-frequency RoPE channels, which barely rotate over a short prompt; across a distance of "
            "P >= 8k they rotate by O(1) radians, so the error shows here while short prompts agree. `growth` is the error "
            "relative to the plain run's (floored at the dtype's epsilon): about 1 for a correct conversion.\n\n")
    return text + markdown(show, ".4g")


def _plots(files: dict[str, Path | None], root: Path) -> str:
    lines = []
    for title, p in files.items():
        if p is not None:
            lines += [f"### {title}", "", f"![{title}]({p.relative_to(root).as_posix()})", ""]
    return "\n".join(lines)


def write_report(result: AlignResult, out_dir: Path, checks: list[ThresholdCheck], command: str | None = None) -> dict[str, Path]:
    """Write every artefact into ``out_dir`` (created); returns name -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_dir = out_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    table = ablation_table(result)
    paths = {"metrics_csv": out_dir / "metrics.csv", "ablations_csv": out_dir / "ablations.csv",
             "summary_json": out_dir / "summary.json", "junit": out_dir / "junit.xml", "report": out_dir / "report.md"}
    pd.DataFrame(result.rows).to_csv(paths["metrics_csv"], index=False)
    if result.routing:
        paths["routing_csv"] = out_dir / "routing.csv"
        pd.DataFrame(result.routing).to_csv(paths["routing_csv"], index=False)
    table.to_csv(paths["ablations_csv"], index=False)
    figures = {
        "Error vs layer, every setting (propagated)": plots.error_vs_layer(result, plot_dir / "error_vs_layer.png"),
        "Propagated vs isolated, per setting": plots.propagated_vs_isolated(result, plot_dir / "propagated_vs_isolated.png"),
        "Long-position probe": plots.probe_plot(result, plot_dir / "probe.png"),
        "MoE routing agreement and expert load": routing_plot(result, plot_dir / "routing.png"),
    }
    suite = f"ckptbridge.align.{result.meta.get('preset') or 'model'}.{result.meta['dtype']}"
    write_junit(checks, paths["junit"], suite, float(result.meta.get("seconds", 0.0)))
    summary = {"meta": result.meta, "command": command, "settings": [asdict(s) for s in result.settings],
               "skipped": [asdict(s) for s in result.skipped], "routing": result.routing,
               "ablation_table": json.loads(table.to_json(orient="records")),
               "gate": {"passed": all(c.passed for c in checks), "checks": checks_json(checks)},
               "rows": result.rows}
    paths["summary_json"].write_text(json.dumps(_clean(summary), indent=1, default=_json_default, allow_nan=False) + "\n")
    for name, p in figures.items():
        if p is not None:
            paths[f"plot:{p.stem}"] = p
    failed = [c for c in checks if not c.passed]
    verdict = (f"**Gate: FAILED** ({len(failed)} of {len(checks)} checks): " + "; ".join(f"{c.name} {c.message}" for c in failed[:5])
               if failed else f"**Gate: PASSED** ({len(checks)} checks).")
    files = "\n".join(f"- `{p.relative_to(out_dir).as_posix()}`" for p in paths.values())
    text = string.Template(template_path().read_text()).substitute(
        title=f"{result.meta.get('preset') or result.meta['architecture']}, {result.meta['dtype']}, {result.meta['environment']['device']}",
        verdict=verdict, run_facts=_facts(result, command), environment=_environment(result), gate=_gate(checks),
        ablation_table=markdown(display_table(result)), ranking=_ranking(result, table),
        baseline_table=_baseline_table(result), probe=_probe(result), plots=_plots(figures, out_dir), files=files,
        routing=routing_section(result), skipped=skipped_section(result))
    paths["report"].write_text(text)
    return paths


def _clean(o: Any) -> Any:
    """JSON has no NaN/inf: they become null."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    return str(o)  # Path, torch.dtype, ...

