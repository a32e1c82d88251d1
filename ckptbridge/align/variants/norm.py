"""RMSNorm rounding orders.

* HF (``LlamaRMSNorm`` and its Qwen/Mistral copies): normalise in fp32, **cast to the input dtype,
  then multiply by the weight** in that dtype -- two roundings.
* TE (``transformer_engine.pytorch.RMSNorm``, also fused into linear_qkv / linear_fc1): weight
  multiplied **in fp32, one cast** at the end.
* megatron's local spec: ``torch.nn.RMSNorm`` whose weight megatron keeps in fp32
  (torch_norm.py); on CPU torch then computes in fp32 and casts once (TE order, measured).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .base import VariantContext, modules_named, patched


def _eps(norm: torch.nn.Module) -> float:
    eps = getattr(norm, "eps", None)
    if eps is None:
        eps = getattr(norm, "variance_epsilon", None)
    return float(eps) if eps is not None else float(torch.finfo(torch.float32).eps)


def _mcore_norms(models: list[torch.nn.Module]) -> list[torch.nn.Module]:
    norms = modules_named(models, "RMSNorm")
    if not norms:
        raise RuntimeError("no RMSNorm modules found in the MCore model (TE-fused norms are not swappable)")
    return norms


@contextmanager
def mcore_hf_order(models: list[torch.nn.Module], ctx: VariantContext) -> Iterator[None]:
    """Every MCore RMSNorm (pre-norms, final norm, q/k norms) runs the HF family's own
    ``*RMSNorm.forward`` with the weight in the activation dtype, as HF holds it."""
    hf_forward = ctx.hf_symbol(ctx.hf_norm_class).forward
    with ExitStack() as stack:
        for norm in _mcore_norms(models):
            def forward(x: torch.Tensor, norm: torch.nn.Module = norm) -> torch.Tensor:
                shim = SimpleNamespace(weight=norm.weight.to(x.dtype), variance_epsilon=_eps(norm))
                return hf_forward(shim, x)

            stack.enter_context(patched(norm, "forward", forward))
        yield


def te_order_emulated(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """TE's rounding order in plain torch: everything in fp32, one cast to the input dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype)


@contextmanager
def mcore_te_order(models: list[torch.nn.Module], ctx: VariantContext) -> Iterator[None]:
    """TE's RMSNorm: the real ``transformer_engine.pytorch.RMSNorm`` when TE and CUDA are present,
    else :func:`te_order_emulated` (labelled *emulated* in the report)."""
    with ExitStack() as stack:
        for norm in _mcore_norms(models):
            if ctx.te:
                import transformer_engine.pytorch as te  # only importable on GPU machines with TE

                te_norm = te.RMSNorm(norm.weight.shape[-1], eps=_eps(norm), device=norm.weight.device)

                def forward(x: torch.Tensor, norm: torch.nn.Module = norm, te_norm: torch.nn.Module = te_norm) -> torch.Tensor:
                    with torch.no_grad():
                        te_norm.weight.copy_(norm.weight)
                    return te_norm(x)
            else:
                def forward(x: torch.Tensor, norm: torch.nn.Module = norm) -> torch.Tensor:
                    return te_order_emulated(x, norm.weight, _eps(norm))

            stack.enter_context(patched(norm, "forward", forward))
        yield


@contextmanager
def hf_torch_rmsnorm(model: torch.nn.Module, ctx: VariantContext) -> Iterator[None]:
    """Every HF RMSNorm is replaced by what megatron's local spec uses: ``torch.nn.RMSNorm``
    (``F.rms_norm``) with the weight held in fp32 (megatron's torch_norm.py keeps it so)."""
    norms = modules_named(model, "RMSNorm")
    if not norms:
        raise RuntimeError("no *RMSNorm modules found in the HF model")
    with ExitStack() as stack:
        for norm in norms:
            def forward(x: torch.Tensor, norm: torch.nn.Module = norm) -> torch.Tensor:
                w = norm.weight.float()
                return F.rms_norm(x, (w.shape[-1],), w, _eps(norm))

            stack.enter_context(patched(norm, "forward", forward))
        yield
