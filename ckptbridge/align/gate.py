"""Pass/fail thresholds for CI: a gate file or flags, evaluated on the baseline and the probe.

Defaults per dtype, and where each comes from: fp32 logits max abs <= 1e-4 with
100 % top-1 agreement and KL <= 1e-4 (MaxText's fp32 checker); reduced precision gates on
scale-aware metrics only -- KL <= 0.015 (MaxText bf16) and cosine >= 0.99 (Megatron-Bridge) --
because max-abs is dominated by outliers there and top-1 of random-init models is a coin toss
between near-tied logits.  In reduced precision the probe also gates ``growth`` (probe logit error
over the plain run's, floored at the dtype's epsilon; see ``runner.add_probe_growth``) at 2:
scale-free, so it catches an ignored rope-scaling field where KL and cosine stay inside their
limits (bf16: growth 3.6 at 8k for a tiny Llama-3.1 with the field dropped, ~1 when correct).  In
fp32 the absolute thresholds already catch it (max abs 6e-2 vs 1e-4) while the plain run's error
is pure noise (~3e-7), whose ratio to the probe's is ~2 for correct conversions, so growth is not
gated there by default.

Gate file (YAML or JSON), any subset; a top-level ``fp32:``/``bf16:``/``fp16:`` section applies
only to that dtype::

    logits: {max_abs: 1.0e-4, min_top1: 1.0, max_kl: 1.0e-4, min_cosine: 0.9999}
    points: {min_cosine: 0.9999, max_rel_err: 1.0e-5}
    probe:  {max_abs: 1.0e-4, min_top1: 1.0, max_kl: 1.0e-4, min_cosine: 0.9999, max_growth: 2.0}
    routing: {min_routing_agreement: 1.0}

``routing.min_routing_agreement`` gates every MoE layer of the baseline (each mode and probe
position): the share of tokens whose top-k expert set is the same in HF and MCore.  fp32 must
route every token identically (1.0); in bf16/fp16 the router logits round differently and a
near-tie between the k-th and (k+1)-th expert may flip, so the default allows 10 % of tokens
(measured: random-init tiny Qwen3-MoE / DeepSeek-V3 / Mixtral flip 1-3 of 64 tokens, 0.95-0.98).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import CkptBridgeError
from ..harness.junit import JUnitCase, write_junit_cases
from .routing import unmeasured_layers

GROUPS = ("logits", "points", "probe", "routing")
KEYS = ("max_abs", "min_top1", "max_kl", "min_cosine", "max_rel_err", "max_growth", "min_routing_agreement")
_METRIC = {"max_abs": "max_abs", "min_top1": "top1", "max_kl": "kl", "min_cosine": "cosine", "max_rel_err": "rel_err",
           "max_growth": "growth", "min_routing_agreement": "topk_agreement"}

Thresholds = dict[str, dict[str, float]]

DEFAULTS: dict[str, Thresholds] = {
    "fp32": {"logits": {"max_abs": 1e-4, "min_top1": 1.0, "max_kl": 1e-4},
             "points": {"min_cosine": 0.9999},
             "probe": {"max_abs": 1e-4, "min_top1": 1.0, "max_kl": 1e-4},
             "routing": {"min_routing_agreement": 1.0}},
    "bf16": {"logits": {"max_kl": 0.015, "min_cosine": 0.99},
             "points": {"min_cosine": 0.99},
             "probe": {"max_kl": 0.015, "min_cosine": 0.99, "max_growth": 2.0},
             "routing": {"min_routing_agreement": 0.9}},
}
DEFAULTS["fp16"] = DEFAULTS["bf16"]


@dataclass
class ThresholdCheck:
    """One verdict; becomes one JUnit test case."""

    name: str
    metric: str
    value: float
    limit: float
    passed: bool
    where: str = ""

    @property
    def message(self) -> str:
        op = ">=" if self.metric.startswith("min_") else "<="
        return f"{_METRIC[self.metric]} = {self.value:.6g} (limit {op} {self.limit:g}){' at ' + self.where if self.where else ''}"


def _validated(raw: Any, where: str) -> Thresholds:
    if not isinstance(raw, dict):
        raise CkptBridgeError(f"{where}: expected a mapping of {GROUPS}")
    out: Thresholds = {}
    for group, values in raw.items():
        if group not in GROUPS or not isinstance(values, dict):
            raise CkptBridgeError(f"{where}: unknown section {group!r} (known: {', '.join(GROUPS)})")
        for key, v in values.items():
            if key not in KEYS:
                raise CkptBridgeError(f"{where}: {group}.{key} is not one of {', '.join(KEYS)}")
            out.setdefault(group, {})[key] = _number(v, f"{where}: {group}.{key}")
    return out


def _number(v: Any, where: str) -> float:
    """A threshold as float; numeric strings are accepted because PyYAML reads ``1e-4`` (no dot) as one."""
    if isinstance(v, bool):
        raise CkptBridgeError(f"{where} must be a number, got {v!r}")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise CkptBridgeError(f"{where} must be a number, got {v!r}") from None


def load_thresholds(dtype: str, gate_file: Path | None = None, overrides: Thresholds | None = None) -> Thresholds:
    """Defaults for ``dtype``, then the gate file (common part, then its ``dtype`` section), then flags."""
    raw: dict[str, Any] = {}
    if gate_file is not None:
        try:
            text = Path(gate_file).read_text()
            raw = json.loads(text) if str(gate_file).endswith(".json") else yaml.safe_load(text)
        except (OSError, json.JSONDecodeError, yaml.YAMLError) as exc:
            raise CkptBridgeError(f"--gate {gate_file}: cannot read ({exc})") from None
    return thresholds_from_mapping(dtype, raw or {}, str(gate_file), overrides)


def thresholds_from_mapping(dtype: str, raw: Any, where: str, overrides: Thresholds | None = None) -> Thresholds:
    """Defaults for ``dtype``, then ``raw`` (a parsed gate file: common part, then its ``dtype``
    section), then ``overrides``.  Shared by ``--gate FILE`` and the ``align.thresholds`` section
    of a ``ckptbridge gate`` config, so both accept exactly the same keys."""
    merged: Thresholds = {g: dict(v) for g, v in DEFAULTS[dtype].items()}
    if not isinstance(raw, dict):
        raise CkptBridgeError(f"{where}: expected a mapping of {GROUPS}")
    raw = dict(raw)
    per_dtype = {k: raw.pop(k) for k in list(raw) if k in DEFAULTS}
    layers: list[Thresholds] = [_validated(raw, where)]
    if dtype in per_dtype:
        layers.append(_validated(per_dtype[dtype], f"{where} [{dtype}]"))
    if overrides:
        layers.append(overrides)
    for layer in layers:
        for group, values in layer.items():
            merged.setdefault(group, {}).update(values)
    return merged


def _judge(name: str, limits: dict[str, float], rows: list[dict[str, Any]], where_key: str = "point") -> list[ThresholdCheck]:
    checks = []
    for key, limit in limits.items():
        metric = _METRIC[key]
        vals = [(r[metric], r) for r in rows if metric in r and r[metric] is not None and not _isnan(r[metric])]
        if not vals:
            continue
        worst_val, worst = (min if key.startswith("min_") else max)(vals, key=lambda t: t[0])
        ok = worst_val >= limit if key.startswith("min_") else worst_val <= limit
        checks.append(ThresholdCheck(f"{name}.{metric}", key, float(worst_val), limit, bool(ok), str(worst.get(where_key, ""))))
    return checks


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def evaluate(rows: list[dict[str, Any]], thresholds: Thresholds, modes: list[str], num_layers: int,
             routing: list[dict[str, Any]] | None = None) -> list[ThresholdCheck]:
    """Judge the *baseline* setting: logits and per-layer points in each mode, each probe position,
    and (MoE models) each MoE layer's routing agreement in every baseline pass (failed where HF's router
    was not recorded: routing that cannot be measured does not pass)."""
    base = [r for r in rows if r["setting"] == "baseline"]
    checks: list[ThresholdCheck] = []
    for mode in modes:
        mode_rows = [r for r in base if r["mode"] == mode]
        checks += _judge(f"{mode}.logits", thresholds.get("logits", {}), [r for r in mode_rows if r["point"] == "logits"])
        points = [r for r in mode_rows if r["point"] != "logits"]
        for layer in range(-1, num_layers):
            group = [r for r in points if r["layer"] == layer]
            label = f"layer{layer}" if layer >= 0 else "embedding_final_norm"
            checks += _judge(f"{mode}.{label}", thresholds.get("points", {}), group)
    for pos in sorted({r["position"] for r in base if r["mode"] == "probe"}):
        probe = [r for r in base if r["mode"] == "probe" and r["position"] == pos and r["point"] == "logits"]
        checks += _judge(f"probe@{pos}.logits", thresholds.get("probe", {}), probe)
    base_routing = [{**r, "where": f"layer{r['layer']} ({r['mode']}" + (f"@{r['position']}" if r["position"] else "") + ")"}
                    for r in routing or [] if r["setting"] == "baseline" and "topk_agreement" in r]
    for layer in sorted({r["layer"] for r in base_routing}):
        checks += _judge(f"routing.layer{layer}", thresholds.get("routing", {}),
                         [r for r in base_routing if r["layer"] == layer], where_key="where")
    limit = thresholds.get("routing", {}).get("min_routing_agreement")
    for layer in unmeasured_layers(routing or []) if limit is not None else []:  # a router gate that cannot run fails
        checks.append(ThresholdCheck(f"routing.layer{layer}.topk_agreement", "min_routing_agreement", math.nan, limit,
                                     False, "MCore has a router here, HF recorded none (report.md, MoE routing)"))
    return checks


def write_junit(checks: list[ThresholdCheck], path: Path, suite: str, seconds: float = 0.0) -> None:
    """JUnit XML (one test case per check; failures carry the measured value and the limit)."""
    cases = [JUnitCase(f"{suite}.{c.name.split('.')[0]}", f"{c.name} {c.metric}", c.passed, c.message) for c in checks]
    write_junit_cases(cases, path, "ckptbridge-align", suite, "AlignmentGate", seconds)


def checks_json(checks: list[ThresholdCheck]) -> list[dict[str, Any]]:
    return [{**asdict(c), "message": c.message} for c in checks]
