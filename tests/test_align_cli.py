"""End to end through the click command: `align --model llama3.2-1b --random-init --layers 2`
writes report.md, CSV/JSON, PNG plots and JUnit XML, and their *content* is what the run measured."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from ckptbridge.align.cli import align
from ckptbridge.harness.weights import cached_snapshot
from ckptbridge.presets import load_preset


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    res = CliRunner().invoke(align, ["--model", "llama3.2-1b", "--random-init", "--layers", "2", "--shrink",
                                     "--seq-len", "24", "--ablate", "rmsnorm,rope/fused", "--out", str(out), "--run", "r1"])
    assert res.exit_code == 0, res.output
    assert "gate: passed" in res.output
    return out / "r1"


def test_files_are_written(report):
    names = {p.relative_to(report).as_posix() for p in report.rglob("*") if p.is_file()}
    assert names == {"report.md", "metrics.csv", "ablations.csv", "summary.json", "junit.xml", "stderr.log",
                     "plots/error_vs_layer.png", "plots/propagated_vs_isolated.png", "plots/probe.png"}


def test_report_md_states_what_was_run(report):
    text = report.joinpath("report.md").read_text()
    for needle in ("# Alignment report: llama3.2-1b, fp32, cpu", "**Gate: PASSED**", "- device: cpu",
                   "- torch: ", "- transformers: ", "- megatron_core: 0.16.1",
                   "**HF weights**: random init (seed 0) of the llama3.2-1b architecture: 2 layers",
                   "**MCore weights**: converted from the HF weights by ckptbridge",
                   "**emulated variants**: rmsnorm/te_order, rope/fused",
                   "**command**: `ckptbridge align --model llama3.2-1b --random-init --layers 2 --shrink --seq-len 24",
                   "## Ranking, in words", "## Long-position probe", "![Error vs layer"):
        assert needle in text, needle
    table = text.split("## Ablation table")[1].split("## Ranking")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert [r.split("|")[1].strip() for r in rows][0] == "baseline" and len(rows) == 5
    assert "| rmsnorm/te_order | mcore | emulated |" in table


def test_csv_and_json_hold_every_number(report):
    metrics = pd.read_csv(report / "metrics.csv")
    summary = json.loads(report.joinpath("summary.json").read_text())
    settings = ["baseline", "rmsnorm/hf_order", "rmsnorm/te_order", "rmsnorm/torch", "rope/fused"]
    assert sorted(metrics["setting"].unique()) == sorted(settings)
    probes = summary["meta"]["probe_positions"]
    assert probes == [8192, 16384, 32768, 65536]  # from the preset's "align" section
    per_mode = 1 + 2 * 5 + 2
    assert len(metrics) == len(settings) * 2 * per_mode + 2 * len(probes) * per_mode  # baseline + rope/fused probed
    base = metrics[(metrics["setting"] == "baseline") & (metrics["point"] == "logits")]
    assert (base["max_abs"] <= 1e-4).all() and (base["top1"] == 1.0).all()
    ablations = pd.read_csv(report / "ablations.csv")
    assert list(ablations["setting"])[0] == "baseline" and len(ablations) == 5
    assert {"L0 rel_err", "L1 rel_err", "isolated max layer rel_err", "KL", "top-1", "loss delta", "contribution"} <= set(ablations)
    assert summary["meta"]["environment"]["device"] == "cpu" and summary["meta"]["dtype"] == "fp32"
    assert summary["gate"]["passed"] is True
    assert len(summary["rows"]) == len(metrics)
    junit = ET.parse(report / "junit.xml").getroot().find("testsuite")
    assert int(junit.get("tests")) == len(summary["gate"]["checks"]) > 10 and junit.get("failures") == "0"
    assert {tc.get("name") for tc in junit.iter("testcase")} >= {"propagated.logits.max_abs max_abs",
                                                                 "probe@65536.logits.top1 min_top1"}


def test_plots_are_real_images(report):
    for name in ("error_vs_layer", "propagated_vs_isolated", "probe"):
        img = Image.open(report / "plots" / f"{name}.png").convert("L")
        assert img.size[0] >= 600 and img.size[1] >= 400
        lo, hi = img.getextrema()
        assert hi - lo > 100  # drawn lines and text, not a blank canvas


def test_missing_weights_error_suggests_random_init(tmp_path):
    if cached_snapshot(load_preset("llama3.1-8b")["hub_id"]) is not None:
        pytest.skip("llama3.1-8b is in the local HF cache")
    res = CliRunner().invoke(align, ["--model", "llama3.1-8b", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--random-init" in res.output and "nothing is downloaded" in res.output
    res = CliRunner().invoke(align, ["--model", "llama3.1-8b", "--layers", "2", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "only apply to --random-init" in res.output


def test_weights_come_from_the_local_hf_cache(tmp_path, monkeypatch):
    """No --hf and no --random-init: the preset's hub id is read from the HF cache (offline)."""
    import huggingface_hub.constants

    from ckptbridge.align.runner import AlignOptions, run_alignment
    from ckptbridge.presets import build_tiny_hf

    repo = tmp_path / "hub" / "models--meta-llama--Llama-3.2-1B"
    build_tiny_hf("llama3.2-1b", repo / "snapshots" / "0123abcd", layers=2)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    r = run_alignment(AlignOptions(preset="llama3.2-1b", seq_len=16, probe=False))
    assert r.meta["hf_weights"].startswith("HF cache: meta-llama/Llama-3.2-1B")
    assert max(row["max_abs"] for row in r.rows if row["point"] == "logits") <= 1e-4


def test_align_prints_no_raw_warning_lines(tmp_path):
    """In a fresh process (megatron's import-time warnings fire there), stderr carries one summary line:
    the warnings themselves go to the run's stderr.log."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "ckptbridge.cli", "align", "--model", "llama3.2-1b", "--random-init",
                           "--layers", "2", "--shrink", "--no-probe", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) <= 1 and all("warnings collected" in line for line in lines), done.stderr
    assert not any(w in done.stdout for w in ("Warning:", "warnings.warn")), done.stdout
