"""SwiGLU implementations.

* HF (``LlamaMLP``): two GEMMs (gate_proj, up_proj); ``silu(gate)`` rounded to the model dtype,
  then ``* up`` rounded again.
* megatron local spec: **one** fc1 GEMM producing ``[gate; up]``, chunk, ``silu(gate) * up`` in the
  model dtype (two roundings, like HF, but a GEMM of another shape).
* fused (megatron ``bias_activation_fusion`` -> ``bias_swiglu_impl``, a ``torch.compile``d
  kernel): one fc1 GEMM, silu and product in fp32, **one** rounding.  On CPU inductor produces
  exactly the emulation below (checked once by hand, bit for bit, on bf16 inputs); it is emulated
  on CPU because its compilation costs ~20 s per process.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from .base import VariantContext, patched


def _mcore_mlps(models: list[torch.nn.Module]) -> list[torch.nn.Module]:
    mlps = [m for r in models for m in r.modules()
            if type(m).__name__ == "MLP" and hasattr(m, "linear_fc1") and hasattr(m, "linear_fc2")]
    if not mlps:
        raise RuntimeError("no megatron MLP modules found")
    for m in mlps:
        if not m.config.gated_linear_unit:
            raise NotImplementedError("SwiGLU variants need a gated MLP (swiglu)")
    return mlps


def _fc1_bias(mlp: torch.nn.Module) -> torch.Tensor | None:
    bias = getattr(mlp.linear_fc1, "bias", None)
    return bias if isinstance(bias, torch.Tensor) and bias.numel() else None


@contextmanager
def mcore_two_gemms(models: list[torch.nn.Module], ctx: VariantContext) -> Iterator[None]:
    """MCore's MLP runs the HF family's own ``*MLP.forward``: fc1's ``[gate; up]`` weight split into
    two GEMMs (this rank's shard of each), ``act(gate) * up``, then megatron's linear_fc2 (which
    all-reduces under TP)."""
    hf_forward = ctx.hf_symbol(ctx.hf_mlp_class).forward
    with ExitStack() as stack:
        for mlp in _mcore_mlps(models):
            def forward(hidden_states: torch.Tensor, *args: Any, mlp: torch.nn.Module = mlp, **kwargs: Any) -> tuple[torch.Tensor, Any]:
                gate_w, up_w = torch.chunk(mlp.linear_fc1.weight, 2, dim=0)
                bias = _fc1_bias(mlp)
                gate_b, up_b = torch.chunk(bias, 2) if bias is not None else (None, None)
                out: dict[str, Any] = {}

                def down(y: torch.Tensor) -> torch.Tensor:
                    o, b = mlp.linear_fc2(y)
                    out["bias"] = b
                    return o

                shim = SimpleNamespace(gate_proj=lambda x: F.linear(x, gate_w, gate_b),
                                       up_proj=lambda x: F.linear(x, up_w, up_b),
                                       act_fn=mlp.config.activation_func, down_proj=down)
                return hf_forward(shim, hidden_states), out["bias"]

            stack.enter_context(patched(mlp, "forward", forward))
        yield


def swiglu_fp32_emulated(y: torch.Tensor) -> torch.Tensor:
    """Fused SwiGLU's rounding order: silu and product in fp32, one cast."""
    a, b = torch.chunk(y, 2, dim=-1)
    return (F.silu(a.float()) * b.float()).to(y.dtype)


@contextmanager
def mcore_fused_fp32(models: list[torch.nn.Module], ctx: VariantContext) -> Iterator[None]:
    """One fc1 GEMM and an fp32 intermediate: megatron's own ``bias_activation_fusion`` path on a
    GPU, :func:`swiglu_fp32_emulated` on CPU (labelled *emulated*)."""
    mlps = _mcore_mlps(models)
    with ExitStack() as stack:
        if ctx.device == "cuda":
            for mlp in mlps:
                stack.enter_context(patched(mlp.config, "bias_activation_fusion", True))
        else:
            for mlp in mlps:
                def forward(hidden_states: torch.Tensor, *args: Any, mlp: torch.nn.Module = mlp, **kwargs: Any) -> tuple[torch.Tensor, Any]:
                    y, bias = mlp.linear_fc1(hidden_states)
                    if bias is not None:
                        y = y + bias
                    return mlp.linear_fc2(swiglu_fp32_emulated(y))

                stack.enter_context(patched(mlp, "forward", forward))
        yield
