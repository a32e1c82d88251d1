"""Minimal patches that let megatron-core 0.16.1 run on CPU under the gloo backend.

megatron-core assumes CUDA in a handful of places that are *not* guarded by a
CPU fallback.  On a CPU-only torch build every one of those places raises
(``AssertionError: Torch not compiled with CUDA enabled``) so the patches below
only change behaviour on a code path that would otherwise be an error.  They are
applied only when ``torch.cuda.is_available()`` is False, and
:func:`apply_cpu_patches` is idempotent.

Patch ids (P1, P2, ...) name the patches below and in the tests; file references are
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

Training (``ckptbridge converge``) needs three more:

* P9 the optimizers check parameter types by their CUDA names: ``param.type() ==
  'torch.cuda.FloatTensor'`` (optimizer/clip_grads.py:167 on every clipped step,
  optimizer/optimizer.py:671,690 building the mixed-precision optimizer) -> inside
  :func:`cuda_to_cpu`, ``Tensor.type()`` without arguments answers the CUDA name of the same
  dtype.
* P10 ``HybridDeviceOptimizer`` (optimizer/cpu_offloading/hybrid_optimizer.py:253-300) decides
  what to offload by ``param.is_cuda`` and makes host copies with ``.cpu().pin_memory()``; with
  every tensor on the host it offloads nothing and then fails looking up host copies that were
  never made (:97) -> :func:`host_as_device`, used around building and loading that optimizer,
  lets model parameters (and copies derived from them without ``.cpu()``) stand in for device
  memory, makes ``.cpu()`` of them a real copy and ``pin_memory`` a no-op, so megatron's own
  split, D2H gradient copies, CPU Adam and H2D copy-back all run (as host memcpy; *emulated*).
* P12 ``OptimizerConfig.__post_init__`` calls ``is_te_min_version("2.1.0")`` for the
  precision-aware optimizer (optimizer/optimizer_config.py:383), which raises ``TypeError``
  comparing ``None`` when TransformerEngine is absent (a bug, not CPU-specific, like P5) ->
  answers False without TE.
* P13 ``HybridDeviceOptimizer._update_fp32_params_by_new_state`` (hybrid_optimizer.py:369-374,
  run by every ``load_state_dict``) looks up an fp32 copy for *every* parameter, but copies exist
  only for parameters that are not fp32 already (:287), so reloading an fp32 model's offloaded
  optimizer raises ``KeyError`` (a bug, not CPU-specific; fp32 training is what runs on CPU) ->
  the same loop over the parameters that have a copy.
* P11 ``torch.cuda.current_stream()`` (hybrid_optimizer.py:162,217) -> a host stream whose
  waits, events and synchronisation are no-ops (``torch.cuda.stream()`` of it is already a no-op
  without a CUDA device).

Gated delta-net layers (Qwen3-Next / Qwen3.5) need one more:

* P14 ``GatedDeltaNet.__init__`` raises ``ImportError`` when flash-linear-attention (fla, Triton
  kernels: CUDA only) does not import (ssm/gated_delta_net.py:39-47 sets ``HAVE_FLA``, :103-106
  raises), though the module carries a torch kernel, ``torch_chunk_gated_delta_rule`` (used there
  only under ``deterministic_mode``, :370), with the same signature as fla's
  ``chunk_gated_delta_rule`` (:382). The forward also calls fla's ``l2norm`` (:349-350) ->
  ``HAVE_FLA`` True, ``chunk_gated_delta_rule`` bound to the torch kernel (so the torch path runs
  whatever ``deterministic_mode`` says) and ``l2norm`` to fla's formula in torch,
  ``x / sqrt(sum(x^2) + 1e-6)`` (transformers' Qwen3-Next ``l2norm`` is the same). The causal
  convolution already falls back to ``nn.Conv1d`` without ``causal_conv1d`` (:326).
* P15 with ``attention_output_gate`` and fewer query groups than TP ranks (Qwen3-Next / Qwen3.5: 2 KV heads, TP
  4 or 8) ``SelfAttention.get_query_key_value_tensors`` narrows the gathered query to this rank's heads
  (transformer/attention.py:1465-1475) but not the gate (:1486-1489), so ``_apply_output_gate``'s
  ``gate.view(*x.shape)`` (:1221) raises (a bug, not CPU-specific, like P5; fixed upstream by
  NVIDIA/Megatron-LM#3575) -> the same narrowing applied to the gate after the original method.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import weakref
from collections.abc import Iterator
from typing import Any
from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["apply_cpu_patches", "cuda_to_cpu", "host_as_device"]

_APPLIED = False


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
        if name == "type" and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            return func(*args).replace("torch.", "torch.cuda.", 1)  # P9
        return func(*args, **kwargs)


_IS_CUDA = torch._C.TensorBase.__dict__["is_cuda"]
_DERIVED = ("detach", "clone", "float", "half", "bfloat16", "to", "contiguous", "view", "__getitem__")


class _HostAsDeviceMode(_CudaToCpuMode):
    """P10: model parameters play device memory for ``HybridDeviceOptimizer``'s offload split."""

    def __init__(self) -> None:
        super().__init__()
        self._device: dict[int, weakref.ref[torch.Tensor]] = {}

    def _on_device(self, t: torch.Tensor) -> bool:
        if isinstance(t, torch.nn.Parameter):
            return True
        ref = self._device.get(id(t))
        return ref is not None and ref() is t

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if getattr(func, "__self__", None) is _IS_CUDA:
            return self._on_device(args[0])
        name = getattr(func, "__name__", "")
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name == "pin_memory" and src is not None:
            return src
        if name == "cpu" and src is not None and self._on_device(src):
            return src.detach().clone()  # a device-to-host copy, not an alias
        kwargs = dict(kwargs or {})
        kwargs.pop("pin_memory", None)
        out = super().__torch_function__(func, types, args, kwargs)
        if (name in _DERIVED and src is not None and isinstance(out, torch.Tensor) and out is not src
                and self._on_device(src)):
            self._device[id(out)] = weakref.ref(out)
        return out


@contextlib.contextmanager
def host_as_device() -> Iterator[None]:
    """Build or load megatron's ``HybridDeviceOptimizer`` on a host-only machine (P10).

    No-op when CUDA is available: there the optimizer offloads for real.
    """
    if torch.cuda.is_available():
        yield
        return
    with _HostAsDeviceMode():
        yield


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
    # P11: one host "stream" whose waits and events are no-ops.
    torch.cuda.current_stream = lambda device=None: _HOST_STREAM  # type: ignore[assignment]

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

    # P12: the precision-aware optimizer's config check compares TE's version, None without TE.
    from megatron.core.optimizer import optimizer_config
    from megatron.core.utils import get_te_version

    te_min = optimizer_config.is_te_min_version
    optimizer_config.is_te_min_version = lambda v, *a, **k: get_te_version() is not None and te_min(v, *a, **k)

    # P13: reloading a HybridDeviceOptimizer whose parameters are already fp32.
    from megatron.core.optimizer.cpu_offloading.hybrid_optimizer import HybridDeviceOptimizer

    HybridDeviceOptimizer._update_fp32_params_by_new_state = _update_fp32_params_by_new_state

    # P14: gated delta-net on its own torch kernel when fla (CUDA-only) is absent.
    from megatron.core.ssm import gated_delta_net

    if not gated_delta_net.HAVE_FLA:
        gated_delta_net.HAVE_FLA = True
        gated_delta_net.l2norm = _l2norm
        gated_delta_net.chunk_gated_delta_rule = gated_delta_net.torch_chunk_gated_delta_rule

    # P15: the output gate narrowed to this rank's heads like the query.
    from megatron.core.transformer.attention import SelfAttention

    SelfAttention.get_query_key_value_tensors = _gate_narrowed(SelfAttention.get_query_key_value_tensors)

    _APPLIED = True
    return True


class _NoStream:
    """Placeholder for ``MoEAlltoAllTokenDispatcher.cuda_dtoh_stream`` (P6); never used."""


class _HostStream:
    """P11: work on the host is already ordered, so waiting and recording do nothing."""

    device = torch.device("cpu")

    def wait_stream(self, stream: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> "_HostStream":
        return self  # doubles as the event: wait()/synchronize()/query() below

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_HOST_STREAM = _HostStream()


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


def _l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-6) -> torch.Tensor:
    """P14: fla's ``l2norm`` (fla/modules/l2norm.py) in torch: ``x / sqrt(sum(x^2) + eps)`` over ``dim``."""
    return x * torch.rsqrt((x * x).sum(dim=dim, keepdim=True) + eps)


def _gate_narrowed(original: Callable[..., Any]) -> Callable[..., Any]:
    """P15: ``SelfAttention.get_query_key_value_tensors`` whose gate holds this rank's heads, as its query does."""

    def get_query_key_value_tensors(self: Any, hidden_states: torch.Tensor, key_value_states: Any = None,
                                    output_gate: bool = False, split_qkv: bool = True) -> Any:
        out = original(self, hidden_states, key_value_states, output_gate=output_gate, split_qkv=split_qkv)
        if not (output_gate and self.config.num_query_groups < self.world_size):
            return out
        from megatron.core.parallel_state import get_tensor_model_parallel_rank

        query, key, value, gate = out
        ranks_per_group = self.world_size // self.config.num_query_groups
        size = self.num_attention_heads_per_partition // ranks_per_group
        first = get_tensor_model_parallel_rank() % ranks_per_group * size
        return query, key, value, gate[:, :, first:first + size]

    return get_query_key_value_tensors


def _update_fp32_params_by_new_state(self: Any) -> None:
    """P13: refresh the fp32 copies from the loaded state, for the parameters that have one."""
    if not self.param_update_in_fp32:
        return
    for param, v in self.state.items():
        fp32_param = self.param_to_fp32_param.get(param)
        if fp32_param is not None:
            fp32_param.data.copy_(v["master_param"])
