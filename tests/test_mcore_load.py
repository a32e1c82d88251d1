"""What we write loads into the real megatron-core GPTModel (CPU, gloo) and matches HF's logits.

torch_dist outputs go through megatron-core's own ``dist_checkpointing.load`` at a *different*
TP/PP than they were written with; legacy outputs load rank by rank into the matching shards.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ckptbridge.formats.legacy import FILE, rank_dir_name
from ckptbridge.formats.mcore_common import safe_load
from ckptbridge.layout import ParallelLayout
from ckptbridge.mcore import model as mm
from helpers import DENSE_PRESETS, resave_with_megatron, to_mcore, torch_dist_structure
from mcore_runner import run_distributed

ATOL = 1e-4
TOKENS = torch.randint(0, 1001, (2, 16), generator=torch.Generator().manual_seed(3))


def hf_logits(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(TOKENS).logits


def _relayout(args: argparse.Namespace, tp: int, pp: int, vpp: int | None = None) -> argparse.Namespace:
    out = argparse.Namespace(**vars(args))
    out.tensor_model_parallel_size, out.pipeline_model_parallel_size = tp, pp
    out.virtual_pipeline_model_parallel_size = vpp
    out.decoder_first_pipeline_num_layers = out.decoder_last_pipeline_num_layers = None
    return out


def _load_torch_dist(rank: int, world: int, iter_dir: str, tp: int, pp: int, vpp: int | None):
    args = _relayout(safe_load(Path(iter_dir) / "common.pt")["args"], tp, pp, vpp)
    mm.init_parallel(tp, pp, vpp, seed=100 + rank)  # weights differ until the load
    models = mm.build_gpt_model(args, dtype=torch.float32)
    mm.load_torch_dist(models, iter_dir)
    return mm.forward_logits(models, TOKENS, vocab_size=args.vocab_size)


def _load_legacy(rank: int, world: int, iter_dir: str, strict_plain: bool):
    args = None
    for sub in sorted(Path(iter_dir).iterdir()):
        if sub.name.startswith("mp_rank_"):
            args = safe_load(sub / FILE, map_location="meta")["args"]
            break
    layout = ParallelLayout.from_args(vars(args))
    mm.init_parallel(layout.tp, layout.pp, layout.vpp, seed=100 + rank)
    tp_rank, pp_rank = rank % layout.tp, rank // layout.tp
    state = safe_load(Path(iter_dir) / rank_dir_name(tp_rank, pp_rank, layout) / FILE)
    models = mm.build_gpt_model(args, dtype=torch.float32)
    if strict_plain:  # local-spec names: the plain, strict torch load must accept the file as is
        keys = ["model"] if len(models) == 1 else [f"model{i}" for i in range(len(models))]
        for model, key in zip(models, keys):
            model.load_state_dict(state[key], strict=True)
    else:
        mm.load_legacy_rank(models, state)
    return mm.forward_logits(models, TOKENS, vocab_size=args.vocab_size)


def _last_stage(results: list) -> list[torch.Tensor]:
    got = [r for r in results if r is not None]
    assert got
    return got


WRITE_READ = {  # preset: (written layout, loaded layout)
    "llama3.1-8b": (dict(tp=2, pp=2), (1, 1, None)),
    "llama3.2-1b": (dict(tp=1, pp=1), (2, 2, None)),
    "mistral-7b": (dict(tp=4, pp=1), (1, 2, 2)),
    "qwen2.5-7b": (dict(tp=1, pp=2), (2, 1, None)),
    "qwen2.5-0.5b": (dict(tp=2, pp=1), (1, 2, None)),
    "qwen3-8b": (dict(tp=1, pp=3, pp_first=1, pp_last=1), (2, 2, None)),
}


@pytest.mark.parametrize("preset", DENSE_PRESETS)
def test_torch_dist_loads_at_other_layout(tiny_hf, tmp_path, preset):
    written, (tp, pp, vpp) = WRITE_READ[preset]
    mcore = to_mcore(tiny_hf[preset], tmp_path / "mcore", "torch_dist", **written)
    expected = hf_logits(tiny_hf[preset])
    results = run_distributed(_load_torch_dist, tp * pp, str(mcore / "release"), tp, pp, vpp, timeout=180)
    for logits in _last_stage(results):
        assert logits.shape == expected.shape
        assert (logits - expected).abs().max() <= ATOL


@pytest.mark.parametrize(
    "preset, layout, spec",
    [
        ("llama3.1-8b", dict(tp=2, pp=2), "local"),
        ("qwen2.5-0.5b", dict(tp=1, pp=2, vpp=2), "local"),
        ("qwen3-8b", dict(tp=2, pp=1), "te"),
        ("mistral-7b", dict(tp=1, pp=2, pp_first=1, pp_last=3), "te"),
    ],
)
def test_legacy_loads_per_rank(tiny_hf, tmp_path, preset, layout, spec):
    mcore = to_mcore(tiny_hf[preset], tmp_path / "mcore", "torch", spec=spec, **layout)
    expected = hf_logits(tiny_hf[preset])
    world = layout["tp"] * layout["pp"]
    results = run_distributed(_load_legacy, world, str(mcore / "release"), spec == "local", timeout=180)
    for logits in _last_stage(results):
        assert (logits - expected).abs().max() <= ATOL


@pytest.mark.parametrize("preset, tp", [("qwen2.5-7b", 2), ("llama3.2-1b", 1)])
def test_torch_dist_layout_equals_megatrons_own_save(tiny_hf, tmp_path, preset, tp):
    """Keys, global shapes, dtypes, chunking and byte entries are what megatron-core itself writes."""
    ours = to_mcore(tiny_hf[preset], tmp_path / "ours", "torch_dist", tp=tp) / "release"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    run_distributed(resave_with_megatron, tp, str(ours), str(theirs), tp, 1, 1, timeout=180)
    assert torch_dist_structure(ours)[0] == torch_dist_structure(theirs)[0]
