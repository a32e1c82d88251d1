"""Save a megatron-core training run the way Megatron-LM's ``save_checkpoint`` does (core_v0.16.1).

Users import HF -> MCore with ckptbridge, train with Megatron-LM, and export what *training* wrote:
model and optimizer in the same files, an ``args`` Namespace holding Megatron-LM's enum values, RNG
states, the learning-rate scheduler, no ckptbridge record.  This module writes exactly that from a
real megatron-core run (``converge``'s trainer), through megatron-core's own save paths only --
``dist_checkpointing.save`` for ``torch_dist``, ``torch.save`` of ``state_dict_for_save_checkpoint()`` /
``optimizer.state_dict()`` and ``DistributedOptimizer.save_parameter_state`` for the legacy ``torch``
format -- never ckptbridge's writers, so what ckptbridge reads back is what Megatron-LM would leave.

Layout (``ROOT`` = the ``--save`` folder):

* ``ROOT/latest_checkpointed_iteration.txt``: the iteration number;
* torch_dist: ``ROOT/iter_NNNNNNN/`` with ``common.pt``, ``metadata.json``, ``.metadata``, ``__R_k.distcp``;
* torch: ``ROOT/iter_NNNNNNN/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`` (+ ``distrib_optim.pt``).

Virtual pipeline stages (``model0``, ``model1``...) are written when the run has several chunks; the
converge trainer runs one.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CkptBridgeError
from ..megatron_args import to_megatron_lm

FORMATS = ("torch_dist", "torch")
#: DistributedOptimizer.sharded_state_dict sharding types written here: Megatron-LM 0.16's default
#: (``dp_reshardable``) and its ``--dist-ckpt-optim-fully-reshardable`` one.  The older per-parameter
#: ``fully_sharded_model_space`` cannot be saved by megatron-core 0.16.1 any more: it builds
#: ``ShardedTensor(flattened_range=...)``, which dist_checkpointing/mapping.py:134 now refuses.
SHARDING_TYPES = ("dp_reshardable", "fully_reshardable")
#: Megatron-LM's ``checkpoint_version`` since 2021 (generate_state_dict)
CHECKPOINT_VERSION = 3.0
TRACKER = "latest_checkpointed_iteration.txt"


@dataclass(frozen=True)
class MegatronSave:
    """Where and how a run saves as Megatron-LM; picklable, travels inside a ``TrainJob``."""

    root: str
    fmt: str = "torch_dist"
    sharding_type: str = "dp_reshardable"  # used only with the distributed optimizer

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise CkptBridgeError(f"save format {self.fmt!r}: must be one of {', '.join(FORMATS)}")
        if self.sharding_type not in SHARDING_TYPES:
            raise CkptBridgeError(f"optimizer sharding type {self.sharding_type!r}: must be one of "
                                  f"{', '.join(SHARDING_TYPES)}")


@dataclass(frozen=True)
class RunFacts:
    """What the training run knows that Megatron-LM's parser would have been told on its command line."""

    iteration: int
    train_iters: int
    dtype: torch.dtype
    tp: int
    pp: int
    ep: int
    world: int
    micro_batch_size: int
    global_batch_size: int
    seq_length: int
    lr: float
    warmup: int
    seed: int
    optimizer: dict[str, Any]  # OptimizerConfig fields the run used
    use_distributed_optimizer: bool
    save: MegatronSave


# ------------------------------------------------------------------------------------------- args


def megatron_lm_args(start: argparse.Namespace, run: RunFacts) -> argparse.Namespace:
    """The ``args`` Namespace Megatron-LM's ``pretrain_gpt`` would have saved for this run.

    Starts from the checkpoint the run began with (its model fields, renamed to Megatron-LM's
    argument names) and sets the run's own facts under Megatron-LM's argparse destinations, with
    Megatron-LM's own value types: ``ModelType``, ``AttnBackend`` and ``signal.Signals`` members and a
    ``torch.dtype`` -- the types a reader must allow-list.  The run feeds token ids directly, which
    is Megatron-LM's ``NullTokenizer``: its ``--vocab-size`` is one less than the model's vocabulary
    (the tokenizer adds an end-of-document token), exactly as in a Megatron-LM checkpoint.

    One small function on purpose: a full Megatron-LM argument table can replace it.
    """
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    a = to_megatron_lm(vars(start))
    if float(a.get("rotary_base", 10000)).is_integer():
        a["rotary_base"] = int(a.get("rotary_base", 10000))  # --rotary-base is an int flag
    true_vocab = int(a["vocab_size"])
    opt = run.optimizer
    lr = float(run.lr)
    dp = run.world // (run.tp * run.pp)
    a.update(
        # model and precision
        model_type=ModelType.encoder_or_decoder, attention_backend=AttnBackend.auto,
        transformer_impl="local", params_dtype=run.dtype, bf16=run.dtype == torch.bfloat16,
        fp16=run.dtype == torch.float16, num_experts=a.get("num_experts"),
        # parallelism
        tensor_model_parallel_size=run.tp, pipeline_model_parallel_size=run.pp,
        expert_model_parallel_size=run.ep, expert_tensor_parallel_size=run.tp, virtual_pipeline_model_parallel_size=None,
        context_parallel_size=1, sequence_parallel=False, data_parallel_size=dp, world_size=run.world, rank=0,
        use_distributed_optimizer=run.use_distributed_optimizer,
        # tokenizer and vocabulary (NullTokenizer: --vocab-size + 1 tokens, padded by the builder)
        tokenizer_type="NullTokenizer", tokenizer_model=None, vocab_size=true_vocab - 1,
        # training schedule and optimizer
        iteration=run.iteration, train_iters=run.train_iters, micro_batch_size=run.micro_batch_size,
        global_batch_size=run.global_batch_size, seq_length=run.seq_length,
        consumed_train_samples=run.iteration * run.global_batch_size, consumed_valid_samples=0,
        optimizer=opt.get("optimizer", "adam"), lr=lr, min_lr=lr, lr_decay_style="constant",
        lr_warmup_iters=run.warmup, weight_decay=opt.get("weight_decay", 0.01),
        start_weight_decay=opt.get("weight_decay", 0.01), end_weight_decay=opt.get("weight_decay", 0.01),
        weight_decay_incr_style="constant", adam_beta1=opt.get("adam_beta1", 0.9),
        adam_beta2=opt.get("adam_beta2", 0.999), adam_eps=opt.get("adam_eps", 1e-8),
        clip_grad=opt.get("clip_grad", 1.0), seed=run.seed, data_parallel_random_init=False,
        # checkpointing
        save=run.save.root, ckpt_format=run.save.fmt, use_dist_ckpt=run.save.fmt != "torch",
        dist_ckpt_optim_fully_reshardable=run.save.sharding_type == "fully_reshardable",
        ckpt_fully_parallel_save=True, async_save=False, no_save_optim=None, no_save_rng=None,
        exit_signal=signal.SIGTERM, exit_signal_handler=False,
    )
    return argparse.Namespace(**a)


# ----------------------------------------------------------------------------- non-model entries


def sharded_sd_metadata(args: argparse.Namespace, sharding_type: str) -> dict[str, Any]:
    """Megatron-LM's ``_build_sharded_state_dict_metadata``: what ``sharded_state_dict`` of model and
    optimizer are built with; stored, without the process group, as ``content_metadata``."""
    from megatron.core import parallel_state

    meta: dict[str, Any] = {}
    if args.use_distributed_optimizer:
        meta["distrib_optim_sharding_type"] = sharding_type
        if sharding_type == "fully_reshardable":
            meta["distrib_optim_fully_reshardable_mem_efficient"] = False
    meta["singleton_local_shards"] = False
    meta["chained_optim_avoid_prefix"] = True
    meta["dp_cp_group"] = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return meta


def rng_state(fmt: str) -> Any:
    """Megatron-LM's ``get_rng_state``: this rank's Python, numpy, torch and tracker generator states.

    torch_dist stores them as one ``ShardedObject`` over (PP, TP) -- (PP, TP, DP) with expert
    parallelism -- the legacy format as a list.  Without CUDA the ``cuda_rng_state`` slot holds the
    CPU generator's state (what the run's CPU RNG tracker forks from).
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.get_rng_state(),
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    states = [state]  # data_parallel_random_init is off: one state, replicated over DP
    if fmt != "torch_dist":
        return states
    pp, tp = ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
    pp_rank, tp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    if ps.get_expert_model_parallel_world_size() > 1:
        dp, dp_rank = (ps.get_data_parallel_world_size(with_context_parallel=True),
                       ps.get_data_parallel_rank(with_context_parallel=True))
        return ShardedObject("rng_state", states, (pp, tp, dp), (pp_rank, tp_rank, dp_rank), replica_id=0)
    return ShardedObject("rng_state", states, (pp, tp), (pp_rank, tp_rank),
                         replica_id=ps.get_data_parallel_rank(with_context_parallel=True))


def opt_param_scheduler_state(args: argparse.Namespace) -> dict[str, Any]:
    """``OptimizerParamScheduler.state_dict()`` for the run's schedule (linear warmup, then constant).

    Megatron-LM counts scheduler steps in samples (``iterations x global batch``).
    """
    gbs = int(args.global_batch_size)
    return {
        "max_lr": float(args.lr), "lr_warmup_steps": int(args.lr_warmup_iters) * gbs,
        "num_steps": int(args.iteration) * gbs, "lr_decay_style": args.lr_decay_style,
        "lr_decay_steps": int(args.train_iters) * gbs, "min_lr": float(args.min_lr),
        "start_wd": float(args.start_weight_decay), "end_wd": float(args.end_weight_decay),
        "wd_incr_style": args.weight_decay_incr_style, "wd_incr_steps": int(args.train_iters) * gbs,
    }


def training_flops(models: list[torch.nn.Module], tokens: int) -> float:
    """``num_floating_point_operations_so_far`` as the usual 6 x parameters x tokens estimate (this
    rank's parameters summed over the model-parallel group; Megatron-LM uses a finer per-layer formula)."""
    from megatron.core import parallel_state

    n = torch.tensor([float(sum(p.numel() for m in models for p in m.parameters()))])
    torch.distributed.all_reduce(n, group=parallel_state.get_model_parallel_group())
    return 6.0 * float(n) * tokens


# ------------------------------------------------------------------------------------------- save


def _chunk_key(models: list[torch.nn.Module], i: int) -> str:
    return "model" if len(models) == 1 else f"model{i}"


def iteration_folder(root: str | os.PathLike[str], iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def legacy_rank_folder(root: str | os.PathLike[str], iteration: int) -> Path:
    """Megatron-LM's ``get_checkpoint_name``: ``mp_rank_TT``, ``_PPP`` with PP > 1, ``_EEE`` with EP > 1."""
    from megatron.core import parallel_state as ps

    name = f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}"
    if ps.get_pipeline_model_parallel_world_size() > 1:
        name += f"_{ps.get_pipeline_model_parallel_rank():03d}"
    if ps.get_expert_model_parallel_world_size() > 1:
        name += f"_{ps.get_expert_model_parallel_rank():03d}"
    return iteration_folder(root, iteration) / name


def save_megatron_lm(models: list[torch.nn.Module], optimizer: Any, args: argparse.Namespace, iteration: int,
                     save: MegatronSave, flops: float) -> Path:
    """Every rank calls this after ``optimizer.step()``; returns the iteration folder.

    ``models`` are the unwrapped ``GPTModel`` chunks (Megatron-LM's ``unwrap_model``), ``optimizer`` what
    ``get_megatron_optimizer`` returned.  The state dict is Megatron-LM's ``generate_state_dict``
    plus ``num_floating_point_operations_so_far``; rank 0 writes the tracker after a barrier.
    """
    from megatron.core import parallel_state as ps

    from ..mcore.compat import cuda_to_cpu

    fmt = save.fmt
    distributed = bool(args.use_distributed_optimizer)
    rng = rng_state(fmt)
    if fmt == "torch" and distributed:
        # every DP rank takes part in the gather; DP rank 0 writes (Megatron-LM saves it before the model)
        target = legacy_rank_folder(save.root, iteration) / "distrib_optim.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        with cuda_to_cpu():
            optimizer.save_parameter_state(str(target))
    state: dict[str, Any] = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration}
    if fmt == "torch_dist":
        meta = sharded_sd_metadata(args, save.sharding_type)
        for i, m in enumerate(models):
            state[_chunk_key(models, i)] = m.sharded_state_dict(metadata=meta)
        with cuda_to_cpu():  # fully_reshardable gathers to DP rank 0 through .cuda() buffers
            state["optimizer"] = optimizer.sharded_state_dict(state, metadata=meta)
    else:
        for i, m in enumerate(models):
            state[_chunk_key(models, i)] = m.state_dict_for_save_checkpoint()
        state["optimizer"] = optimizer.state_dict()
    state["opt_param_scheduler"] = opt_param_scheduler_state(args)
    state["rng_state"] = rng
    state["num_floating_point_operations_so_far"] = flops
    folder = iteration_folder(save.root, iteration)
    if fmt == "torch_dist":
        _save_torch_dist(state, folder, meta)
    elif ps.get_expert_data_parallel_rank() == 0:  # one writer per model-parallel rank, as Megatron-LM
        target = legacy_rank_folder(save.root, iteration) / "model_optim_rng.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, target)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        (Path(save.root) / TRACKER).write_text(str(iteration))
    torch.distributed.barrier()
    return folder


def _save_torch_dist(state: dict[str, Any], folder: Path, meta: dict[str, Any]) -> None:
    """``dist_checkpointing.save`` with Megatron-LM's strategy: the default torch_dist writer, spread
    over the data-parallel ranks (``--ckpt-fully-parallel-save``, on by default)."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    from ..mcore.compat import cuda_to_cpu

    if torch.distributed.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    strategy = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy("torch_dist"),
                                                ps.get_data_parallel_group(with_context_parallel=True), False)
    content = {k: v for k, v in meta.items() if k != "dp_cp_group"}  # _clean_metadata_for_serialization
    with cuda_to_cpu():
        dist_checkpointing.save(state, str(folder), strategy, validate_access_integrity=True,
                                content_metadata=content)
