"""The loop users run, end to end: an imported MCore checkpoint trained a few steps by megatron-core as
Megatron-LM trains, saved as Megatron-LM's ``save_checkpoint`` saves (model *and* optimizer, Megatron-LM's
args), with the trained model's logits on a fixed batch: what an export of that checkpoint must reproduce.
Used by the gate's ``export`` step and by the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .data import TokenStream
from .megatron_save import MegatronSave
from .trainer import TrainJob, _Run


def train_save_logits(run: _Run, job: TrainJob, tokens: torch.Tensor) -> dict[str, Any]:
    """In a worker: train ``job.steps`` steps, save as Megatron-LM, then the trained model's fp32 logits
    (real vocabulary, gathered; on the rank that reports them, else None)."""
    from megatron.core import parallel_state

    from ..mcore import model as mm

    rows = run.train(job.steps)
    run.save_megatron_lm(job.steps, job.megatron_save)
    logits = mm.forward_logits(run.models, tokens, vocab_size=run.vocab_size)
    return {"rows": rows, "logits": None if logits is None else logits.float(),
            "reporter": logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0}


def _worker(rank: int, world: int, job: TrainJob, tokens: torch.Tensor) -> dict[str, Any]:
    return train_save_logits(_Run(job), job, tokens)


def train_and_save(iter_dir: Path, save_root: Path, vocab: int, *, fmt: str = "torch_dist", steps: int = 3,
                   tp: int = 1, pp: int = 1, ep: int = 1, distributed_optimizer: bool = True,
                   dtype: torch.dtype = torch.float32, lr: float = 1e-3, seed: int = 0,
                   timeout: float = 600.0) -> dict[str, Any]:
    """Train the torch_dist checkpoint ``iter_dir`` and save it under ``save_root``; returns ``root``,
    ``iteration``, ``tokens`` [2, 12], the trained ``logits`` and the ``losses``."""
    from ..mcore.launch import run_workers

    gen = torch.Generator().manual_seed(seed)
    stream = TokenStream(torch.randint(vocab, (4096,), generator=gen), f"random ids (seed {seed})")
    tokens = torch.randint(vocab, (2, 12), generator=gen)
    job = TrainJob(iter_dir=str(iter_dir), stream=stream, steps=steps, lr=lr, warmup=0, micro_batch_size=2,
                   num_microbatches=max(1, pp), seq_len=16, dtype=dtype, tp=tp, pp=pp, ep=ep, data_seed=seed,
                   optimizer={"use_distributed_optimizer": True} if distributed_optimizer else {},
                   megatron_save=MegatronSave(str(save_root), fmt, "dp_reshardable"))
    results = run_workers(_worker, job.world, job, tokens, timeout=timeout)
    rep = next(r for r in results if r["reporter"])
    return {"root": Path(save_root), "iteration": steps, "tokens": tokens, "logits": rep["logits"],
            "losses": [r["loss"] for r in rep["rows"]]}
