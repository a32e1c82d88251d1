"""``ckptbridge align``'s MoE routing metrics find every family's HF router from data.

The router is the module holding the HF tensor the mapping maps to ``decoder.layers.{L}.mlp.router.weight``:
``mlp.gate`` (Mixtral, Qwen, DeepSeek, GLM), ``mlp.router`` (gpt-oss's ``GptOssTopKRouter``),
``feed_forward.router`` (Llama 4's ``Llama4Router``, which returns dense ``(scores, logits)``). Hooking only
``mlp.gate`` reported nothing for gpt-oss and Llama 4; a MoE layer whose HF router is not found must say so.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckptbridge.align.cli import align
from ckptbridge.align.gate import evaluate, load_thresholds
from ckptbridge.align.runner import AlignOptions, run_alignment
from ckptbridge.mapping.registry import mappings_dir
from ckptbridge.presets import build_tiny_hf, convertible_config, load_preset, shrink_config
from ckptbridge.spec import ModelSpec
from arch_checks import mappings_in_use
from helpers import to_mcore


def moe_layers(preset: str, layers: int) -> list[int]:
    """The MoE layers of the preset's tiny model (``--layers N --shrink``), from the mapping's moe_layer_freq."""
    freq = ModelSpec.from_hf_config(shrink_config(convertible_config(load_preset(preset)), layers=layers)).args.get(
        "moe_layer_freq", 1)
    return list(range(layers)) if freq == 1 else [i for i, f in enumerate(freq) if f]


@pytest.mark.parametrize("preset", ["gpt-oss-20b", "llama4-maverick"])
def test_every_moe_layer_routes_like_hf(preset: str) -> None:
    r = run_alignment(AlignOptions(preset=preset, random_init=True, layers=2, shrink=True, dtype="fp32", seq_len=16,
                                   probe=False, modes=("propagated",)))
    rows = [x for x in r.routing if x["setting"] == "baseline"]
    assert sorted(x["layer"] for x in rows) == moe_layers(preset, 2) != []
    assert all(x["topk_agreement"] == 1.0 and x["rank_flips"] == 0 and x["router_logits_max_abs"] < 1e-5 for x in rows)
    routing = [c for c in evaluate(r.rows, load_thresholds("fp32"), ["propagated"], r.num_layers, r.routing)
               if c.name.startswith("routing.")]
    assert len(routing) == len(rows) and all(c.passed and c.value == 1.0 for c in routing)


def test_a_router_that_is_not_found_is_reported_and_fails_the_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Qwen3-MoE mapping whose router rule names a module transformers does not have: the report, the
    terminal and the gate say that routing was not measured at both MoE layers (never an empty section)."""
    hf = build_tiny_hf("qwen3-30b-a3b", tmp_path / "hf", layers=2, seed=4)
    mcore = to_mcore(hf, tmp_path / "mcore", "torch_dist")
    text = (mappings_dir() / "qwen3_moe.yaml").read_text()
    moved = text.replace("model.layers.{L}.mlp.gate.weight", "model.layers.{L}.mlp.router_gate.weight")
    assert moved != text
    folder = tmp_path / "mappings"
    folder.mkdir()
    (folder / "qwen3_moe.yaml").write_text(moved)
    with mappings_in_use(folder, monkeypatch):
        res = CliRunner().invoke(align, ["--hf", str(hf), "--mcore", str(mcore), "--seq-len", "16", "--no-probe",
                                         "--mode", "propagated", "--out", str(tmp_path / "out"), "--run", "r"])
    assert res.exit_code == 1, res.output
    assert "note: Routing not measured at MoE layer(s) 0, 1" in res.output
    assert "model.layers.{L}.mlp.router_gate" in res.output
    assert "FAIL routing.layer0.topk_agreement" in res.output and "FAIL routing.layer1.topk_agreement" in res.output
    report = (tmp_path / "out" / "r" / "report.md").read_text()
    assert "**Routing not measured** at MoE layer(s) 0, 1" in report
    rows = json.loads((tmp_path / "out" / "r" / "summary.json").read_text())["routing"]
    assert {x["layer"]: x["hf_router"] for x in rows} == {0: "not recorded", 1: "not recorded"}
