"""Checkpoints as Megatron-LM *training* writes them, made by real megatron-core training, for tests.

``train_and_save`` imports a tiny HF model with ckptbridge (the starting weights only), trains a few
real steps with converge's megatron-core trainer (GPTModel, DDP, ``get_megatron_optimizer``, the
forward-backward schedule) so the weights differ from the import, saves model + optimizer with
:mod:`ckptbridge.converge.megatron_save` (megatron-core's own save paths) and returns the trained
model's logits on a fixed batch, so a test can compare an HF export of the checkpoint against them.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ckptbridge.converge.data import TokenStream
from ckptbridge.converge.megatron_save import MegatronSave, legacy_rank_folder
from ckptbridge.converge.trainer import TrainJob, _Run, _wrappers
from ckptbridge.convert import Target, convert
from ckptbridge.layout import ParallelLayout

from mcore_runner import run_distributed

#: the fixed evaluation batch: [2, 12] token ids
LOGIT_BATCH = (2, 12)


def _optimizer_tensors(optimizer: Any) -> list[torch.Tensor]:
    """Every main parameter and Adam moment the optimizer holds on this rank (fp32 masters or shards)."""
    out: list[torch.Tensor] = []
    for wrapper in _wrappers(optimizer):
        inner = wrapper.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                out.append(p.detach().clone())
                # not torch Adam's per-parameter "step": megatron-core 0.16.1's dp_reshardable load copies it
                # from the live optimizer, not the file (distrib_optimizer.py:1803 -> 936-940); TE's and apex's
                # Adam, which Megatron-LM uses on GPUs, keep the step in the param groups instead
                for name in ("exp_avg", "exp_avg_sq"):
                    out.append(inner.state[p][name].detach().clone())
    return out


def _snapshot(run: _Run) -> list[torch.Tensor]:
    return [p.detach().clone() for m in run.models for p in m.parameters()] + _optimizer_tensors(run.optimizer)


def _reload(run: _Run, save: MegatronSave, iteration: int) -> None:
    """Load model + optimizer from the saved checkpoint the way Megatron-LM's ``load_checkpoint`` does."""
    from megatron.core import dist_checkpointing, parallel_state

    from ckptbridge.mcore import model as mm
    from ckptbridge.mcore.compat import cuda_to_cpu, host_as_device

    folder = Path(save.root) / f"iter_{iteration:07d}"
    if save.fmt == "torch_dist":
        meta = dict(dist_checkpointing.load_content_metadata(str(folder)) or {})
        meta["dp_cp_group"] = parallel_state.get_data_parallel_group(with_context_parallel=True)
        sd: dict[str, Any] = {"model": run.models[0].sharded_state_dict(metadata=meta)}
        with host_as_device():
            sd["optimizer"] = run.optimizer.sharded_state_dict(sd, is_loading=True, metadata=meta)
        with cuda_to_cpu():
            loaded = dist_checkpointing.load(sd, str(folder))
        run.models[0].load_state_dict(loaded["model"], strict=False)
        # no_grad: with fp32 parameters the distributed optimizer's main params are views of the model's
        # leaf parameters, which dp_reshardable's copy_ refuses under autograd (megatron-core 0.16.1
        # distrib_optimizer.py:940; its own load_parameter_state_* are @torch.no_grad)
        with host_as_device(), torch.no_grad():
            _load_optimizer(run.optimizer, loaded["optimizer"])
        return
    rank_dir = legacy_rank_folder(save.root, iteration)
    state = torch.load(rank_dir / "model_optim_rng.pt", map_location="cpu", weights_only=True)
    mm.load_legacy_rank(run.models, state)
    with host_as_device(), torch.no_grad():
        run.optimizer.load_state_dict(state["optimizer"])
        if run.job.optimizer.get("use_distributed_optimizer"):
            with _step_aside(run.optimizer):
                run.optimizer.load_parameter_state(str(rank_dir / "distrib_optim.pt"))


def _load_optimizer(optimizer: Any, state: Any) -> None:
    """``optimizer.load_state_dict(state)``; a ``fully_reshardable`` parameter state is read in a second call
    with the per-parameter step hidden (see :func:`_step_aside`)."""
    wrappers = _wrappers(optimizer)
    parts = [state] if len(wrappers) == 1 else [state[i] for i in range(len(wrappers))]
    for wrapper, part in zip(wrappers, parts, strict=True):
        if isinstance(part, dict) and part.get("param_state_sharding_type") == "fully_reshardable":
            part = dict(part)
            param_state = part.pop("param_state")
            part.pop("param_state_sharding_type")
            wrapper.load_state_dict(part)  # restores the step from the param groups
            with _step_aside(wrapper):
                wrapper.load_parameter_state_from_fully_reshardable(param_state)
        else:
            wrapper.load_state_dict(part)


@contextmanager
def _step_aside(optimizer: Any) -> Iterator[None]:
    """Hide torch Adam's per-parameter ``step`` while the distributed optimizer reads its gathered formats
    (``distrib_optim.pt``, torch_dist ``fully_reshardable``).

    megatron-core 0.16.1 copies every per-parameter state entry into place (distrib_optimizer.py:936-940),
    but those formats hold param/exp_avg/exp_avg_sq only: TE's and apex's Adam keep the step per group,
    torch's fallback Adam (no TE/apex here) per parameter.  ``load_state_dict`` has already restored that
    step from the param groups (distrib_optimizer.py:817-824), so it is kept as it is.
    """
    held = []
    for wrapper in _wrappers(optimizer):
        for state in wrapper.optimizer.state.values():
            if "step" in state:
                held.append((state, state.pop("step")))
    try:
        yield
    finally:
        for state, step in held:
            state["step"] = step


def train_save_worker(rank: int, world: int, job: TrainJob, tokens: torch.Tensor, check_reload: bool) -> dict[str, Any]:
    """Train, save as Megatron-LM, take the logits; with ``check_reload`` also train one more step, load
    the checkpoint back with megatron-core and report every model/optimizer tensor that differs."""
    from megatron.core import parallel_state

    from ckptbridge.mcore import model as mm

    run = _Run(job)
    rows = run.train(job.steps)
    run.save_megatron_lm(job.steps, job.megatron_save)
    logits = mm.forward_logits(run.models, tokens, vocab_size=run.vocab_size)
    out: dict[str, Any] = {"rows": rows, "logits": None if logits is None else logits.float(),
                           "reporter": logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0
                           and parallel_state.get_data_parallel_rank() == 0}
    if check_reload:
        saved = _snapshot(run)
        run.start_step = job.steps
        run.train(job.steps + 1)
        moved = sum(not torch.equal(a, b) for a, b in zip(saved, _snapshot(run), strict=True))
        _reload(run, job.megatron_save, job.steps)
        now = _snapshot(run)
        out["moved_by_extra_step"] = moved
        out["reload_mismatches"] = [i for i, (a, b) in enumerate(zip(saved, now, strict=True)) if not torch.equal(a, b)]
    return out


def train_and_save(hf_dir: Path, out_root: Path, *, tp: int = 1, pp: int = 1, ep: int = 1, fmt: str = "torch_dist",
                   distributed_optimizer: bool = True, sharding_type: str = "dp_reshardable", steps: int = 3,
                   dtype: torch.dtype = torch.float32, lr: float = 1e-3, seed: int = 0,
                   check_reload: bool = False, timeout: float = 300.0) -> dict[str, Any]:
    """Train ``hf_dir``'s model ``steps`` steps at ``tp`` x ``pp`` x ``ep`` on gloo workers and save it into
    ``out_root`` as Megatron-LM does (``fmt`` torch_dist or torch, distributed optimizer or not).

    Returns ``{"root", "iteration", "tokens" [2, 12], "logits" [2, 12, vocab] fp32 (real vocab, gathered
    over TP/PP), "losses"}`` and with ``check_reload`` also ``"moved_by_extra_step"`` / ``"reload_mismatches"``
    (indices of tensors that differ after megatron-core loaded the checkpoint back; empty = exact).
    """
    work = Path(tempfile.mkdtemp(prefix="ckptbridge-import-"))
    try:
        imported = work / "mcore"
        convert(Path(hf_dir), imported, None, Target("mcore", ParallelLayout(), "torch_dist", "te", dtype=dtype))
        iter_dir = next(p for p in imported.iterdir() if p.is_dir() and (p / "common.pt").exists())
        import json

        vocab = int(json.loads((Path(hf_dir) / "config.json").read_text())["vocab_size"])
        gen = torch.Generator().manual_seed(seed)
        stream = TokenStream(torch.randint(vocab, (4096,), generator=gen), f"random ids (seed {seed})")
        tokens = torch.randint(vocab, LOGIT_BATCH, generator=gen)
        optimizer = {"use_distributed_optimizer": True} if distributed_optimizer else {}
        save = MegatronSave(str(out_root), fmt, sharding_type)
        job = TrainJob(iter_dir=str(iter_dir), stream=stream, steps=steps, lr=lr, warmup=0, micro_batch_size=2,
                       num_microbatches=max(1, pp), seq_len=16, dtype=dtype, tp=tp, pp=pp, ep=ep,
                       data_seed=seed, optimizer=optimizer, megatron_save=save)
        results = run_distributed(train_save_worker, job.world, job, tokens, check_reload, timeout=timeout)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rep = next(r for r in results if r["reporter"])
    out = {"root": Path(out_root), "iteration": steps, "tokens": tokens, "logits": rep["logits"],
           "losses": [r["loss"] for r in rep["rows"]]}
    if check_reload:
        out["moved_by_extra_step"] = min(r["moved_by_extra_step"] for r in results)
        out["reload_mismatches"] = {rank: r["reload_mismatches"] for rank, r in enumerate(results)
                                    if r["reload_mismatches"]}
    return out
