"""Our MoE checkpoints load into the real megatron-core MoE GPTModel (CPU, gloo) and match HF.

Mixtral (top-2, renormalised), Qwen3-MoE (top-2, renormalised, QK-norm) and Qwen2-MoE
(``qwen1.5-moe``: top-2 of a full softmax, shared expert with sigmoid gate).  torch_dist outputs
go through megatron's own ``dist_checkpointing.load`` at a *different* TP/PP/EP than they were
written with; the token dispatcher is the ``alltoall`` one the args name (compat patch P6).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ckptbridge.harness.checkpoint_args import checkpoint_args
from ckptbridge.formats.legacy import FILE, rank_dir_name
from ckptbridge.formats.mcore_common import safe_load
from ckptbridge.layout import ParallelLayout
from ckptbridge.mcore import model as mm
from helpers import resave_with_megatron, to_mcore, torch_dist_structure
from mcore_runner import run_distributed

ATOL = 1e-4
TOKENS = torch.randint(0, 1001, (2, 16), generator=torch.Generator().manual_seed(3))



def hf_logits(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        return model(TOKENS).logits


def _load_torch_dist(
    rank: int, world: int, iter_dir: str, tp: int, pp: int, ep: int, etp: int | None
):
    args = checkpoint_args(iter_dir, tp, pp, ep, etp)
    assert args.moe_token_dispatcher_type == "alltoall"
    mm.init_parallel(tp, pp, seed=100 + rank, ep=ep, etp=etp)  # weights differ until the load
    models = mm.build_gpt_model(args, dtype=torch.float32)
    mm.load_torch_dist(models, iter_dir)
    return mm.forward_logits(models, TOKENS, vocab_size=args.vocab_size)


def _world(tp: int, pp: int, ep: int, etp: int) -> int:
    """Fewest ranks for the layout: TP and ETP x EP groups may share ranks (DP = 1)."""
    return math.lcm(tp, ep * etp) * pp


WRITE_READ = {  # preset: (written layout, loaded (tp, pp, ep, etp))
    "mixtral-8x7b": (dict(tp=1, pp=1, ep=2), (1, 2, 1, 1)),
    "qwen3-30b-a3b": (dict(tp=1, pp=1, ep=4), (2, 1, 2, 1)),  # TP2 x EP2 on the same 2 ranks
    "qwen1.5-moe-a2.7b": (dict(tp=2, pp=1, ep=1), (1, 1, 2, 1)),
}


@pytest.mark.parametrize("preset", list(WRITE_READ))
def test_torch_dist_loads_at_other_ep(tiny_moe, tmp_path, preset):
    written, (tp, pp, ep, etp) = WRITE_READ[preset]
    mcore = to_mcore(tiny_moe[preset], tmp_path / "mcore", "torch_dist", **written)
    expected = hf_logits(tiny_moe[preset])
    world = _world(tp, pp, ep, etp)
    results = run_distributed(
        _load_torch_dist, world, str(mcore / "release"), tp, pp, ep, etp, timeout=180
    )
    got = [r for r in results if r is not None]
    assert len(got) == world // pp
    for logits in got:
        assert logits.shape == expected.shape
        assert (logits - expected).abs().max() <= ATOL


def _load_legacy(rank: int, world: int, iter_dir: str):
    from megatron.core import parallel_state as ps

    first = next(p for p in sorted(Path(iter_dir).iterdir()) if p.name.startswith("mp_rank_"))
    args = safe_load(first / FILE, map_location="meta")["args"]
    layout = ParallelLayout.from_args(vars(args))
    etp = args.expert_tensor_parallel_size
    mm.init_parallel(layout.tp, layout.pp, seed=100 + rank, ep=layout.ep, etp=etp)
    name = rank_dir_name(
        ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(), layout,
        ps.get_expert_model_parallel_rank(),
    )
    state = safe_load(Path(iter_dir) / name / FILE)
    models = mm.build_gpt_model(args, dtype=torch.float32)
    own = set(models[0].state_dict())
    mm.load_legacy_rank(models, state)
    logits = mm.forward_logits(models, TOKENS, vocab_size=args.vocab_size)
    from ckptbridge.mcore.load import _te_to_local

    renamed = set(_te_to_local(models[0], state["model"]))
    return logits, sorted(own - renamed), sorted(renamed - own)


def test_legacy_loads_per_ep_rank(tiny_moe, tmp_path):
    preset = "qwen1.5-moe-a2.7b"  # every MoE key kind: router, routed + shared experts, gate
    mcore = to_mcore(tiny_moe[preset], tmp_path / "mcore", "torch", tp=1, pp=1, ep=2)
    ranks = sorted(p.name for p in (mcore / "release").iterdir())
    assert ranks == ["mp_rank_00_000", "mp_rank_00_001"]
    expected = hf_logits(tiny_moe[preset])
    for logits, absent, extra in run_distributed(_load_legacy, 2, str(mcore / "release"), timeout=180):
        assert (logits - expected).abs().max() <= ATOL
        assert extra == [] and absent == []  # every key the local-spec model has, _extra_state included


def test_torch_dist_layout_equals_megatrons_own_save(tiny_moe, tmp_path):
    """Keys, global shapes, dtypes, chunking and byte payloads are what megatron-core writes.

    Including the routed and shared experts' ``_extra_state`` entries (one per layer and global
    expert), byte for byte.
    """
    preset, tp, ep, etp = "qwen1.5-moe-a2.7b", 2, 2, 1
    ours = to_mcore(tiny_moe[preset], tmp_path / "ours", "torch_dist", tp=tp, ep=ep, etp=etp)
    ours = ours / "release"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    world = _world(tp, 1, ep, etp)
    run_distributed(resave_with_megatron, world, str(ours), str(theirs), tp, ep, etp, timeout=180)

    (a, a_bytes), (b, b_bytes) = torch_dist_structure(ours), torch_dist_structure(theirs)
    assert a == b
    assert a_bytes == b_bytes
    # 2 layers x 8 experts x (fc1, fc2) + 2 layers x (fc1, fc2) of the shared expert, + attention
    assert "decoder.layers.mlp.experts.experts.linear_fc1._extra_state/shard_1.7_2.8" in a
    assert "decoder.layers.mlp.shared_experts.linear_fc2._extra_state/shard_1_2" in a
