"""Checkpoints saved from real megatron-core training the way Megatron-LM's ``save_checkpoint`` writes them.

Each test trains one tiny model a few steps in one forked worker group, saves it with
``ckptbridge.converge.megatron_save`` and, in the same workers, trains one step more and loads the
checkpoint back with megatron-core (``dist_checkpointing.load`` / ``load_state_dict`` +
``load_parameter_state``): every model and optimizer tensor must come back exactly.  The structure is
compared with a checkpoint Megatron-LM itself wrote (tests/fixtures/megatron-lm).
"""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

import pytest
import torch

from ckptbridge.presets import build_tiny_hf

from helpers import torch_dist_structure
from megatron_training import train_and_save

FIXTURE = Path(__file__).parent / "fixtures" / "megatron-lm"
#: keys the fixture has because Megatron-LM ran TransformerEngine's attention; the local spec has no such module
TE_ONLY = {"decoder.layers.self_attention.core_attention._extra_state/shard_0_2",
           "decoder.layers.self_attention.core_attention._extra_state/shard_1_2"}
COMMON_KEYS = {"args", "checkpoint_version", "iteration", "optimizer", "opt_param_scheduler",
               "num_floating_point_operations_so_far", "content_metadata"}
LEGACY_KEYS = {"args", "checkpoint_version", "iteration", "model", "optimizer", "rng_state", "opt_param_scheduler",
               "num_floating_point_operations_so_far"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("megatron_save_hf")
    return {"qwen3": build_tiny_hf("qwen3-8b", root / "qwen3", layers=2, seed=3),
            "qwen3-moe": build_tiny_hf("qwen3-30b-a3b", root / "qwen3-moe", layers=2, seed=4)}


def _common(iter_dir: Path) -> dict:
    import megatron.core  # noqa: F401 - registers megatron-core's safe globals (ModelType, AttnBackend, Signals...)

    return torch.load(iter_dir / "common.pt", map_location="cpu", weights_only=True)


def _assert_reloaded(out: dict) -> None:
    assert out["moved_by_extra_step"] > 0  # the extra step changed the state the reload must restore
    assert out["reload_mismatches"] == {}
    assert out["losses"][0] != out["losses"][-1]


def _assert_megatron_lm_args(args: argparse.Namespace, *, tp: int, pp: int, ep: int, fmt: str, dist: bool,
                             iteration: int) -> None:
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    assert isinstance(args, argparse.Namespace)
    assert args.model_type is ModelType.encoder_or_decoder and args.attention_backend is AttnBackend.auto
    assert args.exit_signal is signal.SIGTERM
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size) \
        == (tp, pp, ep)
    assert (args.ckpt_format, args.use_distributed_optimizer, args.iteration) == (fmt, dist, iteration)
    assert args.tokenizer_type == "NullTokenizer" and args.vocab_size == 1000 and args.padded_vocab_size == 1024
    assert isinstance(args.params_dtype, torch.dtype) and isinstance(args.layernorm_epsilon, float)
    assert not hasattr(args, "norm_epsilon") and not hasattr(args, "num_moe_experts")  # Megatron-LM's names only


def test_torch_dist_matches_megatron_lm_fixture(tmp_path):
    """The fixture's own HF weights, trained in bf16 at TP2 x PP2 with the distributed optimizer: the
    .metadata entries (model, optimizer.distributed.* buckets, rng_state) and common.pt equal Megatron-LM's."""
    out = train_and_save(FIXTURE / "llama-hf", tmp_path / "ckpt", tp=2, pp=2, dtype=torch.bfloat16, steps=2,
                         check_reload=True)
    _assert_reloaded(out)
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "2"
    ours, _ = torch_dist_structure(tmp_path / "ckpt" / "iter_0000002")
    theirs, _ = torch_dist_structure(FIXTURE / "llama-td-tp2pp2" / "iter_0000100")
    assert set(theirs) - set(ours) == TE_ONLY and set(ours) - set(theirs) == set()
    assert {k: v for k, v in ours.items()} == {k: v for k, v in theirs.items() if k not in TE_ONLY}
    common = _common(tmp_path / "ckpt" / "iter_0000002")
    reference = _common(FIXTURE / "llama-td-tp2pp2" / "iter_0000100")
    assert set(common) == set(reference) == COMMON_KEYS
    assert common["content_metadata"] == reference["content_metadata"]
    assert common["optimizer"] == reference["optimizer"] == {"param_state_sharding_type": "dp_reshardable"}
    assert set(common["opt_param_scheduler"]) == set(reference["opt_param_scheduler"])
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 2
    _assert_megatron_lm_args(common["args"], tp=2, pp=2, ep=1, fmt="torch_dist", dist=True, iteration=2)
    assert common["args"].bf16 and common["args"].params_dtype == torch.bfloat16
    shared = set(vars(reference["args"])) & set(vars(common["args"]))
    assert {k for k in shared if type(vars(reference["args"])[k]) is not type(vars(common["args"])[k])
            and None not in (vars(reference["args"])[k], vars(common["args"])[k])} == set()
    assert out["logits"].shape == (2, 12, 1001) and out["logits"].dtype == torch.float32


def test_torch_dist_plain_optimizer(tiny, tmp_path):
    """Non-distributed optimizer: Adam's moments as ``optimizer.state.*`` entries beside the model's."""
    out = train_and_save(tiny["qwen3"], tmp_path / "ckpt", tp=2, pp=2, distributed_optimizer=False,
                         check_reload=True)
    _assert_reloaded(out)
    keys, _ = torch_dist_structure(tmp_path / "ckpt" / "iter_0000003")
    model = {k for k in keys if k.startswith(("embedding.", "decoder.", "output_layer.")) and "_extra_state" not in k}
    for state in ("exp_avg", "exp_avg_sq"):
        assert {k[len(f"optimizer.state.{state}."):] for k in keys if k.startswith(f"optimizer.state.{state}.")} \
            == model
    assert {k for k in keys if k.startswith("rng_state")} == {f"rng_state/shard_{p}.{t}_2.2" for p in (0, 1)
                                                               for t in (0, 1)}
    common = _common(tmp_path / "ckpt" / "iter_0000003")
    assert set(common) == COMMON_KEYS
    assert "distrib_optim_sharding_type" not in common["content_metadata"]
    _assert_megatron_lm_args(common["args"], tp=2, pp=2, ep=1, fmt="torch_dist", dist=False, iteration=3)


def test_torch_dist_moe_ep2_fully_reshardable(tiny, tmp_path):
    """Qwen3-MoE at EP2 (TP1: MoE training on CPU has no sequence parallelism), the fully reshardable
    optimizer format; with expert parallelism the RNG states are sharded over (PP, TP, DP)."""
    out = train_and_save(tiny["qwen3-moe"], tmp_path / "ckpt", ep=2, sharding_type="fully_reshardable",
                         check_reload=True)
    _assert_reloaded(out)
    keys, _ = torch_dist_structure(tmp_path / "ckpt" / "iter_0000003")
    assert {k for k in keys if k.startswith("rng_state")} == {"rng_state/shard_0.0.0_1.1.2", "rng_state/shard_0.0.1_1.1.2"}
    assert any(k.startswith("optimizer.state.exp_avg.decoder.layers.mlp.experts.experts.linear_fc1") for k in keys)
    common = _common(tmp_path / "ckpt" / "iter_0000003")
    assert common["content_metadata"]["distrib_optim_sharding_type"] == "fully_reshardable"
    _assert_megatron_lm_args(common["args"], tp=1, pp=1, ep=2, fmt="torch_dist", dist=True, iteration=3)
    assert common["args"].num_experts == 8 and common["args"].dist_ckpt_optim_fully_reshardable


@pytest.mark.parametrize("name, tp, pp, ep, dist, folders", [
    ("qwen3", 2, 2, 1, False, ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]),
    ("qwen3-moe", 1, 1, 2, True, ["mp_rank_00_000", "mp_rank_00_001"]),
])
def test_legacy_torch(tiny, tmp_path, name, tp, pp, ep, dist, folders):
    """``--ckpt-format torch``: one model_optim_rng.pt per model-parallel rank (``_PPP`` with PP, ``_EEE``
    with EP) and, with the distributed optimizer, distrib_optim.pt beside it."""
    out = train_and_save(tiny[name], tmp_path / "ckpt", tp=tp, pp=pp, ep=ep, fmt="torch",
                         distributed_optimizer=dist, check_reload=True)
    _assert_reloaded(out)
    iter_dir = tmp_path / "ckpt" / "iter_0000003"
    assert sorted(p.name for p in iter_dir.iterdir()) == folders
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "3"
    for folder in folders:
        files = sorted(p.name for p in (iter_dir / folder).iterdir())
        assert files == (["distrib_optim.pt", "model_optim_rng.pt"] if dist else ["model_optim_rng.pt"])
        state = torch.load(iter_dir / folder / "model_optim_rng.pt", map_location="cpu", weights_only=True)
        assert set(state) == LEGACY_KEYS
        assert isinstance(state["rng_state"], list) and set(state["rng_state"][0]) == {
            "random_rng_state", "np_rng_state", "torch_rng_state", "cuda_rng_state", "rng_tracker_states"}
        assert any(k.startswith("decoder.layers.0.") for k in state["model"])
        _assert_megatron_lm_args(state["args"], tp=tp, pp=pp, ep=ep, fmt="torch", dist=dist, iteration=3)
        if not dist:
            assert "state" in state["optimizer"] or "optimizer" in state["optimizer"]


def test_converge_save_keeps_the_baseline(tmp_path):
    """``ckptbridge converge --save DIR``: the baseline's trained model and optimizer in Megatron-LM's layout."""
    from click.testing import CliRunner

    from ckptbridge.converge.cli import converge

    res = CliRunner().invoke(converge, ["--model", "llama3.2-1b", "--random-init", "--layers", "2", "--shrink",
                                        "--steps", "4", "--seq-len", "16", "--variants", "baseline", "--no-envelope",
                                        "--no-step0", "--tp", "2", "--out", str(tmp_path / "reports"), "--run", "r",
                                        "--save", str(tmp_path / "trained"), "--save-format", "torch", "-q"])
    assert res.exit_code == 0, res.output
    root = tmp_path / "trained"
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert sorted(p.name for p in (root / "iter_0000004").iterdir()) == ["mp_rank_00", "mp_rank_01"]
    state = torch.load(root / "iter_0000004" / "mp_rank_01" / "model_optim_rng.pt", weights_only=True)
    assert set(state) == LEGACY_KEYS
    assert state["args"].ckpt_format == "torch" and state["args"].tensor_model_parallel_size == 2
