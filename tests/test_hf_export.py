"""The exported HF folder loads with the real transformers and gives identical logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import DENSE_PRESETS, MOE_PRESETS, to_hf, to_mcore


@pytest.mark.parametrize("preset", DENSE_PRESETS)
def test_exported_hf_logits_identical(tiny_hf, tmp_path, preset):
    src = tiny_hf[preset]
    mcore = to_mcore(src, tmp_path / "mcore", "torch", tp=2, pp=2)
    exported = to_hf(mcore, tmp_path / "hf")
    tokens = torch.randint(0, 1001, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(src).eval()(tokens).logits
        reloaded = AutoModelForCausalLM.from_pretrained(exported).eval()(tokens).logits
    assert torch.equal(original, reloaded)


@pytest.mark.parametrize("preset", MOE_PRESETS)
def test_exported_moe_hf_logits_identical(tiny_moe, tmp_path, preset):
    src = tiny_moe[preset]
    mcore = to_mcore(src, tmp_path / "mcore", "torch", tp=2, pp=2, ep=2, etp=1)
    exported = to_hf(to_mcore(mcore, tmp_path / "dist", "torch_dist", ep=4), tmp_path / "hf")
    tokens = torch.randint(0, 1001, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(src).eval()(tokens).logits
        reloaded = AutoModelForCausalLM.from_pretrained(exported).eval()(tokens).logits
    assert torch.equal(original, reloaded)
