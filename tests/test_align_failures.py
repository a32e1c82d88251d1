"""The gate fails on deliberately wrong conversions, and isolated mode / the long-position probe
point at the culprit.

Each wrong MCore checkpoint is what a buggy converter would write: it is produced by converting an
HF folder edited so that ckptbridge's (correct) mapping yields the wrong layout -- gate/up swapped,
q/k/v rows concatenated instead of interleaved per query group, or the rope-scaling field dropped
from the config -- and it is then aligned against the original HF model.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ckptbridge.align.cli import align
from ckptbridge.align.gate import evaluate, load_thresholds
from ckptbridge.align.runner import AlignOptions, run_alignment
from ckptbridge.convert import Target, convert
from ckptbridge.layout import ParallelLayout
from ckptbridge.presets import build_tiny_hf


def _edited_copy(src: Path, dst: Path, kind: str) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    if kind == "rope":
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_parameters"]["rope_theta"]}
        (dst / "config.json").write_text(json.dumps(cfg))
        return dst
    f = dst / "model.safetensors"
    t = load_file(f)
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    groups = cfg["num_key_value_heads"]
    qpg = cfg["num_attention_heads"] // groups
    for k in [k for k in t if k.endswith("mlp.gate_proj.weight")] if kind == "gateup" else []:
        up = k.replace("gate_proj", "up_proj")
        t[k], t[up] = t[up], t[k]
    for q in [k for k in t if k.endswith("self_attn.q_proj.weight")] if kind == "qkv" else []:
        k_, v_ = q.replace("q_proj", "k_proj"), q.replace("q_proj", "v_proj")
        # rows such that the interleaving converter writes plain [Q; K; V]
        fused = torch.cat([t[q], t[k_], t[v_]]).reshape(groups, (qpg + 2) * hd, -1)
        t[q] = fused[:, : qpg * hd].reshape(-1, fused.shape[-1]).contiguous()
        t[k_] = fused[:, qpg * hd: (qpg + 1) * hd].reshape(-1, fused.shape[-1]).contiguous()
        t[v_] = fused[:, (qpg + 1) * hd:].reshape(-1, fused.shape[-1]).contiguous()
    save_file(t, f, metadata={"format": "pt"})
    return dst


def _wrong_mcore(tmp: Path, preset: str, kind: str, dtype: torch.dtype) -> tuple[Path, Path]:
    hf = build_tiny_hf(preset, tmp / "hf", layers=2, seed=3, dtype=dtype)
    bad = _edited_copy(hf, tmp / f"hf-{kind}", kind)
    convert(bad, tmp / "mcore", None, Target("mcore", ParallelLayout(), "torch_dist", "te", dtype))
    return hf, tmp / "mcore"


def _row(rows: list[dict], mode: str, point: str, position: int = 0) -> dict:
    return next(r for r in rows if r["setting"] == "baseline" and r["mode"] == mode and r["point"] == point
                and r["position"] == position)


@pytest.mark.parametrize("kind, first_bad, last_good", [("gateup", "mlp_out", "mlp_norm"), ("qkv", "attn_out", "attn_norm")])
def test_wrong_layout_fails_and_isolated_mode_names_the_block(tmp_path, kind, first_bad, last_good):
    hf, mc = _wrong_mcore(tmp_path, "llama3.2-1b", kind, torch.float32)
    r = run_alignment(AlignOptions(preset="llama3.2-1b", hf=hf, mcore=mc, dtype="fp32", seq_len=16, probe=False))
    checks = evaluate(r.rows, load_thresholds("fp32"), ["propagated", "isolated"], r.num_layers)
    failed = {c.name for c in checks if not c.passed}
    assert {"propagated.logits.max_abs", "isolated.layer0.cosine", "isolated.layer1.cosine"} <= failed
    for layer in (0, 1):  # isolated mode: the error starts exactly at the broken block of every layer
        assert _row(r.rows, "isolated", f"layer{layer}.{last_good}")["rel_err"] < 1e-6
        assert _row(r.rows, "isolated", f"layer{layer}.{first_bad}")["rel_err"] > 0.1


def test_cli_gate_failure_exit_code_and_junit(tmp_path):
    hf, mc = _wrong_mcore(tmp_path, "mistral-7b", "gateup", torch.float32)
    res = CliRunner().invoke(align, ["--hf", str(hf), "--mcore", str(mc), "--seq-len", "16", "--no-probe",
                                     "--out", str(tmp_path / "reports"), "--run", "bad"])
    assert res.exit_code == 1, res.output
    assert "gate: FAILED" in res.output and "FAIL propagated.logits.max_abs" in res.output
    suite = ET.parse(tmp_path / "reports" / "bad" / "junit.xml").getroot().find("testsuite")
    assert int(suite.get("failures")) >= 3
    assert "**Gate: FAILED**" in (tmp_path / "reports" / "bad" / "report.md").read_text()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_dropped_rope_scaling_is_caught_by_the_long_position_probe(tmp_path, dtype):
    hf, mc = _wrong_mcore(tmp_path, "llama3.1-8b", "rope", {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    r = run_alignment(AlignOptions(preset="llama3.1-8b", hf=hf, mcore=mc, dtype=dtype, seq_len=32, ablate="rope/hf"))
    checks = evaluate(r.rows, load_thresholds(dtype), ["propagated", "isolated"], r.num_layers)
    failed = {c.name for c in checks if not c.passed}
    probe_failures = {n for n in failed if n.startswith("probe@")}
    assert {f"probe@{p}" for p in r.probe_positions} == {n.split(".")[0] for n in probe_failures}
    plain = _row(r.rows, "propagated", "logits")["rel_err"]
    errs = [_row(r.rows, "probe", "logits", p)["rel_err"] for p in r.probe_positions]
    assert errs == sorted(errs) and errs[0] > 3 * plain  # grows with the distance
    if dtype == "bf16":  # short prompts pass the bf16 gate: only the probe sees the dropped field
        assert failed == probe_failures
    # swapping HF's RoPE into MCore removes the probe's excess error: RoPE is the culprit
    fixed = [next(x for x in r.rows if x["setting"] == "rope/hf" and x["mode"] == "probe" and x["position"] == p
                  and x["point"] == "logits") for p in r.probe_positions]
    if dtype == "fp32":
        assert max(x["rel_err"] for x in fixed) < errs[0] / 100
    else:  # back to bf16 rounding noise, not growing with the distance
        assert max(x["rel_err"] for x in fixed) < errs[0] / 3 and all(x["growth"] < 2.0 for x in fixed)
