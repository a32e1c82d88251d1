"""One short training run on megatron-core, in a gloo worker: the real GPTModel, DDP wrapper,
optimizer (``get_megatron_optimizer``, incl. ``HybridDeviceOptimizer`` for CPU offload) and
forward-backward schedule, from a torch_dist checkpoint.

A run is described by a picklable :class:`TrainJob` so it can be sent to forked workers
(:func:`ckptbridge.mcore.launch.run_workers`); each variant runs in fresh processes, so nothing
(parallel state, RNG trackers, optimizer hooks) leaks from one variant into the next.  A job can
also *start* from a checkpoint this module saved (the resume check): it then loads the model and,
unless the job's fault says otherwise, the optimizer state from Megatron-LM's per-rank ``torch``
checkpoint, model first, as Megatron-LM resumes (see the checkpoint section below for why not torch_dist).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import TokenStream
from .megatron_save import MegatronSave

# Optimizer settings of every run (OptimizerConfig fields); a variant's ``optimizer:`` overrides them.
BASE_OPTIMIZER: dict[str, Any] = dict(
    optimizer="adam", weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=1.0,
)


@dataclass(frozen=True)
class TrainJob:
    """Everything one worker needs; picklable."""

    iter_dir: str  # torch_dist checkpoint the weights come from
    stream: TokenStream
    steps: int
    lr: float
    warmup: int
    micro_batch_size: int
    num_microbatches: int
    seq_len: int
    dtype: torch.dtype = torch.float32
    tp: int = 1
    pp: int = 1
    ep: int = 1  # expert-parallel size (MoE); the world is tp x pp x ep ranks
    seed: int = 1234
    data_seed: int = 0
    optimizer: dict[str, Any] = field(default_factory=dict)
    fp8: str | None = None
    save_at: int | None = None  # save model + optimizer after this many steps (into save_dir)
    save_dir: str | None = None
    resume_from: str | None = None  # a save_dir: load it and continue from its step
    fault: str | None = None
    step0_batch: bool = False  # also return the loss of the first batch *before* any update
    label: str = ""  # prefix of the per-step progress lines; empty: silent
    megatron_save: MegatronSave | None = None  # after the last step, save as Megatron-LM's save_checkpoint

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.ep

    @property
    def global_batch_size(self) -> int:
        """Samples per step over all data-parallel replicas (each replica sees the same batches)."""
        return self.micro_batch_size * self.num_microbatches * self.world // (self.tp * self.pp)


def lr_at(step: int, lr: float, warmup: int) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then constant: short runs need no decay."""
    return lr * min(1.0, (step + 1) / warmup) if warmup > 0 else lr


def _optimizer_config(job: TrainJob) -> Any:
    from megatron.core.optimizer import OptimizerConfig

    kw = dict(BASE_OPTIMIZER, lr=job.lr, bf16=job.dtype == torch.bfloat16, fp16=job.dtype == torch.float16,
              params_dtype=job.dtype)
    kw.update(job.optimizer)
    if kw.get("optimizer_cpu_offload") and not torch.cuda.is_available():
        # host-only: nothing to overlap (no copy streams) and nothing to pin
        kw.update(overlap_cpu_optimizer_d2h_h2d=False, pin_cpu_grads=False, pin_cpu_params=False)
    elif kw.get("optimizer_cpu_offload") and job.dtype != torch.float32:
        # Megatron-LM's combination for half-precision offload: the mixed-precision (non-distributed)
        # optimizer would swap fp32 masters into HybridDeviceOptimizer's groups after it split them.
        # Not run here (no GPU was lent): see the session note.
        kw.update(use_distributed_optimizer=True, use_precision_aware_optimizer=True)
    return OptimizerConfig(**kw)


def _wrappers(optimizer: Any) -> list[Any]:
    """megatron's per-parameter-group optimizers (FP32Optimizer, ...) behind a ChainedOptimizer, or the one given."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _fused_adam_on_cpu(optimizer: Any) -> None:
    """Switch megatron's torch fallback AdamW (used without TE/apex) to torch's fused CPU kernel.

    torch picks its per-tensor loop on CPU (foreach and fused default to CUDA only): 2.8 s per step for a
    Llama-3.2-1B embedding alone on 2 cores, against 0.14 s fused.  Same AdamW update; the option is read
    from the param groups at every step, so setting it before the first step is enough.
    """
    if torch.cuda.is_available():
        return
    for wrapper in _wrappers(optimizer):
        inner = getattr(wrapper, "optimizer", None)
        if type(inner) in (torch.optim.AdamW, torch.optim.Adam):
            inner.defaults.update(fused=True, foreach=False)
            for group in inner.param_groups:
                group.update(fused=True, foreach=False)


class _Run:
    """Model chunks, their DDP wrappers, the optimizer and (optionally) FP8, built on this rank."""

    def __init__(self, job: TrainJob) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import get_megatron_optimizer

        from ..harness.checkpoint_args import checkpoint_args
        from ..mcore import model as mm
        from ..mcore.compat import host_as_device

        self.job = job
        args = checkpoint_args(job.iter_dir, job.tp, job.pp, job.ep)
        self.start_args = args
        self.vocab_size = int(args.vocab_size)
        mm.init_parallel(job.tp, job.pp, seed=job.seed, create_gloo_process_groups=True, ep=job.ep)
        overrides: dict[str, Any] = {}
        self.fp8_label: str | None = None
        self.fp8_real = False
        if job.fp8:
            from .fp8 import Fp8Recipe, mcore_fp8_config, te_fp8_available

            self.recipe = Fp8Recipe.from_name(job.fp8)
            if te_fp8_available():
                overrides.update(mcore_fp8_config(self.recipe))
                self.fp8_real = True
        self.models = mm.build_gpt_model(args, dtype=job.dtype, use_te=self.fp8_real or None,
                                         perform_initialization=False, **overrides)
        mm.load_torch_dist(self.models, job.iter_dir)
        if torch.cuda.is_available():
            self.models = [m.cuda() for m in self.models]
        config = self.models[0].config
        # as Megatron-LM's training setup: after the backward the schedule finishes DP grad sync and
        # all-reduces the grads of weights held on several stages (the tied embedding / output layer under PP)
        from megatron.core.distributed import finalize_model_grads

        config.finalize_model_grads_func = finalize_model_grads
        opt_config = _optimizer_config(job)
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                   use_distributed_optimizer=opt_config.use_distributed_optimizer)
        wrapped: list[Any] = list(self.models)
        if job.dtype != torch.float32 and not self.fp8_real and (config.bf16 or config.fp16):
            # Megatron-LM's get_model wraps half-precision models in Float16Module, which casts every
            # parameter -- the local spec's fp32 norm weights too -- to the training dtype
            from megatron.core.transformer.module import Float16Module

            wrapped = [Float16Module(config, m) for m in self.models]
        self.ddp = [DistributedDataParallel(config, ddp_config, m) for m in wrapped]
        self._distributed = bool(opt_config.use_distributed_optimizer)
        self.opt_config = opt_config
        with host_as_device():
            self.optimizer = get_megatron_optimizer(opt_config, self.ddp)
        _fused_adam_on_cpu(self.optimizer)
        self.fp8 = None
        if job.fp8 and not self.fp8_real:
            from .fp8 import enable_emulated_fp8

            self.fp8 = enable_emulated_fp8(self.models, self.recipe)
            self.fp8_label = self.fp8.label
        elif self.fp8_real:
            self.fp8_label = f"TransformerEngine FP8 ({self.recipe.describe()})"
        self.start_step = 0

    # ---------------------------------------------------------------- checkpoint
    # Megatron-LM's per-rank "torch" checkpoint (--ckpt-format torch): the model's and the optimizer's own
    # state_dict(), so the optimizer's load hooks (HybridDeviceOptimizer rebuilding its host copies, the
    # mixed-precision optimizer copying its fp32 masters) run exactly as in Megatron-LM.  torch_dist cannot
    # carry a non-distributed HybridDeviceOptimizer in megatron-core 0.16.1: FP32Optimizer.sharded_state_dict
    # calls init_state_fn, which get_megatron_optimizer leaves None for it (optimizer/__init__.py:347,
    # optimizer.py:1019).

    def _rank_file(self, path: str) -> Path:
        from megatron.core import parallel_state

        tp, pp = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
        return Path(path) / f"mp_rank_{tp:02d}_{pp:03d}" / "model_optim_rng.pt"

    def save(self, step: int, path: str) -> None:
        target = self._rank_file(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        state = {"iteration": step, "model": self.ddp[0].module.state_dict_for_save_checkpoint(),
                 "optimizer": self.optimizer.state_dict()}
        if self.fp8 is not None:
            state["fp8"] = self.fp8.state_dict()  # amax histories and scales: delayed scaling continues
        torch.save(state, target)
        if self._distributed:
            # the distributed optimizer keeps parameter state (fp32 masters, moments) in a separate file
            self.optimizer.save_parameter_state(str(target.parent / "distrib_optim.pt"))

    def resume(self, path: str) -> None:
        """Model first, then the optimizer, as Megatron-LM's load_checkpoint does."""
        from ..mcore.compat import host_as_device

        state = torch.load(self._rank_file(path), map_location="cpu", weights_only=False)
        self.ddp[0].module.load_state_dict(state["model"], strict=True)
        # the fault is Megatron-LM's --no-load-optim by mistake: the model comes back, Adam's moments do not
        if self.job.fault != "skip_optimizer_state_on_resume":
            with host_as_device():
                self.optimizer.load_state_dict(state["optimizer"])
                if self._distributed:
                    self.optimizer.load_parameter_state(str(self._rank_file(path).parent / "distrib_optim.pt"))
        if self.fp8 is not None and "fp8" in state:
            self.fp8.load_state_dict(state["fp8"])
        self.start_step = int(state["iteration"])

    def save_megatron_lm(self, step: int, save: MegatronSave) -> Path:
        """This run at ``step`` as Megatron-LM's ``save_checkpoint`` writes it (model, optimizer, args, RNG)."""
        from dataclasses import fields

        from .megatron_save import RunFacts, megatron_lm_args, save_megatron_lm, training_flops

        j = self.job
        optimizer = {f.name: getattr(self.opt_config, f.name) for f in fields(self.opt_config)
                     if f.name in {"optimizer", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad"}}
        facts = RunFacts(iteration=step, train_iters=j.steps, dtype=j.dtype, tp=j.tp, pp=j.pp, ep=j.ep,
                         world=j.world, micro_batch_size=j.micro_batch_size, global_batch_size=j.global_batch_size,
                         seq_length=j.seq_len, lr=j.lr, warmup=j.warmup, seed=j.seed, optimizer=optimizer,
                         use_distributed_optimizer=self._distributed, save=save)
        flops = training_flops(self.models, step * j.global_batch_size * j.seq_len)
        return save_megatron_lm(self.models, self.optimizer, megatron_lm_args(self.start_args, facts), step, save,
                                flops)

    # ---------------------------------------------------------------- training

    def _forward_step(self, data_iterator: Any, model: Any) -> tuple[torch.Tensor, Any]:
        batch = next(data_iterator)
        tokens, labels = batch[:, :-1], batch[:, 1:]
        s = tokens.shape[1]
        device = next(model.parameters()).device
        tokens, labels = tokens.to(device), labels.to(device)
        position_ids = torch.arange(s, device=device).unsqueeze(0).expand(tokens.shape[0], -1)
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=device), diagonal=1)[None, None]
        output = model(input_ids=tokens, position_ids=position_ids, attention_mask=mask, labels=labels)

        def loss_func(per_token: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            loss = per_token.float().mean()
            # a copy: the schedule divides the returned loss by num_microbatches in place
            # (schedules.py:263-269), which a detach() view would share
            return loss, {"lm loss": loss.detach().clone()}

        return output, loss_func

    def _batches(self, step: int) -> list[torch.Tensor]:
        j = self.job
        return j.stream.step_batches(j.data_seed, step, j.num_microbatches, j.micro_batch_size, j.seq_len)

    def _schedule(self, step: int, forward_only: bool) -> float | None:
        """One forward(-backward) over the step's microbatches; the mean loss on the last stage."""
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from ..mcore.compat import cuda_to_cpu

        with cuda_to_cpu():
            losses = get_forward_backward_func()(
                forward_step_func=self._forward_step, data_iterator=iter(self._batches(step)),
                model=self.ddp[0], num_microbatches=self.job.num_microbatches, seq_length=self.job.seq_len,
                micro_batch_size=self.job.micro_batch_size, forward_only=forward_only,
            )
        if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            return None
        return float(torch.stack([d["lm loss"] for d in losses]).mean())

    def first_batch_loss(self) -> tuple[float, float] | None:
        """The first step's loss before any update, twice: over the model's real vocabulary (what HF computes)
        and as megatron trains it, whose softmax also spans the padded vocabulary rows
        (``make_vocab_size_divisible_by``).  The two differ whenever the vocabulary was padded."""
        from ..mcore import model as mm

        for m in self.ddp:
            m.eval()
        with torch.no_grad():
            trained = self._schedule(0, forward_only=True)
            real = []
            for batch in self._batches(0):
                logits = mm.forward_logits(self.models, batch[:, :-1], vocab_size=self.vocab_size)
                if logits is not None:
                    real.append(torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()))
        return None if trained is None else (float(torch.stack(real).mean()), trained)

    def train(self, stop: int) -> list[dict[str, Any]]:
        from ..mcore.compat import cuda_to_cpu

        rows: list[dict[str, Any]] = []
        for m in self.ddp:
            m.train()
        for step in range(self.start_step, stop):
            t0 = time.perf_counter()
            lr = lr_at(step, self.job.lr, self.job.warmup)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            for m in self.ddp:
                m.zero_grad_buffer()
            self.optimizer.zero_grad()
            loss = self._schedule(step, forward_only=False)
            with cuda_to_cpu():
                ok, grad_norm, _ = self.optimizer.step()
            if self.fp8 is not None:
                self.fp8.step()
            rows.append({"step": step, "loss": loss, "grad_norm": None if grad_norm is None else float(grad_norm),
                         "lr": lr, "skipped": not ok, "seconds": time.perf_counter() - t0})
            if self.job.label and loss is not None:
                print(f"  {self.job.label} step {step + 1}/{stop}: loss {loss:.4f} ({rows[-1]['seconds']:.1f} s)",
                      file=sys.stderr, flush=True)
            if self.job.save_at is not None and step + 1 == self.job.save_at and self.job.save_dir:
                self.save(step + 1, self.job.save_dir)
        return rows


def train_worker(rank: int, world: int, job: TrainJob) -> dict[str, Any]:
    """Run ``job`` on this rank; the last pipeline stage's TP rank 0 returns the curve."""
    from megatron.core import parallel_state

    run = _Run(job)
    step0 = run.first_batch_loss() if job.step0_batch else None
    if job.resume_from:
        run.resume(job.resume_from)
    rows = run.train(job.steps)
    if job.megatron_save is not None:
        run.save_megatron_lm(job.steps, job.megatron_save)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True) and parallel_state.get_tensor_model_parallel_rank() == 0
    out: dict[str, Any] = {"reporter": last, "rows": rows if last else [],
                           "step0_loss": step0[0] if last and step0 else None,
                           "step0_loss_padded_vocab": step0[1] if last and step0 else None,
                           "fp8": run.fp8_label, "fp8_real": run.fp8_real}
    if last:
        out["optimizer"] = describe_optimizer(run.optimizer)
        if run.fp8 is not None:
            out["fp8_stats"] = run.fp8.stats()
    return out


def describe_optimizer(optimizer: Any) -> str:
    """What actually ran, e.g. ``FP32Optimizer(HybridDeviceOptimizer: 3 params offloaded, 11 stay on the device)``."""
    parts = []
    for wrapper in _wrappers(optimizer):
        base = getattr(wrapper, "optimizer", None)
        text = type(wrapper).__name__
        if base is not None:
            text += f"({type(base).__name__}"
            if hasattr(base, "cpu_copys_map_gpu_param"):
                gpu = sum(len(g["params"]) for g in getattr(base, "gpu_param_groups", []))
                host = len(base.cpu_copys_map_gpu_param)
                text += f": {host} params offloaded, {gpu} stay on the device"
            text += ")"
        parts.append(text)
    return ", ".join(parts)


def run_job(job: TrainJob, timeout: float = 3600.0) -> dict[str, Any]:
    """``job`` on ``job.world`` forked gloo ranks; the reporting rank's result."""
    from ..mcore.launch import run_workers

    results = run_workers(train_worker, job.world, job, timeout=timeout)
    return next(r for r in results if r["reporter"])
