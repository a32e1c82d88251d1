"""MoE routing agreement and the long-position probe on multi-latent attention (issue 11).

DeepSeek-V3 converted by ckptbridge computes what HF computes at 8k/16k/32k for every rope type the
mapping accepts (the 0.9 logit gap once reported there was the probe not reaching MLA's per-layer
rotary embedding); the router of every MoE layer picks the same experts for every token in fp32;
a router broken on purpose (the expert-score bias dropped) fails the routing gate at that layer.
"""

from __future__ import annotations

import json
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

#: DeepSeek-V2's yarn fields (mscale = mscale_all_dim = 0.707: cos/sin unscaled, softmax x mscale^2).
V2_YARN = {"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
           "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707, "rope_theta": 10000}
#: Only mscale given (the attention factor is then HF's default 0.1 ln(factor) + 1).
YARN_NO_ALL_DIM = {"rope_type": "yarn", "factor": 16, "original_max_position_embeddings": 2048, "beta_fast": 32,
                   "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.0, "rope_theta": 10000}
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000}


def _gate(r, dtype: str = "fp32"):
    return evaluate(r.rows, load_thresholds(dtype), list(r.meta["modes"]), r.num_layers, r.routing)


def _with_rope(src: Path, rope: dict) -> Path:
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_parameters"] = rope
    cfg.pop("rope_scaling", None)
    (src / "config.json").write_text(json.dumps(cfg))
    return src


def test_deepseek_v3_preset_passes_the_default_gate_with_the_long_probe(tmp_path):
    res = CliRunner().invoke(align, ["--model", "deepseek-v3", "--random-init", "--layers", "2", "--shrink",
                                     "--out", str(tmp_path), "--run", "v3"])
    assert res.exit_code == 0, res.output
    assert "gate: passed" in res.output and "UserWarning" not in res.output
    summary = json.loads((tmp_path / "v3" / "summary.json").read_text())
    assert summary["meta"]["probe_positions"] == [8192, 16384, 32768]
    probe = [c for c in summary["gate"]["checks"] if c["name"].startswith("probe@") and c["metric"] == "max_abs"]
    assert len(probe) == 3 and all(c["value"] <= 1e-4 for c in probe)
    routing = [c for c in summary["gate"]["checks"] if c["name"].startswith("routing.")]
    assert routing and all(c["value"] == 1.0 for c in routing)  # layer 1 is the MoE layer (first_k_dense 1)
    assert (tmp_path / "v3" / "routing.csv").exists() and (tmp_path / "v3" / "plots" / "routing.png").exists()
    assert "## MoE routing" in (tmp_path / "v3" / "report.md").read_text()


@pytest.mark.parametrize("rope", [V2_YARN, YARN_NO_ALL_DIM, DEFAULT_ROPE], ids=["v2-yarn", "yarn-mscale-only", "default"])
def test_mla_rope_types_agree_at_long_positions(tmp_path, rope):
    hf = _with_rope(build_tiny_hf("deepseek-v3", tmp_path / "hf", layers=2, seed=1), rope)
    r = run_alignment(AlignOptions(hf=hf, dtype="fp32", seq_len=16, modes=("propagated",)))
    assert r.probe_positions == [8192, 16384, 32768]
    checks = _gate(r)
    assert all(c.passed for c in checks), [c.message for c in checks if not c.passed]


def test_qwen3_moe_routes_every_token_like_hf_in_fp32():
    r = run_alignment(AlignOptions(preset="qwen3-30b-a3b", random_init=True, layers=2, shrink=True, dtype="fp32",
                                   seq_len=32, probe=False))
    base = [x for x in r.routing if x["setting"] == "baseline"]
    assert {(x["mode"], x["layer"]) for x in base} == {(m, i) for m in ("propagated", "isolated") for i in (0, 1)}
    assert all(x["topk_agreement"] == 1.0 and x["rank_flips"] == 0 and x["load_hf"] == x["load_mcore"] for x in base)
    assert all(x["router_logits_max_abs"] < 1e-5 for x in base)
    assert all(c.passed for c in _gate(r))


def test_dropped_expert_bias_fails_the_routing_gate_at_that_layer(tmp_path):
    """The MCore checkpoint is converted without the expert-score bias; HF keeps it (layer 1 only)."""
    hf = build_tiny_hf("deepseek-v3", tmp_path / "hf", layers=3, seed=2)
    convert(hf, tmp_path / "mcore", None, Target("mcore", ParallelLayout(), "torch_dist", "te", torch.float32))
    f = hf / "model.safetensors"
    t = load_file(f)
    key = "model.layers.1.mlp.gate.e_score_correction_bias"
    t[key] = torch.randn(t[key].shape, generator=torch.Generator().manual_seed(0))  # sigmoid scores are in (0, 1)
    save_file(t, f, metadata={"format": "pt"})
    out = tmp_path / "reports"
    res = CliRunner().invoke(align, ["--hf", str(hf), "--mcore", str(tmp_path / "mcore"), "--seq-len", "32",
                                     "--no-probe", "--out", str(out), "--run", "bias"])
    assert res.exit_code == 1, res.output
    assert "FAIL routing.layer1.topk_agreement" in res.output
    rows = json.loads((out / "bias" / "summary.json").read_text())["routing"]
    isolated = {x["layer"]: x for x in rows if x["setting"] == "baseline" and x["mode"] == "isolated"}
    # isolated mode (HF's input at every layer) names the broken router: only layer 1 routes differently;
    # propagated mode also flips layer 2, whose input the misrouted tokens of layer 1 changed
    assert isolated[1]["topk_agreement"] < 0.9 and isolated[1]["first_mismatches"]
    assert isolated[2]["topk_agreement"] == 1.0
    report = (out / "bias" / "report.md").read_text()
    assert "**Routing differs** at layer 1" in report


def test_convert_warns_where_megatron_cannot_reproduce_hf_yarn_and_align_confirms(tmp_path):
    """An explicit yarn attention_factor has no megatron field: convert says so (one line), and the
    alignment shows it is true (MCore's logits differ from HF's already on the short sample)."""
    from ckptbridge.cli import main

    hf = _with_rope(build_tiny_hf("deepseek-v3", tmp_path / "hf", layers=2, seed=1), {**V2_YARN, "attention_factor": 1.3})
    res = CliRunner().invoke(main, ["convert", str(hf), str(tmp_path / "mcore"), "--src", "hf", "--dst", "mcore", "--quiet"])
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and "attention_factor 1.3 has no megatron-core field" in lines[0]
    r = run_alignment(AlignOptions(hf=hf, mcore=tmp_path / "mcore", dtype="fp32", seq_len=16, modes=("propagated",),
                                   probe=False))
    assert not all(c.passed for c in _gate(r))
    plain = _with_rope(build_tiny_hf("deepseek-v3", tmp_path / "hf2", layers=2, seed=1), V2_YARN)
    res = CliRunner().invoke(main, ["convert", str(plain), str(tmp_path / "mcore2"), "--src", "hf", "--dst", "mcore", "--quiet"])
    assert res.exit_code == 0 and "warning:" not in res.output, res.output
