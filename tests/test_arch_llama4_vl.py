"""Llama 4 as the hub ships it (Llama4ForConditionalGeneration) is data: ``mappings/llama4_vl.yaml`` includes Llama 4
text's rules under ``hf_prefix: language_model.`` and carries the vision model and projector (``carry:``), which
megatron-core's GPTModel has no place for, through the MCore checkpoint unchanged.

A tiny model saved by transformers' Llama4ForConditionalGeneration (4 layers: dense, MoE, dense, MoE; layer 3 NoPE;
a 2-block vision model) round-trips bit-exactly, vision model included, at TP1/TP2/PP2/TP2xPP2 (EP2 where it
divides) in both formats, and its torch_dist output loads into megatron-core's GPTModel at other layouts with fp32
logits equal to transformers' on text-only tokens. (transformers 5.24's Llama4ForConditionalGeneration.forward
fails building its output -- it reads ``image_outputs`` from the language model's output, which has none -- so the
reference is the same model's ``language_model``, which is what its forward runs on text-only input; ``align`` runs
it too, as the module owning the head the mapping names, ``language_model.lm_head``.)
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from arch_checks import ATOL, LAYOUTS, assert_align_gate_passes, round_trip
from ckptbridge.align.mcore_side import checkpoint_args
from ckptbridge.formats.carried import CARRIED_FILE
from ckptbridge.mcore import model as mm
from ckptbridge.presets import build_tiny_hf, convertible_config, load_preset
from ckptbridge.spec import ModelSpec
from helpers import assert_bit_exact, hf_tensors, to_mcore
from mcore_runner import run_distributed

TOKENS = torch.randint(0, 1001, (2, 16), generator=torch.Generator().manual_seed(31))
CARRIED = ("vision_model.", "multi_modal_projector.")


@pytest.fixture(scope="module")
def vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_hf("llama4-maverick-vl", tmp_path_factory.mktemp("llama4_vl") / "hf", layers=4, seed=43)


def _logits(rank: int, world: int, iter_dir: str, tp: int, pp: int, ep: int) -> torch.Tensor | None:
    args = checkpoint_args(iter_dir, tp, pp, ep, None)
    mm.init_parallel(tp, pp, seed=100 + rank, ep=ep)
    models = mm.build_gpt_model(args, dtype=torch.float32)
    mm.load_torch_dist(models, iter_dir)
    return mm.forward_logits(models, TOKENS, vocab_size=args.vocab_size)


def test_preset_reads_the_nested_text_config() -> None:
    args = ModelSpec.from_hf_config(convertible_config(load_preset("llama4-maverick-vl"))).args
    assert list(args["no_rope_freq"]) == [0, 0, 0, 1] * 12 and list(args["moe_layer_freq"]) == [0, 1] * 24
    assert args["hidden_size"] == 5120 and args["num_moe_experts"] == 128 and args["vocab_size"] == 202048


@pytest.mark.parametrize("tp, pp", LAYOUTS)
@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_round_trip_bit_exact_vision_model_included(vl: Path, tmp_path: Path, fmt: str, tp: int, pp: int) -> None:
    mcore = round_trip(vl, tmp_path, fmt, tp, pp, ep=2)
    carried = {k: v for k, v in hf_tensors(vl).items() if k.startswith(CARRIED)}
    assert carried and not any(k.startswith("language_model.") for k in load_file(mcore / "release" / CARRIED_FILE))
    assert_bit_exact(carried, load_file(mcore / "release" / CARRIED_FILE))


@pytest.mark.parametrize("tp, pp, ep", [(1, 1, 2), (2, 1, 1)])
def test_megatron_loads_the_language_model_with_hf_logits(vl: Path, tmp_path: Path, tp: int, pp: int, ep: int) -> None:
    from transformers import Llama4ForConditionalGeneration

    mcore = to_mcore(vl, tmp_path / "mcore", "torch_dist", tp=2, pp=2, ep=2)
    model = Llama4ForConditionalGeneration.from_pretrained(vl, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model.language_model(input_ids=TOKENS).logits
    world = math.lcm(tp, ep * tp) * pp
    got = [g for g in run_distributed(_logits, world, str(mcore / "release"), tp, pp, ep, timeout=240) if g is not None]
    assert got and all((g - expected).abs().max() <= ATOL for g in got), (tp, pp, ep)


def test_align_gate_passes(tmp_path: Path) -> None:
    """``align --model llama4-maverick-vl --random-init --layers 2 --shrink``: the HF side runs the VLM's language
    model (the module owning the mapping's head) on text only, hooked through the VLM's prefixed module names;
    every point, the MoE routing and the preset's two long-position probes (4096, 7000) within the gate."""
    assert_align_gate_passes("llama4-maverick-vl", tmp_path / "align", probes=2)
