"""Whether an ablation applies to the model at hand, and if not, why -- decided before anything runs.

An ablation swaps one implementation of an op; on a model without that op (RMSNorm variants on a
LayerNorm model, the fused-QKV variants on multi-latent attention, SwiGLU variants on an MoE MLP)
or at a layout megatron refuses (TP not dividing the heads) it would crash the whole run half-way.
Each recipe in ``alignment/ablations.yaml`` names the model features it ``requires``; the checks
below read the checkpoint's Megatron-LM args (and the HF attention actually used) and return a
one-line reason for each feature the model lacks.  Skipped recipes are listed in report.md with
that reason instead of being run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Args = Mapping[str, Any]


def _mla(a: Args) -> bool:
    return bool(a.get("multi_latent_attention"))


def _moe(a: Args) -> bool:
    return bool(a.get("num_moe_experts"))


def _rmsnorm(a: Args, hf_attention: str) -> str | None:
    norm = a.get("normalization", "LayerNorm")
    return None if norm == "RMSNorm" else f"the model normalises with {norm}, the variant swaps RMSNorm modules"


def _linear_qkv(a: Args, hf_attention: str) -> str | None:
    return ("multi-latent attention (MLA) has no fused linear_qkv and no q_proj/k_proj/v_proj" if _mla(a) else None)


def _shared_rope(a: Args, hf_attention: str) -> str | None:
    if _mla(a):
        return ("MLA rotates only its rope head slice with a per-layer (YaRN) rotary embedding; the variant patches "
                "the model-level RotaryEmbedding and HF's apply_rotary_pos_emb")
    kind = a.get("position_embedding_type", "rope")
    return None if kind == "rope" else f"position embedding {kind!r} is not RoPE"


def _local_core_attention(a: Args, hf_attention: str) -> str | None:
    if _mla(a):
        return "MLA's core attention (q/k and v head sizes differ) is not the DotProductAttention the variant swaps"
    if a.get("window_size") is not None:
        return "sliding-window attention is not modelled by this variant"
    return None


def _dense_swiglu_mlp(a: Args, hf_attention: str) -> str | None:
    if _moe(a):
        return "MoE model: the variant replaces a dense MLP's forward with the HF family's dense MLP, which MoE layers do not have"
    return None if a.get("swiglu") else "the MLP is not gated (no SwiGLU)"


def _hf_sdpa(a: Args, hf_attention: str) -> str | None:
    return None if hf_attention == "sdpa" else f"the baseline already runs HF {hf_attention} attention (the model does not support SDPA)"


#: Feature name (as used in ``requires:``) -> check returning the reason it is missing, or None.
FEATURES: dict[str, Callable[[Args, str], str | None]] = {
    "rmsnorm": _rmsnorm,
    "linear_qkv": _linear_qkv,
    "shared_rope": _shared_rope,
    "local_core_attention": _local_core_attention,
    "dense_swiglu_mlp": _dense_swiglu_mlp,
    "hf_sdpa": _hf_sdpa,
}


def layout_problem(a: Args, tp: int, pp: int) -> str | None:
    """Why megatron cannot build this model at TP=``tp``, PP=``pp`` (the sizes it requires to divide), or None."""
    problems = []
    for field in ("num_attention_heads", "num_query_groups", "ffn_hidden_size", "moe_ffn_hidden_size",
                  "moe_shared_expert_intermediate_size"):
        if field == "num_query_groups" and not a.get("group_query_attention"):
            continue
        v = a.get(field)
        if tp > 1 and isinstance(v, int) and v % tp:
            problems.append(f"{field} ({v}) is not a multiple of TP={tp}")
    layers = a.get("num_layers")
    if pp > 1 and isinstance(layers, int) and layers < pp:
        problems.append(f"num_layers ({layers}) is smaller than PP={pp}")
    return "; ".join(problems) or None


def unmet(requires: tuple[str, ...], layout: Mapping[str, int], args: Args, hf_attention: str,
          tp: int, pp: int) -> str | None:
    """The reason a recipe does not apply (first missing feature, or the layout), else None."""
    for feature in requires:
        reason = FEATURES[feature](args, hf_attention)
        if reason:
            return reason
    if layout:
        return layout_problem(args, int(layout.get("tp", tp)), int(layout.get("pp", pp)))
    return None
