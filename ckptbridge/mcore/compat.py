"""Minimal patches that let megatron-core 0.16.1 run on CPU under the gloo backend.

megatron-core assumes CUDA in a handful of places that are *not* guarded by a
CPU fallback.  On a CPU-only torch build every one of those places raises
(``AssertionError: Torch not compiled with CUDA enabled``) so the patches below
only change behaviour on a code path that would otherwise be an error.  They are
applied only when ``torch.cuda.is_available()`` is False, and
:func:`apply_cpu_patches` is idempotent.

Patch ids follow ``/work/shared/notes/mcore-on-cpu.md``; file references are
relative to ``megatron/core`` of megatron-core 0.16.1:

* P1 ``torch.cuda.current_device()`` is used as a *device* (tensor_parallel/mappings.py,
  tensor_parallel/layers.py, models/common/embeddings/rotary_pos_embedding.py:162,
  pipeline_parallel/p2p_communication.py:190-321,
  dist_checkpointing/strategies/state_dict_saver.py:252, ...) -> returns ``"cpu"``.
* P2 ``get_default_causal_mask`` / ``get_sliding_window_causal_mask`` build masks with
  ``device="cuda"`` (transformer/utils.py:35,40, called from fusions/fused_softmax.py:322,327
  when no mask is passed or when ``window_size`` is set) -> CPU versions bound in
  ``fused_softmax``'s namespace.
* P3 the model-parallel RNG tracker stores CUDA generator states
  (tensor_parallel/random.py:235-276; forked by transformer/dot_product_attention.py:217 on
  every forward) -> a subclass that keeps CPU generator states.
  ``initialize_rng_tracker`` looks ``CudaRNGStatesTracker`` up by module-global name, so
  rebinding that name makes ``model_parallel_cuda_manual_seed()`` work unchanged.
* P4/P8 ``device="cuda"`` tensors and ``.cuda()`` calls inside the pipeline schedules
  (pipeline_parallel/schedules.py:596,983,2138), the tied-embedding all-reduce at model
  build (models/common/language_module/language_module.py:244 ``weight.data.cuda()``) and
  the fully-parallel load exchange (dist_checkpointing/exchange_utils.py) -> not patched
  globally; wrap such calls in :func:`cuda_to_cpu` (a ``TorchFunctionMode``).
* P7 ``torch.cuda.synchronize()`` on every torch_dist save
  (dist_checkpointing/strategies/filesystem_async.py:230) and in p2p
  (pipeline_parallel/p2p_communication.py:242,398 when ``batch_p2p_sync``) -> no-op.
* S1 the first torch_dist save per process starts a *spawn* ``Manager`` (+5 s, re-imports
  ``__main__``; dist_checkpointing/strategies/filesystem_async.py:54) -> fork-context Manager.

* P5 ``te_general_gemm`` is only bound when TransformerEngine imports
  (transformer/moe/moe_utils.py:22-39) but is read unconditionally by the router's
  ``RouterGatingLinearFunction`` (moe_utils.py:1192 forward, :1225 backward) -> NameError on
  every MoE forward without TE -> bind it to ``None`` (the ``torch.mm`` branch runs).
* P6 the alltoall token dispatcher creates a class-level ``torch.cuda.Stream()``
  (transformer/moe/token_dispatcher.py:444-445) and copies its split sizes to the host on it
  (``_maybe_dtoh_and_synchronize``, token_dispatcher.py:862-901) -> a placeholder stream object
  and a stream-free ``_maybe_dtoh_and_synchronize`` that does the same host conversion (split
  sizes as numpy arrays, like ``maybe_move_tensor_to_cpu(as_numpy=True)``) with nothing to
  synchronize.  The router's ``torch.cuda.current_device()`` (moe/router.py:90,92) and the
  expert-parallel ``_AllToAll`` (tensor_parallel/mappings.py:442) are covered by P1.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from collections.abc import Iterator
from typing import Any
from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["apply_cpu_patches", "cuda_to_cpu", "cpu_patches_applied"]

_APPLIED = False


def cpu_patches_applied() -> bool:
    """Return True once :func:`apply_cpu_patches` has patched megatron-core."""
    return _APPLIED


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, str):
        return dev.startswith("cuda")
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device="cuda"`` / ``.cuda()`` / ``.to("cuda")`` to CPU for torch calls.

    Needed (P4/P8) because some megatron-core code allocates explicitly on ``"cuda"``
    rather than on ``torch.cuda.current_device()``, so P1 does not reach it.
    """

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name == "cuda" and args and isinstance(args[0], torch.Tensor):
            return args[0]
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if name == "to":
            args = tuple("cpu" if _is_cuda_device(a) else a for a in args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_to_cpu() -> Iterator[None]:
    """Context manager mapping CUDA allocations to CPU (no-op when CUDA is available).

    Use around megatron-core's pipeline schedules, around model construction with tied
    embeddings under PP, and around fully-parallel checkpoint loads.
    """
    if torch.cuda.is_available():
        yield
        return
    with _CudaToCpuMode():
        yield


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    """CPU twin of ``transformer/utils.py:get_default_causal_mask`` (True = masked)."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _cpu_sliding_window_mask(sq: int, skv: int, window_size: tuple[int, int]) -> torch.Tensor:
    """CPU twin of ``transformer/utils.py:get_sliding_window_causal_mask`` (True = masked)."""
    m = torch.ones(sq, skv, dtype=torch.bool)
    mu = torch.triu(m, diagonal=skv - sq - window_size[0])
    ml = torch.tril(mu, diagonal=skv - sq + window_size[1])
    return ~ml


def _make_cpu_rng_tracker(base: type) -> type:
    """Build the P3 tracker: same interface as ``CudaRNGStatesTracker``, CPU generator states."""

    class CpuRNGStatesTracker(base):  # type: ignore[misc, valid-type]
        """RNG tracker keeping CPU generator states instead of CUDA ones.

        ``add`` seeds a named CPU state; ``fork`` swaps it into the default CPU generator
        for the duration of the block (used by attention dropout / CPU init paths).
        """

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


def apply_cpu_patches() -> bool:
    """Patch megatron-core 0.16.1 so that it runs on CPU (gloo). Idempotent.

    Returns True if patches are (now) in place, False when CUDA is available (then nothing
    is touched).  Call it before building models, running schedules or saving/loading
    torch_dist checkpoints; calling it before forking worker processes is fine (the
    patches are inherited).
    """
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True

    # P1: current_device() is only ever used as a device argument by megatron-core.
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment, return-value]
    # P7: there is nothing to synchronize on CPU.
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]

    # P2: fused_softmax imported the mask builders by name.
    from megatron.core.fusions import fused_softmax

    fused_softmax.get_default_causal_mask = _cpu_causal_mask  # type: ignore[assignment]
    fused_softmax.get_sliding_window_causal_mask = _cpu_sliding_window_mask  # type: ignore[assignment]

    # P3: rebind the tracker class looked up by initialize_rng_tracker; drop any tracker
    # already created with the CUDA class.
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.CudaRNGStatesTracker = _make_cpu_rng_tracker(mrandom.CudaRNGStatesTracker)
    mrandom._CUDA_RNG_STATE_TRACKER = None
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = False

    # S1: a fork-context Manager is ~instant and does not re-import __main__.
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    def _fork_results_queue() -> Any:
        if filesystem_async._results_queue is None:
            filesystem_async._results_queue = mp.get_context("fork").Manager().Queue()
        return filesystem_async._results_queue

    filesystem_async._get_write_results_queue = _fork_results_queue

    # P5 / P6: MoE without TransformerEngine / CUDA streams.
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    moe_utils.te_general_gemm = None  # type: ignore[attr-defined]
    a2a = token_dispatcher.MoEAlltoAllTokenDispatcher
    a2a.cuda_dtoh_stream = _NoStream()  # non-None: __init__ then skips torch.cuda.Stream()
    a2a._maybe_dtoh_and_synchronize = _host_dtoh_and_synchronize  # type: ignore[method-assign]

    _APPLIED = True
    return True


class _NoStream:
    """Placeholder for ``MoEAlltoAllTokenDispatcher.cuda_dtoh_stream`` (P6); never used."""


def _host_dtoh_and_synchronize(
    self: Any, point: str, tokens_per_expert: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Stream-free twin of ``MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize`` (P6).

    On CUDA the split sizes become numpy arrays at ``cuda_dtoh_point``; tensors are already on
    the host here, so only that conversion remains and there is no event to wait for.
    """
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        for name in ("input_splits", "output_splits", "output_splits_tp"):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.numpy())
    return tokens_per_expert
