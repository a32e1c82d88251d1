"""Real alternative implementations that an ablation swaps into one of the two models.

``IMPLS`` maps the ``impl`` names used in ``alignment/ablations.yaml`` to context-manager
factories ``(target, VariantContext) -> ContextManager``; ``target`` is the list of MCore
``GPTModel`` chunks for ``side: mcore`` and the HF model for ``side: hf``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ContextManager

from . import attention, mlp, norm, qkv, rope
from .base import HFRope, VariantContext, patched

Impl = Callable[[Any, VariantContext], ContextManager[None]]

IMPLS: dict[str, Impl] = {
    "mcore_norm_hf_order": norm.mcore_hf_order,
    "mcore_norm_te_order": norm.mcore_te_order,
    "hf_norm_torch": norm.hf_torch_rmsnorm,
    "mcore_rope_hf": rope.mcore_hf_rope,
    "mcore_rope_fused": rope.mcore_fused_rope,
    "hf_rope_mcore": rope.hf_mcore_rope,
    "mcore_swiglu_two_gemms": mlp.mcore_two_gemms,
    "mcore_swiglu_fused_fp32": mlp.mcore_fused_fp32,
    "mcore_softmax_model_dtype": attention.mcore_softmax_model_dtype,
    "mcore_sdpa": attention.mcore_sdpa,
    "hf_eager": attention.hf_eager,
    "mcore_qkv_separate": qkv.mcore_separate,
    "hf_qkv_fused": qkv.hf_fused,
}

__all__ = ["IMPLS", "Impl", "HFRope", "VariantContext", "patched"]
