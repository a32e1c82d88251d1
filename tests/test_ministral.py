"""Ministral (interleaved full / sliding-window attention) is data only: ``mappings/ministral.yaml``.

A tiny Ministral-8B-shaped model (4 layers: one full-attention layer, then three sliding ones, window 5)
converts at TP2 x PP2 in both MCore formats, round-trips bit-exactly, and loads into the real
megatron-core GPTModel at TP2 and TP1 with fp32 logits equal to HF's on 16 tokens (longer than the
window, so the window decides the result: without it the logits differ, which the last test shows).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ckptbridge.formats.mcore_common import safe_load
from ckptbridge.hf_config import normalise
from ckptbridge.layout import ParallelLayout
from ckptbridge.mcore import model as mm
from ckptbridge.presets import build_tiny_hf, load_preset
from ckptbridge.spec import ModelSpec
from helpers import assert_bit_exact, hf_config, hf_tensors, to_hf, to_mcore
from mcore_runner import run_distributed

ATOL = 1e-4
TOKENS = torch.randint(0, 1001, (2, 16), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def ministral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_hf("ministral-8b", tmp_path_factory.mktemp("ministral") / "hf", layers=4, seed=21)


def hf_logits(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(TOKENS).logits


def test_preset_translates_to_megatron_window_settings() -> None:
    spec = ModelSpec.from_hf_config(load_preset("ministral-8b")["hf_config"])
    assert spec.mapping.family == "ministral"
    assert spec.args["window_size"] == (32767, 0)
    assert spec.args["window_attn_skip_freq"] == [0, 1, 1, 1] * 9


def test_all_sliding_when_layer_types_absent() -> None:
    raw = {k: v for k, v in load_preset("ministral-8b")["hf_config"].items() if k != "layer_types"}
    args = ModelSpec.from_hf_config(raw).args
    assert args["window_size"] == (32767, 0) and args["window_attn_skip_freq"] is None
    assert normalise(raw)["sliding_layers"] is None


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_tp2pp2_round_trip_bit_exact(ministral: Path, tmp_path: Path, fmt: str) -> None:
    mcore = to_mcore(ministral, tmp_path / "mcore", fmt, tp=2, pp=2)
    back = to_hf(mcore, tmp_path / "hf")
    assert_bit_exact(hf_tensors(ministral), hf_tensors(back))
    assert hf_config(back) == hf_config(ministral)


def _logits(rank: int, world: int, iter_dir: str, tp: int, drop_window: bool) -> torch.Tensor | None:
    args = safe_load(Path(iter_dir) / "common.pt")["args"]
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size = tp, 1
    if drop_window:
        args.window_size = None
    mm.init_parallel(tp, 1, seed=100 + rank)
    models = mm.build_gpt_model(args, dtype=torch.float32)
    mm.load_torch_dist(models, iter_dir)
    return mm.forward_logits(models, TOKENS, vocab_size=args.vocab_size)


def test_loads_in_megatron_with_hf_logits(ministral: Path, tmp_path: Path) -> None:
    mcore = to_mcore(ministral, tmp_path / "mcore", "torch_dist", tp=2, pp=2)
    expected = hf_logits(ministral)
    for tp in (2, 1):
        for logits in run_distributed(_logits, tp, str(mcore / "release"), tp, False, timeout=180):
            assert (logits - expected).abs().max() <= ATOL, tp
    # the window matters at this length: the same weights without it compute something else
    (full,) = run_distributed(_logits, 1, str(mcore / "release"), 1, True, timeout=180)
    assert (full - expected).abs().max() > 100 * ATOL


def test_megatron_args_carry_the_window(ministral: Path, tmp_path: Path) -> None:
    mcore = to_mcore(ministral, tmp_path / "mcore", "torch_dist", tp=2, pp=2)
    args = safe_load(mcore / "release" / "common.pt")["args"]
    assert tuple(args.window_size) == (4, 0) and list(args.window_attn_skip_freq) == [0, 1, 1, 1]
    assert ParallelLayout.from_args(vars(args)) == ParallelLayout(2, 2, etp=2)
