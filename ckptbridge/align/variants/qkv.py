"""QKV projection: one fused GEMM (megatron ``linear_qkv``, rows interleaved per query group:
``[q(group 0) k0 v0 | q(group 1) k1 v1 | ...]``) versus three GEMMs (HF ``q_proj``/``k_proj``/
``v_proj``).  The values are the same; the GEMM shape, hence the kernel and its summation order,
is not."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from .base import VariantContext, patched


def _split_rows(w: torch.Tensor, groups: int, q_per_group: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """De-interleave megatron's fused QKV rows into contiguous q, k, v blocks (HF order)."""
    g = w.reshape(groups, (q_per_group + 2) * head_dim, *w.shape[1:])
    q = g[:, : q_per_group * head_dim].reshape(-1, *w.shape[1:])
    k = g[:, q_per_group * head_dim: (q_per_group + 1) * head_dim].reshape(-1, *w.shape[1:])
    v = g[:, (q_per_group + 1) * head_dim:].reshape(-1, *w.shape[1:])
    return q.contiguous(), k.contiguous(), v.contiguous()


@contextmanager
def mcore_separate(models: list[torch.nn.Module], ctx: VariantContext) -> Iterator[None]:
    """MCore's ``linear_qkv`` computes q, k and v with three GEMMs (HF's shapes) and re-interleaves
    the outputs into megatron's layout."""
    attns = [m for r in models for m in r.modules() if hasattr(m, "linear_qkv") and hasattr(m, "num_query_groups_per_partition")]
    if not attns:
        raise RuntimeError("no megatron attention with linear_qkv found")
    with ExitStack() as stack:
        for attn in attns:
            lin = attn.linear_qkv
            groups = attn.num_query_groups_per_partition
            qpg = attn.num_attention_heads_per_partition // groups
            hd = attn.hidden_size_per_attention_head

            def forward(x: torch.Tensor, *args: Any, lin: torch.nn.Module = lin, groups: int = groups, qpg: int = qpg,
                        hd: int = hd, **kwargs: Any) -> tuple[torch.Tensor, Any]:
                wq, wk, wv = _split_rows(lin.weight, groups, qpg, hd)
                bias = getattr(lin, "bias", None)
                add_bias = isinstance(bias, torch.Tensor) and bias.numel() > 0 and not lin.skip_bias_add
                bq, bk, bv = _split_rows(bias, groups, qpg, hd) if add_bias else (None, None, None)
                q, k, v = F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)
                lead = x.shape[:-1]
                mixed = torch.cat([q.reshape(*lead, groups, qpg * hd), k.reshape(*lead, groups, hd),
                                   v.reshape(*lead, groups, hd)], dim=-1).reshape(*lead, -1)
                return mixed, (bias if isinstance(bias, torch.Tensor) and lin.skip_bias_add else None)

            stack.enter_context(patched(lin, "forward", forward))
        yield


@contextmanager
def hf_fused(model: torch.nn.Module, ctx: VariantContext) -> Iterator[None]:
    """HF computes q, k and v with one GEMM over megatron's interleaved fused weight (the same
    matrix megatron multiplies); ``q_proj`` runs it, ``k_proj``/``v_proj`` return its slices."""
    attns = [m for m in model.modules() if all(hasattr(m, n) for n in ("q_proj", "k_proj", "v_proj"))]
    if not attns:
        raise RuntimeError("no HF attention with q_proj/k_proj/v_proj found")
    with ExitStack() as stack:
        for attn in attns:
            cfg = model.config
            hd = attn.head_dim
            groups = cfg.num_key_value_heads
            qpg = cfg.num_attention_heads // groups
            cache: dict[str, Any] = {}

            def fused(x: torch.Tensor, attn: torch.nn.Module = attn, groups: int = groups, qpg: int = qpg, hd: int = hd,
                      cache: dict[str, Any] = cache) -> tuple[torch.Tensor, ...]:
                if cache.get("x") is not x:
                    parts = [(p.weight.reshape(groups, -1, p.weight.shape[-1]), p.bias) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
                    w = torch.cat([w for w, _ in parts], dim=1).reshape(-1, parts[0][0].shape[-1])
                    b = None
                    if parts[0][1] is not None:
                        b = torch.cat([bb.reshape(groups, -1) for _, bb in parts], dim=1).reshape(-1)
                    y = F.linear(x, w, b).reshape(*x.shape[:-1], groups, (qpg + 2) * hd)
                    cache["x"] = x
                    cache["qkv"] = (y[..., : qpg * hd].reshape(*x.shape[:-1], -1),
                                    y[..., qpg * hd: (qpg + 1) * hd].reshape(*x.shape[:-1], -1),
                                    y[..., (qpg + 1) * hd:].reshape(*x.shape[:-1], -1))
                return cache["qkv"]

            for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                def forward(x: torch.Tensor, i: int = i, fused: Any = fused) -> torch.Tensor:
                    return fused(x)[i]

                stack.enter_context(patched(getattr(attn, name), "forward", forward))
        yield
