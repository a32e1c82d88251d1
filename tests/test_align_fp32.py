"""Acceptance: on CPU in fp32 every dense preset (random init, shrunk) aligns -- HF vs MCore logits
max abs <= 1e-4 and 100 % top-1 agreement, in both modes and at every probe position."""

from __future__ import annotations

import pytest

from ckptbridge.align import points as P
from ckptbridge.align.gate import evaluate, load_thresholds
from ckptbridge.align.runner import AlignOptions, run_alignment
from helpers import DENSE_PRESETS


@pytest.mark.parametrize("preset", DENSE_PRESETS)
def test_dense_preset_aligns_in_fp32(preset):
    r = run_alignment(AlignOptions(preset=preset, random_init=True, layers=2, shrink=True, dtype="fp32", seq_len=16))
    logits = [row for row in r.rows if row["point"] == P.LOGITS]
    assert {(row["mode"], row["position"]) for row in logits} == \
        {("propagated", 0), ("isolated", 0)} | {("probe", p) for p in r.probe_positions}
    assert len(r.probe_positions) >= 2 and min(r.probe_positions) >= 8192
    for row in logits:
        assert row["max_abs"] <= 1e-4, row
        assert row["top1"] == 1.0, row
    # every point of both modes was captured on both sides: embedding, 5 per layer, final norm, logits
    for mode in ("propagated", "isolated"):
        assert [row["point"] for row in r.rows if row["mode"] == mode] == P.point_order(2)
    checks = evaluate(r.rows, load_thresholds("fp32"), ["propagated", "isolated"], r.num_layers)
    assert checks and all(c.passed for c in checks), [c.message for c in checks if not c.passed]
    assert r.meta["environment"]["device"] == "cpu" and "random init" in r.meta["hf_weights"]
