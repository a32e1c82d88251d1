"""`ckptbridge converge`: real megatron-core training runs (GPTModel, DDP, get_megatron_optimizer incl.
HybridDeviceOptimizer, forward-backward schedule) on CPU, judged and reported.

One CLI run of a tiny Llama-3.2-1B-shaped model carries most checks: baseline + envelope, offload at
fractions 1.0 and 0.5 (with a resume), emulated FP8, and a deliberately broken resume that must fail.
"""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ckptbridge.converge.cli import converge
from ckptbridge.converge.data import load_stream
from ckptbridge.converge.runner import ConvergeOptions, hf_first_batch_loss
from ckptbridge.converge.trainer import TrainJob, run_job
from ckptbridge.converge.variants import select
from ckptbridge.converge.verdict import allowed_failures, judge_curve, judge_resume
from ckptbridge.errors import CkptBridgeError
from ckptbridge.formats.mcore_common import iteration_dir

from helpers import DENSE_PRESETS, to_mcore

STEPS = 16


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("converge")
    res = CliRunner().invoke(converge, ["--model", "llama3.2-1b", "--random-init", "--layers", "2", "--shrink",
                                        "--steps", str(STEPS), "--seq-len", "32", "--micro-batch-size", "4",
                                        "--lr", "1e-3", "--warmup", "3",
                                        "--variants", "baseline,offload,fp8,broken-resume",
                                        "--out", str(out), "--run", "r"])
    assert res.exit_code == 1, res.output  # broken-resume must fail the run
    folder = out / "r"
    return {"output": res.output, "dir": folder, "summary": json.loads((folder / "summary.json").read_text())}


def _losses(summary: dict, name: str, key: str = "rows") -> list[float]:
    return [r["loss"] for r in summary["runs"][name][key]]


def _verdict(summary: dict, variant: str, check: str) -> dict:
    return next(v for v in summary["verdicts"] if v["variant"] == variant and v["check"] == check)


def test_loss_falls_and_step0_matches_hf(run):
    s = run["summary"]
    base = _losses(s, "baseline")
    assert len(base) == STEPS
    assert base[-1] < 0.85 * base[0]
    assert _verdict(s, "baseline", "falls")["passed"]
    step0 = _verdict(s, "baseline", "step0")
    assert step0["passed"] and step0["value"] <= 1e-4


def test_offload_matches_baseline_within_the_envelope(run):
    s = run["summary"]
    base, other = _losses(s, "baseline"), _losses(s, "baseline-seed2")
    env = [abs(a - b) for a, b in zip(base, other)]  # the raw distance: tighter than the verdict's envelope
    assert max(env) > 1e-3  # a real envelope: another batch order moves the curve
    for name in ("offload-1.0", "offload-0.5"):
        curve = _losses(s, name)
        assert all(abs(c - b) <= e for c, b, e in zip(curve, base, env)), name
        assert max(abs(c - b) / b for c, b in zip(curve, base)) < 1e-5, name  # same math, another optimizer path
        assert _verdict(s, name, "curve")["passed"]
    assert "HybridDeviceOptimizer" in s["runs"]["offload-1.0"]["implementation"]
    assert "0 stay on the device" in s["runs"]["offload-1.0"]["implementation"]
    half = s["runs"]["offload-0.5"]["implementation"]
    assert "HybridDeviceOptimizer" in half and "0 stay on the device" not in half  # the split really splits
    assert "AdamW" in s["runs"]["baseline"]["implementation"]


def test_emulated_fp8_within_rtol(run):
    s = run["summary"]
    base, fp8 = _losses(s, "baseline"), _losses(s, "fp8")
    rel = max(abs(f - b) / b for f, b in zip(fp8, base))
    assert 0 < rel <= 0.05  # quantised (not identical), and within Megatron-LM's rtol
    assert _verdict(s, "fp8", "curve")["passed"]
    assert "emulated" in s["runs"]["fp8"]["fp8"]
    assert s["runs"]["fp8"]["fp8_stats"]["fp8_linears"] > 0


def test_resume_continues_the_curve_and_broken_resume_fails(run):
    s = run["summary"]
    k = s["meta"]["resume_at"]
    for name in ("baseline", "offload-1.0"):
        assert _losses(s, name, "resumed") == _losses(s, name)[k:], name  # bit-exact on CPU
        assert _verdict(s, name, "resume")["passed"]
    broken = _verdict(s, "broken-resume", "resume")
    assert not broken["passed"] and broken["value"] > 1e-3
    assert "FAIL broken-resume.resume" in run["output"]
    assert "converge: FAILED" in run["output"]
    assert _verdict(s, "broken-resume", "curve")["passed"]  # only the resume is broken


def test_library_warnings_go_to_the_log(run):
    """As align: megatron's TE/Apex-absent warnings are collected into stderr.log, one line says so."""
    log = run["dir"] / "stderr.log"
    assert log.exists() and f"in {log}" in run["output"]
    assert "not installed" not in run["output"] and "Warning:" not in run["output"], run["output"]
    assert "baseline:" in run["output"]  # the command's own progress lines still reach the terminal


def test_report_files(run):
    folder: Path = run["dir"]
    assert {p.name for p in folder.iterdir()} == {"report.md", "summary.json", "losses.csv", "junit.xml",
                                                  "loss_curves.png", "stderr.log"}  # megatron's warnings, collected
    md = folder.joinpath("report.md").read_text()
    assert md.startswith("# Convergence: FAILED")
    for needle in ("| **FAIL** | broken-resume | resume |", "fp32, torch", "megatron-core 0.16.1", "emulated",
                   "![loss curves](loss_curves.png)"):
        assert needle in md, needle
    with folder.joinpath("losses.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["variant"] for r in rows} == {"baseline", "baseline-seed2", "offload-1.0", "offload-0.5", "fp8",
                                            "broken-resume"}
    suite = ET.parse(folder / "junit.xml").getroot().find("testsuite")
    failed = [tc.get("classname") + "." + tc.get("name") for tc in suite if tc.find("failure") is not None]
    assert failed == ["broken-resume.resume"]
    with Image.open(folder / "loss_curves.png") as im:
        assert im.size[0] > 500


def _step0_worker_free(preset: str, tiny: Path, work: Path) -> tuple[float, float]:
    dst = to_mcore(tiny, work / preset)
    it = iteration_dir(dst)
    opts = ConvergeOptions(seq_len=16, micro_batch_size=2)
    from ckptbridge.harness.checkpoint_args import checkpoint_args

    stream = load_stream(None, tiny, int(checkpoint_args(it).vocab_size))
    out = run_job(TrainJob(iter_dir=str(it), stream=stream, steps=0, lr=1e-3, warmup=0, micro_batch_size=2,
                           num_microbatches=1, seq_len=16, step0_batch=True))
    return out["step0_loss"], hf_first_batch_loss(tiny, stream, opts)


@pytest.mark.parametrize("preset", DENSE_PRESETS)
def test_step0_loss_matches_hf_for_every_dense_preset(preset, tiny_hf, tmp_path):
    mcore, hf = _step0_worker_free(preset, tiny_hf[preset], tmp_path)
    assert abs(mcore - hf) <= 1e-4, (preset, mcore, hf)


@pytest.mark.parametrize("layout", [{"tp": 2}, {"pp": 2}])
def test_parallel_training_matches_one_rank(layout, tiny_hf, tmp_path):
    """TP and PP through gloo workers train the same curve as one rank: the first step's loss to fp32
    rounding; later steps within 1e-3 (Adam's normalisation magnifies last-bit differences of near-zero
    gradients).  PP runs megatron's 1F1B schedule over 2 microbatches."""
    src = tiny_hf["llama3.2-1b"]
    it = iteration_dir(to_mcore(src, tmp_path / "m"))
    stream = load_stream(None, None, 1001)
    job = TrainJob(iter_dir=str(it), stream=stream, steps=4, lr=1e-3, warmup=0, micro_batch_size=2,
                   num_microbatches=2, seq_len=16)
    one = [r["loss"] for r in run_job(job)["rows"]]
    two = [r["loss"] for r in run_job(TrainJob(**{**job.__dict__, **layout}))["rows"]]
    assert abs(one[0] - two[0]) < 1e-6, (one, two)
    assert max(abs(a - b) / a for a, b in zip(one, two)) < 1e-3, (one, two)


# ---------------------------------------------------------------- units


def test_curve_verdict_uses_envelope_and_allows_megatrons_misses():
    base = [10.0] * 200
    assert allowed_failures(200) == 2 and allowed_failures(10) == 1 and allowed_failures(10**5) == 50
    off = [10.0] * 197 + [11.0] * 3  # 3 steps 10 % off: one more than allowed
    assert not judge_curve("v", base, off, None).passed
    assert judge_curve("v", base, off, [1.0] * 200).passed  # inside a wide envelope
    assert judge_curve("v", base, [10.0] * 198 + [11.0] * 2, None).passed


def test_envelope_is_the_local_maximum_distance():
    from ckptbridge.converge.verdict import envelope

    base = [5.0] * 7
    other = [5.0, 5.0, 5.0, 6.0, 5.0, 5.0, 5.0]  # the curves cross everywhere but at step 3
    assert envelope(base, other) == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_resume_verdict_is_tight():
    curve = [5.0, 4.0, 3.0, 2.0]
    assert judge_resume("v", curve, [3.0, 2.0], 2).passed
    assert not judge_resume("v", curve, [3.0, 2.01], 2).passed
    assert not judge_resume("v", curve, [3.0], 2).passed


def test_variant_selection_and_errors():
    names = [v.name for v in select(["offload", "fp8"])]
    assert names == ["baseline", "baseline-seed2", "offload-1.0", "offload-0.5", "fp8"]
    assert [v.name for v in select([], envelope=False)] == ["baseline"]
    with pytest.raises(CkptBridgeError, match="unknown variant 'fp4'"):
        select(["fp4"])


def test_user_data_jsonl_and_npy(tmp_path):
    import numpy as np

    (tmp_path / "t.jsonl").write_text('{"text": "hello world"}\n{"text": "again"}\n')
    s = load_stream(tmp_path / "t.jsonl", None, 1001)
    assert s.ids.numel() == len("hello world") + len("again") and "2 texts" in s.source
    (tmp_path / "i.jsonl").write_text('{"ids": [1, 2, 3]}\n{"ids": [4]}\n')
    assert load_stream(tmp_path / "i.jsonl", None, 10).ids.tolist() == [1, 2, 3, 4]
    np.save(tmp_path / "i.npy", np.arange(50))
    s = load_stream(tmp_path / "i.npy", None, 100)
    b = s.batch(0, 3, 1, 2, 8)
    assert b.shape == (2, 9) and torch.equal(b, s.batch(0, 3, 1, 2, 8))  # a pure function of (seed, step, mb)
    assert not torch.equal(b, s.batch(1, 3, 1, 2, 8))
    with pytest.raises(CkptBridgeError, match="outside the vocabulary"):
        load_stream(tmp_path / "i.npy", None, 10)
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(CkptBridgeError, match="bad.jsonl:1"):
        load_stream(tmp_path / "bad.jsonl", None, 10)


def test_offload_in_bf16_on_cpu_is_refused_with_the_reason():
    res = CliRunner().invoke(converge, ["--model", "llama3.2-1b", "--random-init", "--layers", "1", "--shrink",
                                        "--dtype", "bf16", "--variants", "offload", "--steps", "4"])
    assert res.exit_code == 2
    assert "distributed optimizer" in res.output and "--dtype fp32" in res.output
