"""``ckptbridge gate CONFIG`` end to end through the click group: a correct conversion passes
(exit 0) with summary.json and junit.xml; a truncated source and a numerically corrupted MCore
checkpoint fail (exit 1) with readable reasons; TOML works; config mistakes are exit 2 naming the key."""

from __future__ import annotations

import json
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ckptbridge.cli import main
from ckptbridge.gate.steps import STEPS

from helpers import to_mcore, tree_digest

PRESET = "llama3.2-1b"


def _gate(config: Path, *extra: str):
    return CliRunner().invoke(main, ["gate", str(config), *extra])


def _verdict(output: str) -> str:
    """The verdict line (library warnings may interleave with the command's own lines)."""
    (line,) = [line for line in output.splitlines() if line.startswith("gate: ")]
    return line


def _yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _junit(path: Path) -> dict[tuple[str, str], str]:
    """(classname, name) -> "pass" | "fail" | "skip" for every test case."""
    out = {}
    for tc in ET.parse(path).getroot().iter("testcase"):
        out[(tc.get("classname"), tc.get("name"))] = ("fail" if tc.find("failure") is not None else
                                                      "skip" if tc.find("skipped") is not None else "pass")
    return out


def test_steps_run_in_pipeline_order_whatever_the_config_order(tiny_hf, tmp_path):
    """A step uses what the steps before it made (roundtrip exports what convert wrote), so the run
    follows the pipeline (STEPS), not the order the config file lists the steps in."""
    assert list(STEPS) == ["convert", "roundtrip", "align", "converge", "export"]
    cfg = tmp_path / "gate.yaml"
    cfg.write_text("roundtrip: {bit_exact: true}\nalign: false\nconvert: {tp: 2}\n"  # roundtrip listed first
                   f"source: {{hf: {tiny_hf[PRESET]}, preset: {PRESET}}}\nreport: {{dir: out}}\n")
    res = _gate(cfg)
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [s["name"] for s in summary["steps"]] == ["convert", "roundtrip"]
    assert [c["step"] for c in summary["checks"]] == ["convert", "roundtrip"]


def test_correct_conversion_passes(tiny_hf, tmp_path):
    src = tiny_hf[PRESET]
    before = tree_digest(src)
    cfg = _yaml(tmp_path / "gate.yaml", {
        "source": {"hf": str(src), "preset": PRESET},
        "convert": [{"tp": 2, "pp": 2}, {"tp": 2, "pp": 2, "format": "torch"}],
        "roundtrip": {"bit_exact": True},
        "align": {"dtype": "fp32", "seq_len": 16, "probe_positions": [8192],
                  "thresholds": {"logits": {"max_abs": 1e-4, "max_kl": 1e-4, "min_top1": 1.0}}},
        "report": {"dir": "out"},
    })
    res = _gate(cfg)
    assert res.exit_code == 0, res.output
    assert "PASS convert/tp2-pp2-torch_dist: " in res.output and "PASS roundtrip/tp2-pp2-torch: " in res.output
    assert "PASS align/propagated.logits.max_abs: max_abs = " in res.output
    assert _verdict(res.output).startswith("gate: PASSED")
    assert tree_digest(src) == before  # the source is never modified

    out = tmp_path / "out"  # report.dir is relative to the config file
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] is True and summary["counts"]["fail"] == 0
    assert [s["name"] for s in summary["steps"]] == ["convert", "roundtrip", "align"]
    assert {c["step"] for c in summary["checks"]} == {"convert", "roundtrip", "align"}
    assert (out / "align" / "report.md").exists() and summary["files"]["align_report"].endswith("report.md")
    cases = _junit(out / "junit.xml")
    assert len(cases) == len(summary["checks"]) > 10 and set(cases.values()) == {"pass"}
    assert {("convert", "tp2-pp2-torch_dist"), ("roundtrip", "tp2-pp2-torch"), ("align", "probe@8192.logits.kl")} <= set(cases)


def test_truncated_source_fails_with_the_file_named(tiny_hf, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(tiny_hf[PRESET], src)
    weights = src / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    cfg = _yaml(tmp_path / "gate.yaml", {"source": {"hf": str(src)}, "convert": {"tp": 2, "pp": 2},
                                         "report": {"dir": str(tmp_path / "out")}})
    res = _gate(cfg)
    assert res.exit_code == 1, res.output
    fail = next(line for line in res.output.splitlines() if line.startswith("FAIL convert/tp2-pp2-torch_dist: "))
    assert str(weights) in fail and "truncated" in fail
    assert "SKIP roundtrip/tp2-pp2-torch_dist: no checkpoint to export (convert failed" in res.output
    assert "SKIP align/run: no MCore checkpoint to align" in res.output
    assert _verdict(res.output).startswith("gate: FAILED (1 of 3 checks failed: convert/tp2-pp2-torch_dist)")
    cases = _junit(tmp_path / "out" / "junit.xml")
    assert cases == {("convert", "tp2-pp2-torch_dist"): "fail", ("roundtrip", "tp2-pp2-torch_dist"): "skip",
                     ("align", "run"): "skip"}
    failure = ET.parse(tmp_path / "out" / "junit.xml").getroot().find(".//failure")
    assert str(weights) in failure.get("message")


def test_corrupted_mcore_fails_alignment_with_metric_and_limit(tiny_hf, tmp_path):
    """An MCore checkpoint that converts and loads fine but whose numbers are wrong (one layer's
    down projection scaled by 1.5): round-trip names the tensor, align names metric and limit."""
    src = tiny_hf[PRESET]
    bad_hf = tmp_path / "bad-hf"
    shutil.copytree(src, bad_hf)
    tensors = load_file(bad_hf / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"] = tensors["model.layers.1.mlp.down_proj.weight"] * 1.5
    save_file(tensors, bad_hf / "model.safetensors", metadata={"format": "pt"})
    mcore = to_mcore(bad_hf, tmp_path / "bad-mcore", tp=2)
    cfg = _yaml(tmp_path / "gate.yaml", {
        "source": {"hf": str(src), "mcore": str(mcore)},
        "align": {"seq_len": 16, "probe": False, "modes": ["propagated"], "thresholds": {"logits": {"max_abs": 1e-4}}},
        "report": {"dir": str(tmp_path / "out")},
    })
    res = _gate(cfg)
    assert res.exit_code == 1, res.output
    assert "FAIL roundtrip/mcore: 1 of " in res.output and "decoder.layers.1.mlp.linear_fc2.weight (max abs" in res.output
    fail = next(line for line in res.output.splitlines() if line.startswith("FAIL align/propagated.logits.max_abs: "))
    assert "max_abs = " in fail and "(limit <= 0.0001)" in fail
    assert "PASS align/propagated.layer0.cosine" in res.output  # the untouched layer still matches
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    bad = next(c for c in summary["checks"] if c["name"] == "propagated.logits.max_abs")
    assert bad["status"] == "fail" and bad["value"] > bad["limit"] == 1e-4


def test_damaged_mcore_is_a_failed_check_not_a_crash(tiny_hf, tmp_path):
    """A truncated torch_dist file: round-trip names the file (ckptbridge's own check); megatron's
    load inside align raises its own exception, which is a failed check too, with reports written."""
    mcore = to_mcore(tiny_hf[PRESET], tmp_path / "mcore")
    data = mcore / "release" / "__0_0.distcp"
    os.truncate(data, data.stat().st_size // 2)
    cfg = _yaml(tmp_path / "gate.yaml", {"source": {"hf": str(tiny_hf[PRESET]), "mcore": str(mcore)},
                                         "align": {"seq_len": 16, "probe": False, "modes": ["isolated"]},
                                         "report": {"dir": str(tmp_path / "out")}})
    res = _gate(cfg)
    assert res.exit_code == 1, res.output
    assert f"FAIL roundtrip/mcore: MCore -> HF -> compare failed: {data}" in res.output
    assert "FAIL align/run: align crashed: CheckpointMismatchError: megatron could not load" in res.output
    assert _junit(tmp_path / "out" / "junit.xml") == {("roundtrip", "mcore"): "fail", ("align", "run"): "fail"}


def test_toml_config_and_json_output(tiny_hf, tmp_path):
    src = tiny_hf[PRESET]
    cfg = tmp_path / "gate.toml"
    cfg.write_text(f"""
align = false

[source]
hf = "{src}"

[[convert]]
tp = 1
pp = 2
format = "torch"

[[convert]]
tp = 2
dtype = "bf16"

[roundtrip]
bit_exact = false
max_abs = 0.01
""")
    res = _gate(cfg, "--json", "--report-dir", str(tmp_path / "out"))
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)  # stdout is the JSON alone; the check lines went to stderr
    assert summary == json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(c["step"], c["name"], c["status"]) for c in summary["checks"]] == [
        ("convert", "tp1-pp2-torch", "pass"), ("convert", "tp2-pp1-torch_dist-bf16", "pass"),
        ("roundtrip", "tp1-pp2-torch", "pass"), ("roundtrip", "tp2-pp1-torch_dist-bf16", "pass")]
    assert 0 < summary["checks"][3]["value"] <= 0.01  # bf16 rounding, inside the tolerance
    assert "PASS roundtrip/tp1-pp2-torch: max abs 0 (limit <= 0.01)" in res.stderr


@pytest.mark.parametrize("config, named", [
    ({"source": {"hf": "x"}, "align": {"dtyp": "fp32"}}, "align.dtyp: unknown key"),
    ({"source": {"hf": "x"}, "alignn": False}, "alignn: unknown key"),
    ({"source": {"hf": "x", "tp": 2}}, "source.tp: unknown key"),
    ({"source": {"hf": "x"}, "convert": [{"tp": 2}, {"tp": 2, "ppp": 1}]}, "convert[1].ppp: unknown key"),
    ({"source": {"hf": "x"}, "align": {"thresholds": {"logits": {"max_ab": 1}}}}, "logits.max_ab is not one of"),
    ({"source": {"hf": "x"}, "convert": {"tp": "two"}}, "convert.tp: expected int, got a string 'two'"),
    ({"source": {"hf": "x"}, "roundtrip": {"bit_exact": False}}, "roundtrip.max_abs: required"),
    ({"source": {"hf": "x"}, "converge": {"stepz": 4}}, "converge.stepz: unknown key"),
    ({"source": {"hf": "x"}, "converge": {"variants": ["fp4"]}}, "converge.variants: unknown variant 'fp4'"),
    ({"source": {"hf": "x", "mcore": "y"}, "convert": {"tp": 2}}, "convert: source.mcore is the checkpoint under test"),
    ({"convert": {"tp": 2}}, "source: missing"),
])
def test_config_errors_are_exit_2_naming_the_key(tmp_path, config, named):
    res = _gate(_yaml(tmp_path / "gate.yaml", config))
    assert res.exit_code == 2, res.output
    assert named in res.output
    assert not (tmp_path / "reports").exists()  # nothing ran


def test_missing_source_folder_is_exit_2(tmp_path):
    res = _gate(_yaml(tmp_path / "gate.yaml", {"source": {"hf": "nowhere"}}))
    assert res.exit_code == 2 and f"source.hf: {tmp_path / 'nowhere'} is not a folder" in res.output


def test_converge_step_reports_a_broken_resume(tiny_hf, tmp_path):
    """The optional training step: its verdicts become checks; a deliberately broken resume fails the gate."""
    cfg = _yaml(tmp_path / "gate.yaml", {
        "source": {"hf": str(tiny_hf[PRESET])}, "align": False, "roundtrip": False,
        "converge": {"steps": 6, "variants": ["broken-resume"], "envelope": False, "seq_len": 16, "lr": 1e-3},
        "report": {"dir": "out"},
    })
    res = _gate(cfg)
    assert res.exit_code == 1, res.output
    assert "PASS converge/baseline.step0: " in res.output and "PASS converge/baseline.resume: " in res.output
    assert "FAIL converge/broken-resume.resume: resumed at step 3" in res.output
    cases = _junit(tmp_path / "out" / "junit.xml")
    assert cases[("converge", "broken-resume.resume")] == "fail" and cases[("converge", "baseline.falls")] == "pass"
    assert (tmp_path / "out" / "converge" / "loss_curves.png").exists()


def test_the_example_config_runs_the_whole_loop(tmp_path):
    """alignment/gate.example.yaml: import -> train with megatron-core -> save as Megatron-LM -> export to HF
    (synthesized config and --hf-config) -> the exports' logits equal the trained model's."""
    from ckptbridge.cli import main as cli

    example = Path(__file__).resolve().parents[1] / "alignment" / "gate.example.yaml"
    res = CliRunner().invoke(cli, ["gate", str(example), "--report-dir", str(tmp_path), "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    checks = {f"{c['step']}/{c['name']}": c for c in json.loads(res.stdout)["checks"]}
    for name in ("export/train", "export/synthesized-config.max_abs", "export/hf-config.max_abs", "export/hf-config.top1"):
        assert checks[name]["status"] == "pass", checks[name]
