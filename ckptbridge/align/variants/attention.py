"""Attention-core implementations.

* MCore local ``DotProductAttention``: ``baddbmm(alpha=scale)`` in the model dtype (one rounding
  of the scaled scores), ``FusedScaleMaskSoftmax`` in fp32 when ``attention_softmax_in_fp32``
  (megatron's default) then cast, ``bmm`` with V.
* HF eager: ``matmul`` rounded, ``* scale`` rounded again, softmax in fp32, cast, ``matmul``.
* HF default (SDPA): ``torch.nn.functional.scaled_dot_product_attention`` -- on CPU a fused
  kernel that keeps scores and probabilities in fp32 and rounds the output once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from types import SimpleNamespace
from typing import Any

import torch

from .base import VariantContext, patched


def _cores(models: list[torch.nn.Module]) -> list[torch.nn.Module]:
    cores = [m for r in models for m in r.modules() if type(m).__name__ == "DotProductAttention"]
    if not cores:
        raise NotImplementedError("no local-spec DotProductAttention found (TE attention is not swappable here)")
    return cores


@contextmanager
def mcore_softmax_model_dtype(models: list[torch.nn.Module], ctx: VariantContext) -> Iterator[None]:
    """megatron's own softmax with ``attention_softmax_in_fp32=False``: the softmax runs in the
    model dtype (the flag is read by ``FusedScaleMaskSoftmax`` at call time)."""
    with ExitStack() as stack:
        for core in _cores(models):
            stack.enter_context(patched(core.scale_mask_softmax, "softmax_in_fp32", False))
        yield


@contextmanager
def mcore_sdpa(models: list[torch.nn.Module], ctx: VariantContext) -> Iterator[None]:
    """MCore's attention core replaced by HF's ``sdpa_attention_forward`` (causal, no mask), the
    function HF's default attention calls."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with ExitStack() as stack:
        for core in _cores(models):
            if getattr(core.config, "window_size", None) is not None:
                raise NotImplementedError("attention/mcore_sdpa does not model sliding windows")

            def forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
                        attn_mask_type: Any = None, attention_bias: Any = None, packed_seq_params: Any = None,
                        core: torch.nn.Module = core) -> torch.Tensor:
                # megatron [s, b, heads, d] -> HF [b, heads, s, d]
                q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
                shim = SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], is_causal=True, training=False)
                out, _ = sdpa_attention_forward(shim, q, k, v, None, dropout=0.0, scaling=core.softmax_scale, is_causal=True)
                b, s = out.shape[0], out.shape[1]  # HF returns [b, s, heads, d]
                return out.reshape(b, s, -1).transpose(0, 1).contiguous()

            stack.enter_context(patched(core, "forward", forward))
        yield


@contextmanager
def hf_eager(model: torch.nn.Module, ctx: VariantContext) -> Iterator[None]:
    """HF with ``attn_implementation="eager"`` instead of its default SDPA."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
