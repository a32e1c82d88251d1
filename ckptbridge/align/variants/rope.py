"""RoPE implementations.

* HF: ``inv_freq`` (fp32 buffer, with HF's rope-scaling code), angles ``position * inv_freq`` in
  fp32, ``cos/sin`` cast to the model dtype, then ``q*cos + rotate_half(q)*sin`` in that dtype.
* megatron unfused (``_apply_rotary_pos_emb_bshd``): same application math; its own ``inv_freq``
  (llama3 scaling with fixed low/high/original = 1/4/8192) and ``torch.outer`` angles.
* fused (TE ``fused_apply_rotary_pos_emb``): sin/cos and the rotation in fp32 on upcast inputs,
  **one rounding** at the end.

MCore applies RoPE through the module-global ``apply_rotary_pos_emb`` of
``megatron.core.transformer.attention`` (looked up at call time); HF through the module-global
``apply_rotary_pos_emb`` of its modeling module.  Both are patched only inside the contexts below.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from .base import VariantContext, patched

_MCORE_ATTENTION = "megatron.core.transformer.attention"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@contextmanager
def mcore_hf_rope(models: list[torch.nn.Module], ctx: VariantContext) -> Iterator[None]:
    """MCore attention gets HF's RoPE: HF's ``inv_freq`` and cos/sin formula, and the HF family's
    own ``apply_rotary_pos_emb`` function."""
    if ctx.hf_rope is None:
        raise RuntimeError("rope/hf needs HF's rotary parameters in the variant context")
    inv_freq, scaling = ctx.hf_rope.inv_freq.float(), float(ctx.hf_rope.attention_scaling)
    hf_apply = ctx.hf_symbol("apply_rotary_pos_emb")
    attention = importlib.import_module(_MCORE_ATTENTION)

    def rotary_forward(max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group: Any = None) -> torch.Tensor:
        positions = torch.arange(offset, offset + max_seq_len, dtype=torch.int64)
        freqs = positions[:, None].float() * inv_freq.to(positions.device)[None, :]  # HF: position_ids[..., None] * inv_freq
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]

    def apply(t: torch.Tensor, freqs: torch.Tensor, config: Any = None, cu_seqlens: Any = None,
              mscale: float = 1.0, cp_group: Any = None) -> torch.Tensor:
        if cu_seqlens is not None or mscale != 1.0:
            raise NotImplementedError("rope/hf supports the plain bshd layout without YaRN mscale")
        freqs = freqs.to(t.device)
        cos = (freqs.cos() * scaling).to(t.dtype)[:, 0]  # [s, 1, d]: unsqueeze(1) in HF's apply -> [s, 1, 1, d]
        sin = (freqs.sin() * scaling).to(t.dtype)[:, 0]
        out, _ = hf_apply(t, t, cos, sin, unsqueeze_dim=1)
        return out

    with ExitStack() as stack:
        for m in models:
            if getattr(m, "rotary_pos_emb", None) is not None:
                stack.enter_context(patched(m.rotary_pos_emb, "forward", rotary_forward))
        stack.enter_context(patched(attention, "apply_rotary_pos_emb", apply))
        yield


def fused_rope_emulated(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Fused-kernel rounding order in plain torch: upcast, rotate in fp32, round once."""
    rot = freqs.shape[-1]
    tf = t[..., :rot].float()
    freqs = freqs.to(device=t.device, dtype=torch.float32)
    out = tf * freqs.cos() + _rotate_half(tf) * freqs.sin()
    return torch.cat((out.to(t.dtype), t[..., rot:]), dim=-1)


@contextmanager
def mcore_fused_rope(models: list[torch.nn.Module], ctx: VariantContext) -> Iterator[None]:
    """MCore with fused RoPE: megatron's own ``apply_rope_fusion`` (TE kernel) when TE and CUDA are
    present, else :func:`fused_rope_emulated` (labelled *emulated*)."""
    with ExitStack() as stack:
        if ctx.te:
            for m in models:
                stack.enter_context(patched(m.config, "apply_rope_fusion", True))
        else:
            attention = importlib.import_module(_MCORE_ATTENTION)

            def apply(t: torch.Tensor, freqs: torch.Tensor, config: Any = None, cu_seqlens: Any = None,
                      mscale: float = 1.0, cp_group: Any = None) -> torch.Tensor:
                if cu_seqlens is not None or mscale != 1.0:
                    raise NotImplementedError("emulated fused RoPE supports bshd without mscale")
                return fused_rope_emulated(t, freqs)

            stack.enter_context(patched(attention, "apply_rotary_pos_emb", apply))
        yield


@contextmanager
def hf_mcore_rope(model: torch.nn.Module, ctx: VariantContext) -> Iterator[None]:
    """HF gets megatron's RoPE: a real megatron ``RotaryEmbedding`` built from the checkpoint's
    Megatron args (its ``inv_freq`` and llama3-scaling code, its ``get_emb``) and megatron's
    unfused ``_apply_rotary_pos_emb_bshd``.  HF's rotary module returns megatron's angles in place
    of ``(cos, sin)``; the patched HF ``apply_rotary_pos_emb`` hands them to megatron's function."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    a = ctx.mcore_args
    if a.get("position_embedding_type", "rope") != "rope":
        raise NotImplementedError(f"rope/mcore_unfused supports plain rope, not {a.get('position_embedding_type')!r}")
    kv = a.get("kv_channels") or a["hidden_size"] // a["num_attention_heads"]
    mrope = RotaryEmbedding(kv_channels=int(kv), rotary_percent=float(a.get("rotary_percent", 1.0)),
                            rotary_base=int(a.get("rotary_base", 10000)), rope_scaling=bool(a.get("use_rope_scaling", False)),
                            rope_scaling_factor=float(a.get("rope_scaling_factor", 8.0)),
                            seq_len_interpolation_factor=a.get("rotary_seq_len_interpolation_factor"),
                            use_cpu_initialization=True)
    modeling = importlib.import_module(ctx.hf_modeling)
    rotary = model.model.rotary_emb

    def rotary_forward(x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, None]:
        emb = mrope.get_emb(int(position_ids.max()) + 1)[:, 0, 0, :]  # megatron's angles for 0..max, fp32
        return emb.to(x.device)[position_ids.to(emb.device)], None  # "cos" slot carries the angles: [b, s, d]

    def apply(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: Any, unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = cos.unsqueeze(unsqueeze_dim)  # [b, 1, s, d], broadcasts over [b, h, s, d]
        return _apply_rotary_pos_emb_bshd(q, freqs), _apply_rotary_pos_emb_bshd(k, freqs)

    with ExitStack() as stack:
        stack.enter_context(patched(rotary, "forward", rotary_forward))
        stack.enter_context(patched(modeling, "apply_rotary_pos_emb", apply))
        yield
