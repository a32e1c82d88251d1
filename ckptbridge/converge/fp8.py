"""FP8 training for short convergence runs: TransformerEngine where it can run, emulated elsewhere.

Real FP8 needs TransformerEngine (TE) and a GPU with compute capability >= 8.9.  Without them the
same numerics are *emulated* by fake quantisation, so that a convergence check of an FP8 recipe
(loss curve vs a bf16/fp32 baseline) can run on CPU or on older GPUs.  The emulation follows TE's
delayed-scaling recipe per linear layer:

* three scaled tensors per linear: the input activation and the weight (``fwd_format``, E4M3) and
  the gradient w.r.t. the linear's output (``bwd_format``: E5M2 in the "hybrid" recipe);
* each has an amax history; the scale used in step ``t`` comes from the history *before* ``t``:
  ``scale = (fp8_max / amax) / 2**margin``, kept unchanged when ``amax`` is 0 or not finite, and
  1.0 before the first update (as in TE, so step 0 runs with scale 1);
* quantise = ``(x.float() * scale).clamp(-fp8_max, fp8_max).to(float8).float() / scale`` cast back
  to ``x.dtype``; the GEMMs then run in the model dtype on the rounded values (TE runs them in FP8
  with fp32 accumulation, so the emulation adds at most one extra rounding to the model dtype);
* gradients pass straight through the input/weight quantisers to the real tensors, so weight
  gradients still land in ``param.grad`` / megatron DDP's ``main_grad``;
* :meth:`Fp8Emulation.step` (after each optimizer step) all-reduces the current amaxes (MAX) over
  the tensor-parallel group (or Megatron-LM's tp x dp x cp amax group), recomputes the scales and
  rolls the histories, as TE's amax reduction does at the end of an iteration.  Several
  microbatches per step give the max over them; so does any forward run in between (an eval).

Quantisation is injected by shadowing ``_forward_impl`` on each megatron-core
``ColumnParallelLinear`` / ``RowParallelLinear`` instance: that is the one call through which both
classes run their GEMM (``linear_with_grad_accumulation_and_async_allreduce``), it receives input,
weight and bias separately, and the TP communication around it stays untouched.

Importing this module imports neither TransformerEngine nor megatron-core (megatron's layers
import TE when it is installed); both are imported inside the functions that need them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: largest finite magnitude of each FP8 format (OCP FP8: E4M3 "fn" has no inf, E5M2 is IEEE-like)
FP8_MAX: dict[str, float] = {"e4m3": 448.0, "e5m2": 57344.0}
FP8_DTYPE: dict[str, torch.dtype] = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
#: |x * scale| above this is clipped, not merely rounded to fp8_max (fp8_max + half its spacing):
#: with a scale fresh from amax, the amax element itself lands a rounding error above fp8_max
_CLIP_THRESHOLD: dict[str, float] = {"e4m3": 448.0 + 16.0, "e5m2": 57344.0 + 2048.0}

#: the scaled tensors of one linear, in the order they are laid out in :class:`DelayedScaler`
ROLES: tuple[str, str, str] = ("input", "weight", "grad")

#: recipes by name: the two FP8 formats TE and Megatron-LM (``--fp8-format``) offer
_RECIPE_FORMATS: dict[str, tuple[str, str]] = {"hybrid": ("e4m3", "e5m2"), "e4m3": ("e4m3", "e4m3")}


@dataclass(frozen=True)
class Fp8Recipe:
    """TE's ``DelayedScaling`` recipe in plain fields (also what the emulation implements).

    ``amax_history_len`` defaults to 16, between Megatron-LM's default (1) and TE's (1024): long
    enough to smooth one-step spikes, short enough to follow a short run's early drift.
    """

    fwd_format: str = "e4m3"
    bwd_format: str = "e5m2"
    amax_history_len: int = 16
    amax_compute_algo: str = "max"
    margin: int = 0

    def __post_init__(self) -> None:
        formats = (self.fwd_format, self.bwd_format)
        if formats not in _RECIPE_FORMATS.values():
            raise ValueError(
                f"unsupported FP8 formats fwd={self.fwd_format!r} bwd={self.bwd_format!r}; "
                f"TE offers {sorted(_RECIPE_FORMATS.values())}"
            )
        if self.amax_history_len < 1:
            raise ValueError(f"amax_history_len must be >= 1, got {self.amax_history_len}")
        if self.amax_compute_algo not in ("max", "most_recent"):
            raise ValueError(
                f"amax_compute_algo must be 'max' or 'most_recent', got {self.amax_compute_algo!r}"
            )

    @property
    def name(self) -> str:
        """``"hybrid"`` or ``"e4m3"`` -- Megatron-LM's ``--fp8-format`` / TE's ``Format`` name."""
        return next(n for n, f in _RECIPE_FORMATS.items() if f == (self.fwd_format, self.bwd_format))

    @classmethod
    def from_name(cls, name: str) -> Fp8Recipe:
        """``"hybrid"`` (E4M3 forward, E5M2 gradients; the usual choice) or ``"e4m3"`` (both E4M3)."""
        key = name.strip().lower()
        if key not in _RECIPE_FORMATS:
            raise ValueError(f"unknown FP8 recipe {name!r}; known: {sorted(_RECIPE_FORMATS)}")
        fwd, bwd = _RECIPE_FORMATS[key]
        return cls(fwd_format=fwd, bwd_format=bwd)

    def describe(self) -> str:
        """Human-readable recipe, e.g. ``hybrid: E4M3 fwd / E5M2 bwd, delayed scaling, ...``."""
        text = (
            f"{self.name}: {self.fwd_format.upper()} fwd / {self.bwd_format.upper()} bwd, "
            f"delayed scaling, amax history {self.amax_history_len}"
        )
        if self.amax_compute_algo != "max":
            text += f" ({self.amax_compute_algo})"
        if self.margin:
            text += f", margin {self.margin}"
        return text


def fake_quantize(x: torch.Tensor, scale: torch.Tensor | float, fmt: str) -> torch.Tensor:
    """Round ``x`` to the FP8 grid of ``fmt`` under ``scale`` and return it in ``x.dtype``.

    Values beyond ``fp8_max / scale`` saturate (TE casts with saturation; without the clamp
    ``float8_e4m3fn`` would turn them into NaN), values below the smallest subnormal flush to 0.
    """
    fp8_max = FP8_MAX[fmt]
    q = (x.float() * scale).clamp(-fp8_max, fp8_max).to(FP8_DTYPE[fmt]).float() / scale
    return q.to(x.dtype)


class DelayedScaler:
    """Amax histories and scales of ``n`` tensors, updated together like TE's global FP8 buffers.

    ``amax_history[0]`` is the current step's slot (a max over every quantisation in the step);
    :meth:`update` turns the whole history into new scales, then rolls it so that slot 0 is fresh.
    All state is in tensors on ``device`` so that recording never synchronises a GPU.
    """

    def __init__(
        self,
        formats: Sequence[str],
        history_len: int,
        algo: str = "max",
        margin: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if algo not in ("max", "most_recent"):
            raise ValueError(f"algo must be 'max' or 'most_recent', got {algo!r}")
        self.formats = list(formats)
        n = len(self.formats)
        self.algo = algo
        self.margin = margin
        self.fp8_max = torch.tensor([FP8_MAX[f] for f in self.formats], device=device)
        self._clip = [_CLIP_THRESHOLD[f] for f in self.formats]
        self.amax_history = torch.zeros(history_len, n, device=device)
        self.scale = torch.ones(n, device=device)
        self.updates = 0
        # element counts of the current step, and of the last completed one (for stats)
        self._saturated = torch.zeros(n, dtype=torch.int64, device=device)
        self._underflow = torch.zeros(n, dtype=torch.int64, device=device)
        self._numel = torch.zeros(n, dtype=torch.int64, device=device)
        self.last_saturated = torch.zeros_like(self._saturated)
        self.last_underflow = torch.zeros_like(self._underflow)
        self.last_numel = torch.zeros_like(self._numel)

    def __len__(self) -> int:
        return len(self.formats)

    @torch.no_grad()
    def quantize(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Record ``x``'s amax in slot 0 of tensor ``i`` and fake-quantise it with the current scale.

        Also counts saturated values (clipped at ``fp8_max``, beyond its rounding interval) and
        underflows (non-zero values that round to 0): the two ways FP8 loses information that a
        stale delayed scale makes worse.
        """
        fmt = self.formats[i]
        scale = self.scale[i]
        xf = x.detach().float()
        amax = xf.abs().amax() if xf.numel() else xf.new_zeros(())
        self.amax_history[0, i] = torch.maximum(self.amax_history[0, i], amax)
        q = fake_quantize(xf, scale, fmt)
        self._saturated[i] += (xf.abs() * scale > self._clip[i]).sum()
        self._underflow[i] += ((q == 0) & (xf != 0)).sum()
        self._numel[i] += xf.numel()
        return q.to(x.dtype)

    @torch.no_grad()
    def update(self, group: Any = None) -> None:
        """End of a step: reduce the current amaxes (MAX over ``group``), rescale, roll.

        Same order as TE's ``_default_get_amax_and_update_history`` + ``_default_sf_compute``:
        the amax used includes the step just finished, and the new scale serves the next step.
        """
        if group is not None:
            current = self.amax_history[0].contiguous()
            torch.distributed.all_reduce(current, op=torch.distributed.ReduceOp.MAX, group=group)
            self.amax_history[0] = current
        if self.algo == "max":
            amax = self.amax_history.amax(dim=0)
        else:
            amax = self.amax_history[0].clone()
        new_scale = (self.fp8_max / amax) / (2.0**self.margin)
        usable = (amax > 0) & torch.isfinite(amax) & torch.isfinite(new_scale)
        self.scale = torch.where(usable, new_scale, self.scale)
        self.amax_history = torch.roll(self.amax_history, shifts=-1, dims=0)
        self.amax_history[0] = 0.0
        self.last_saturated, self._saturated = self._saturated, torch.zeros_like(self._saturated)
        self.last_underflow, self._underflow = self._underflow, torch.zeros_like(self._underflow)
        self.last_numel, self._numel = self._numel, torch.zeros_like(self._numel)
        self.updates += 1


class _FakeQuantizeSTE(torch.autograd.Function):
    """Forward: fake-quantise (recording amax).  Backward: straight-through to the real tensor."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scaler: DelayedScaler, index: int) -> torch.Tensor:
        return scaler.quantize(x, index)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad, None, None


class _QuantizeGradOutput(torch.autograd.Function):
    """Identity in forward; in backward the incoming dY is fake-quantised before the GEMMs see it."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, scaler: DelayedScaler, index: int) -> torch.Tensor:
        ctx.scaler = scaler
        ctx.index = index
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return ctx.scaler.quantize(grad, ctx.index), None, None


_MARK = "_ckptbridge_fp8_emulation"


def _megatron_linear_types() -> tuple[type, ...]:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    return (ColumnParallelLinear, RowParallelLinear)


def _device_of(linears: Sequence[tuple[str, torch.nn.Module]]) -> torch.device:
    """Where the scaling state lives: with the linears' parameters (a tied output layer has none)."""
    for _, module in linears:
        for p in module.parameters():
            return p.device
    raise ValueError("the megatron linears to quantise have no parameters to place FP8 state by")


class Fp8Emulation:
    """Handle of an installed FP8 emulation (see :func:`enable_emulated_fp8`)."""

    def __init__(
        self,
        linears: Sequence[tuple[str, torch.nn.Module]],
        recipe: Fp8Recipe,
        *,
        quantize_grad_output: bool = True,
        amax_group: str = "tp",
    ) -> None:
        if amax_group not in AMAX_GROUPS:
            raise ValueError(f"amax_group must be one of {AMAX_GROUPS}, got {amax_group!r}")
        if not linears:
            raise ValueError("no megatron ColumnParallelLinear/RowParallelLinear to quantise")
        taken = [name for name, module in linears if getattr(module, _MARK, None) is not None]
        if taken:  # checked before patching anything, so a refusal leaves no partial install
            raise RuntimeError(f"FP8 emulation is already enabled on {taken[:3]} ...")
        self.recipe = recipe
        self.quantize_grad_output = quantize_grad_output
        self.amax_group = amax_group
        self.names = [name for name, _ in linears]
        device = _device_of(linears)
        formats = [recipe.fwd_format, recipe.fwd_format, recipe.bwd_format] * len(linears)
        self.scaler = DelayedScaler(
            formats, recipe.amax_history_len, recipe.amax_compute_algo, recipe.margin, device
        )
        self.label = f"emulated FP8 ({recipe.describe()})"
        if not quantize_grad_output:
            self.label += " [gradients not quantised]"
        # (module, instance-level _forward_impl it had before us, or None)
        self._patched: list[tuple[torch.nn.Module, Any]] = []
        for k, (_, module) in enumerate(linears):
            self._install(module, k)

    def _install(self, module: torch.nn.Module, k: int) -> None:
        previous = module.__dict__.get("_forward_impl")
        original: Callable[..., torch.Tensor] = module._forward_impl
        scaler = self.scaler
        quantize_grad_output = self.quantize_grad_output

        def forward_impl(
            input: torch.Tensor,
            weight: torch.Tensor,
            bias: torch.Tensor | None = None,
            **kwargs: Any,
        ) -> torch.Tensor:
            # The GEMM gets quantised copies (non-leaf tensors); fused accumulation into
            # weight.main_grad would look for main_grad on the copy, so the plain wgrad path is
            # used and the gradient reaches the parameter through the straight-through quantiser
            # (megatron DDP then adds param.grad to main_grad in its grad-accumulator hook).
            kwargs["gradient_accumulation_fusion"] = False
            x = _FakeQuantizeSTE.apply(input, scaler, 3 * k)
            w = _FakeQuantizeSTE.apply(weight, scaler, 3 * k + 1)
            out = original(input=x, weight=w, bias=None, **kwargs)
            if quantize_grad_output:
                out = _QuantizeGradOutput.apply(out, scaler, 3 * k + 2)
            # bias outside the quantised region: TE adds it in high precision and computes dbias
            # from the unquantised dY
            return out if bias is None else out + bias

        module._forward_impl = forward_impl  # type: ignore[method-assign]
        setattr(module, _MARK, self)
        self._patched.append((module, previous))

    def step(self) -> None:
        """Call once after each optimizer step: reduce amaxes (MAX over ``amax_group``), update
        scales, roll histories.  Every rank of that group must call it (it is a collective)."""
        if not self._patched:
            raise RuntimeError("step() after remove()")
        self.scaler.update(group=_amax_reduction_group(self.amax_group))

    def remove(self) -> None:
        """Restore every patched linear's original ``_forward_impl`` (idempotent)."""
        for module, previous in self._patched:
            if previous is None:
                del module._forward_impl
            else:
                module._forward_impl = previous  # type: ignore[method-assign]
            delattr(module, _MARK)
        self._patched = []

    def state_dict(self) -> dict[str, Any]:
        """This rank's scaling state (TE keeps it in each module's ``_extra_state``); without it a
        resumed run would restart from scale 1.0 and differ from an uninterrupted one."""
        return {
            "names": list(self.names),
            "amax_history": self.scaler.amax_history.clone(),
            "scale": self.scaler.scale.clone(),
            "updates": self.scaler.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` of the same model layout (same linears on this rank)."""
        if list(state["names"]) != self.names:
            raise ValueError("FP8 state was saved for other linears than the ones emulated here")
        history = state["amax_history"]
        if tuple(history.shape) != tuple(self.scaler.amax_history.shape):
            raise ValueError(
                f"amax history shape {tuple(history.shape)} != "
                f"{tuple(self.scaler.amax_history.shape)} (another amax_history_len?)"
            )
        device = self.scaler.scale.device
        self.scaler.amax_history = history.to(device=device, dtype=torch.float32).clone()
        self.scaler.scale = state["scale"].to(device=device, dtype=torch.float32).clone()
        self.scaler.updates = int(state["updates"])

    def stats(self) -> dict[str, float]:
        """Scale and clipping figures for the report.

        ``scale_<role>_{mean,min,max}`` over the linears for role input/weight/grad, and
        ``saturated_frac_<role>`` / ``underflow_frac_<role>``: the fraction of elements quantised
        in the last completed step that were clamped at fp8_max / flushed to zero.
        """
        n = len(self.names)
        scale = self.scaler.scale.view(n, 3).double().cpu()
        sat = self.scaler.last_saturated.view(n, 3).sum(dim=0).cpu()
        under = self.scaler.last_underflow.view(n, 3).sum(dim=0).cpu()
        numel = self.scaler.last_numel.view(n, 3).sum(dim=0).cpu()
        out: dict[str, float] = {"fp8_linears": float(n), "fp8_steps": float(self.scaler.updates)}
        for r, role in enumerate(ROLES):
            out[f"scale_{role}_mean"] = float(scale[:, r].mean())
            out[f"scale_{role}_min"] = float(scale[:, r].min())
            out[f"scale_{role}_max"] = float(scale[:, r].max())
            total = max(int(numel[r]), 1)
            out[f"saturated_frac_{role}"] = int(sat[r]) / total
            out[f"underflow_frac_{role}"] = int(under[r]) / total
        return out


#: ``amax_group`` choices: ``"tp"`` reduces over the tensor-parallel group, so that all shards of
#: a tensor share one scale (TE's requirement, and Megatron-LM's ``--tp-only-amax-red``);
#: ``"tp_dp_cp"`` over tensor x data x context parallel ranks, Megatron-LM's default amax
#: reduction group, which also makes activation/gradient scales identical across DP replicas.
AMAX_GROUPS: tuple[str, str] = ("tp", "tp_dp_cp")


def _amax_reduction_group(scope: str) -> Any:
    """The process group to all-reduce amaxes over, or None when it has a single rank."""
    if not torch.distributed.is_initialized():
        return None
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    if scope == "tp":
        group = parallel_state.get_tensor_model_parallel_group()
    else:
        group = parallel_state.get_amax_reduction_group(with_context_parallel=True)
    return group if torch.distributed.get_world_size(group) > 1 else None


def enable_emulated_fp8(
    model_chunks: list[torch.nn.Module],
    recipe: Fp8Recipe,
    *,
    quantize_grad_output: bool = True,
    include_output_layer: bool = False,
    amax_group: str = "tp",
) -> Fp8Emulation:
    """Make every megatron-core ``ColumnParallelLinear`` / ``RowParallelLinear`` in the chunks
    compute with fake-quantised FP8 operands.  Returns a handle (``step``, ``remove``, ``stats``).

    The GPT ``output_layer`` is left in high precision unless ``include_output_layer``: Megatron
    builds it as a plain ``ColumnParallelLinear`` even with the TE spec, so real FP8 runs never
    quantise it.  ``quantize_grad_output=False`` keeps dY unquantised (an ablation).
    ``amax_group`` (see :data:`AMAX_GROUPS`): ``"tp"`` by default; ``"tp_dp_cp"`` reproduces
    Megatron-LM's default reduction when data parallelism is used.  Chunks may be wrapped in
    megatron DDP; modules are found by type, so the wrapper does not matter.
    """
    types = _megatron_linear_types()
    linears: list[tuple[str, torch.nn.Module]] = []
    for c, chunk in enumerate(model_chunks):
        for name, module in chunk.named_modules():
            if not isinstance(module, types):
                continue
            if not include_output_layer and name.split(".")[-1] == "output_layer":
                continue
            linears.append((f"{c}:{name}", module))
    return Fp8Emulation(
        linears, recipe, quantize_grad_output=quantize_grad_output, amax_group=amax_group
    )


# --------------------------------------------------------------------------------------------
# real FP8 with TransformerEngine (GPU with compute capability >= 8.9)
# --------------------------------------------------------------------------------------------


def te_fp8_available() -> bool:
    """TransformerEngine installed and a CUDA device that has FP8 tensor cores (sm_89+).

    Looks the package up without importing it, so that asking is cheap and side-effect free.
    """
    if not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability() < (8, 9):
        return False
    return importlib.util.find_spec("transformer_engine") is not None


def mcore_fp8_config(recipe: Fp8Recipe) -> dict[str, Any]:
    """``TransformerConfig`` fields that make megatron-core (TE spec) train with ``recipe``."""
    return {
        "fp8": recipe.name,
        "fp8_recipe": "delayed",
        "fp8_margin": recipe.margin,
        "fp8_amax_history_len": recipe.amax_history_len,
        "fp8_amax_compute_algo": recipe.amax_compute_algo,
    }
