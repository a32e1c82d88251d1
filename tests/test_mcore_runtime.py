"""megatron-core runtime helpers: build, torch_dist load across layouts, forward (CPU, gloo).

A TP1 model is saved with megatron's own ``dist_checkpointing.save``; the same checkpoint
is loaded via ``load_torch_dist`` at other TP/PP/VPP layouts into models initialised with a
*different* seed, and the logits must match the TP1 reference.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mcore_runner import run_distributed  # noqa: E402

from ckptbridge.mcore import model as mm  # noqa: E402  (imports megatron before forking)

ATOL = 1e-5
SEQ = 16
TOKENS = torch.randint(0, 250, (2, SEQ), generator=torch.Generator().manual_seed(0))


def tiny_args(**kw: Any) -> argparse.Namespace:
    """A Llama-like Megatron-LM args namespace (the fields our checkpoints store)."""
    base: dict[str, Any] = dict(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        group_query_attention=True,
        kv_channels=16,
        normalization="RMSNorm",
        norm_epsilon=1e-5,
        swiglu=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=False,
        position_embedding_type="rope",
        rotary_base=10000,
        rotary_percent=1.0,
        use_rope_scaling=False,
        rope_scaling_factor=8.0,
        max_position_embeddings=64,
        untie_embeddings_and_output_weights=True,
        vocab_size=250,
        padded_vocab_size=256,
        make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
        decoder_first_pipeline_num_layers=None,
        decoder_last_pipeline_num_layers=None,
        transformer_impl="local",
        params_dtype=torch.bfloat16,
        bf16=True,
        fp16=False,
        seq_length=SEQ,
    )
    base.update(kw)
    return argparse.Namespace(**base)


def with_layout(args: argparse.Namespace, tp: int, pp: int, vpp: int | None) -> argparse.Namespace:
    return argparse.Namespace(
        **{
            **vars(args),
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": pp,
            "virtual_pipeline_model_parallel_size": vpp,
        }
    )


def _save_tp1(rank: int, world: int, args: argparse.Namespace, ckpt: str) -> list[Any]:
    """Build at TP1, save torch_dist, return reference logits."""
    from megatron.core import dist_checkpointing

    mm.init_parallel(1, 1, seed=1)
    models = mm.build_gpt_model(args)
    os.makedirs(ckpt, exist_ok=True)
    dist_checkpointing.save(models[0].sharded_state_dict(), ckpt)
    logits = mm.forward_logits(models, TOKENS)
    assert logits is not None
    return [logits, sorted(models[0].state_dict().keys())]


def _load_layout(
    rank: int, world: int, args: argparse.Namespace, ckpt: str
) -> torch.Tensor | None:
    tp = args.tensor_model_parallel_size
    pp = args.pipeline_model_parallel_size
    vpp = args.virtual_pipeline_model_parallel_size
    mm.init_parallel(tp, pp, vpp, seed=1000 + rank)  # different init than the saved model
    models = mm.build_gpt_model(args)
    assert len(models) == (vpp or 1)
    mm.load_torch_dist(models, ckpt)
    return mm.forward_logits(models, TOKENS)


def _last_stage_logits(results: list[torch.Tensor | None], tp: int, pp: int) -> list[torch.Tensor]:
    """Ranks of the last PP stage (megatron order tp-dp-pp: last tp ranks) return logits."""
    got = [r for r in results if r is not None]
    assert len(got) == tp, [None if r is None else tuple(r.shape) for r in results]
    assert all(r is not None for r in results[(pp - 1) * tp :])
    return got


@pytest.fixture(scope="module")
def ref2(tmp_path_factory: pytest.TempPathFactory) -> tuple[argparse.Namespace, str, torch.Tensor]:
    args = tiny_args()
    ckpt = str(tmp_path_factory.mktemp("tp1_2l") / "iter_0000001")
    logits, keys = run_distributed(_save_tp1, 1, args, ckpt, timeout=120)[0]
    assert logits.shape == (2, SEQ, 250) and logits.dtype == torch.float32
    assert "decoder.layers.0.self_attention.linear_qkv._extra_state" in keys
    return args, ckpt, logits


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_layouts_match_tp1(
    ref2: tuple[argparse.Namespace, str, torch.Tensor], tp: int, pp: int
) -> None:
    args, ckpt, ref = ref2
    largs = with_layout(args, tp, pp, None)
    results = run_distributed(_load_layout, tp * pp, largs, ckpt, timeout=120)
    for logits in _last_stage_logits(results, tp, pp):
        assert logits.shape == ref.shape
        assert (logits - ref).abs().max().item() <= ATOL


def test_pp2_vpp2_tied_matches_tp1(tmp_path: Path) -> None:
    """4 layers, interleaved schedule, tied embeddings (output layer copy on the last stage)."""
    args = tiny_args(num_layers=4, untie_embeddings_and_output_weights=False)
    ckpt = str(tmp_path / "iter_0000001")
    ref, keys = run_distributed(_save_tp1, 1, args, ckpt, timeout=120)[0]
    assert "output_layer.weight" not in keys  # tied: single copy at PP=1
    results = run_distributed(_load_layout, 2, with_layout(args, 1, 2, 2), ckpt, timeout=120)
    (logits,) = _last_stage_logits(results, 1, 2)
    assert (logits - ref).abs().max().item() <= ATOL


def test_qk_layernorm_qkv_bias_builds_and_loads(tmp_path: Path) -> None:
    args = tiny_args(qk_layernorm=True, add_qkv_bias=True)
    ckpt = str(tmp_path / "release")
    ref, keys = run_distributed(_save_tp1, 1, args, ckpt, timeout=120)[0]
    assert "decoder.layers.0.self_attention.q_layernorm.weight" in keys
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in keys
    results = run_distributed(_load_layout, 2, with_layout(args, 2, 1, None), ckpt, timeout=120)
    for logits in _last_stage_logits(results, 2, 1):
        assert (logits - ref).abs().max().item() <= ATOL


def _load_expect_error(rank: int, world: int, args: argparse.Namespace, ckpt: str) -> str:
    mm.init_parallel(1, 1)
    models = mm.build_gpt_model(args)
    try:
        mm.load_torch_dist(models, ckpt)
    except mm.CheckpointMismatchError as e:
        return str(e)
    return "loaded"


def test_strict_load_rejects_mismatches(ref2: tuple[argparse.Namespace, str, torch.Tensor]) -> None:
    """A tensor absent from the checkpoint, and a layer-count mismatch (found by megatron's
    global-shape check: the default layout stacks layers on a leading ``num_layers`` axis)."""
    args, ckpt, _ = ref2
    (absent,) = run_distributed(_load_expect_error, 1, tiny_args(qk_layernorm=True), ckpt)
    assert "decoder.layers.self_attention.q_layernorm.weight" in absent
    (depth,) = run_distributed(_load_expect_error, 1, tiny_args(num_layers=1), ckpt)
    assert "Global shape mismatch" in depth


def _legacy_roundtrip(rank: int, world: int, args: argparse.Namespace) -> float:
    mm.init_parallel(1, 2, 2, seed=7)
    src = mm.build_gpt_model(args)
    sd = {f"model{i}": m.state_dict() for i, m in enumerate(src)}
    # a converter may omit _extra_state entirely
    sd = {k: {n: t for n, t in v.items() if not n.endswith("_extra_state")} for k, v in sd.items()}
    mm.init_parallel(1, 2, 2, seed=99)
    dst = mm.build_gpt_model(args)
    mm.load_legacy_rank(dst, sd)
    return max(
        (a - b).abs().max().item()
        for s, d in zip(src, dst, strict=True)
        for a, b in zip(s.state_dict().values(), d.state_dict().values(), strict=True)
        if isinstance(a, torch.Tensor)
    )


def test_legacy_rank_load_vpp() -> None:
    args = with_layout(tiny_args(num_layers=4), 1, 2, 2)
    assert run_distributed(_legacy_roundtrip, 2, args, timeout=120) == [0.0, 0.0]


def _hang_or_die(rank: int, world: int, mode: str) -> int:
    import time

    if rank == 1:
        if mode == "die":
            os._exit(3)
        if mode == "raise":
            raise ValueError("boom from rank 1")
        time.sleep(60)
    return rank


@pytest.mark.parametrize(
    "mode,match", [("hang", "timeout"), ("die", "without a result"), ("raise", "boom from rank 1")]
)
def test_runner_reports_failures(mode: str, match: str) -> None:
    """The runner never hangs: a stuck, dead or raising worker becomes a WorkerError."""
    from mcore_runner import WorkerError

    with pytest.raises(WorkerError, match=match):
        run_distributed(_hang_or_die, 2, mode, timeout=3)
