"""MoE routing agreement: what each MoE layer's router chose, HF vs MCore, per token.

Layer metrics average over tokens; a router whose top-k choice flips for a handful of tokens moves
exactly those tokens' hidden states far (they go through other experts), while the layer's
relative error barely moves.  So every pass also records, per MoE layer:

* the router logits ``[tokens, experts]`` (HF: ``mlp.gate``'s first output; MCore: the
  ``TopKRouter.gating`` result, recorded by wrapping that method on the instance),
* the chosen experts ``[tokens, k]`` and their combine weights, ordered by weight (HF:
  ``mlp.gate``'s ``(logits, weights, indices)``; MCore: the router's ``(probs, routing_map)``).

Tokens are put in HF's ``[batch, seq]`` order on both sides (MCore flattens ``[seq, batch]``).
:func:`compare_routing` turns a pair of captures into one row per MoE layer: logit error, top-k
*set* agreement (share of tokens whose chosen experts are identical), rank flips (same set,
different order by weight), and the expert load histogram of each side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

LOGITS, TOPK, WEIGHTS = "router_logits", "router_topk", "router_weights"
#: Token positions whose expert set differs, listed per row (the rest are counted only).
MAX_LISTED = 8


def point(layer: int, kind: str) -> str:
    """``layer3.router_topk``: capture names (never compared as activations by ``compare_captures``)."""
    return f"layer{layer}.{kind}"


def _by_weight(indices: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen experts ordered by weight (descending), ties by expert id: a canonical order for both sides."""
    by_id = torch.argsort(indices, dim=-1)
    indices, weights = indices.gather(-1, by_id), weights.gather(-1, by_id)
    order = torch.argsort(weights, dim=-1, descending=True, stable=True)
    return indices.gather(-1, order), weights.gather(-1, order)


class _Restore:
    """A hook-handle look-alike that puts an instance attribute back (``_Hooks`` removes handles)."""

    def __init__(self, obj: Any, attr: str) -> None:
        self.obj, self.attr = obj, attr

    def remove(self) -> None:
        vars(self.obj).pop(self.attr, None)


def hook_hf(recorder: Any, layers: Sequence[torch.nn.Module]) -> None:
    """Record ``mlp.gate`` of every HF MoE layer (transformers 5 routers return
    ``(logits, top-k weights, top-k indices)``; a gate returning only logits records logits)."""
    for i, layer in enumerate(layers):
        gate = getattr(getattr(layer, "mlp", None), "gate", None)
        if gate is None or not hasattr(getattr(layer, "mlp", None), "experts"):
            continue

        def hook(_m: torch.nn.Module, _args: Any, out: Any, i: int = i) -> None:
            logits = out[0] if isinstance(out, (tuple, list)) else out
            recorder.tensors[point(i, LOGITS)] = logits.detach().float().reshape(-1, logits.shape[-1]).cpu()
            if isinstance(out, (tuple, list)) and len(out) == 3:
                idx, w = _by_weight(out[2].detach().reshape(logits.reshape(-1, logits.shape[-1]).shape[0], -1).cpu(),
                                    out[1].detach().float().reshape(-1, out[2].shape[-1]).cpu())
                recorder.tensors[point(i, TOPK)], recorder.tensors[point(i, WEIGHTS)] = idx, w

        recorder.handles.append(gate.register_forward_hook(hook))


def hook_mcore(recorder: Any, layers: Sequence[torch.nn.Module]) -> None:
    """Record every MCore ``TopKRouter``: its gating logits and its ``(probs, routing_map)``."""
    for layer in layers:
        router = getattr(getattr(layer, "mlp", None), "router", None)
        if router is None:
            continue
        i = int(layer.layer_number) - 1
        shape: dict[str, tuple[int, ...]] = {}
        gating = router.gating  # the bound method of the class

        def recorded_gating(x: torch.Tensor, *a: Any, i: int = i, gating: Any = gating,
                            shape: dict[str, tuple[int, ...]] = shape, **kw: Any) -> torch.Tensor:
            logits = gating(x, *a, **kw)
            shape["sb"] = tuple(x.shape[:2]) if x.dim() == 3 else (x.shape[0], 1)
            recorder.tensors[point(i, LOGITS)] = _hf_order(logits.detach().float(), shape["sb"])
            return logits

        def hook(_m: torch.nn.Module, _args: Any, out: Any, i: int = i, shape: dict[str, tuple[int, ...]] = shape) -> None:
            probs, routing_map = out[0].detach().float(), out[1].detach()
            sb = shape["sb"]
            probs, routing_map = _hf_order(probs, sb), _hf_order(routing_map, sb)
            idx = routing_map.nonzero()[:, 1].reshape(routing_map.shape[0], -1)  # the k chosen columns per token
            idx, w = _by_weight(idx, probs.gather(-1, idx))
            recorder.tensors[point(i, TOPK)], recorder.tensors[point(i, WEIGHTS)] = idx, w

        vars(router)["gating"] = recorded_gating
        recorder.handles.append(_Restore(router, "gating"))
        recorder.handles.append(router.register_forward_hook(hook))


def _hf_order(t: torch.Tensor, sb: tuple[int, ...]) -> torch.Tensor:
    """``[s, b, E]`` or ``[s*b, E]`` (MCore token order) -> ``[b*s, E]`` (HF's), on CPU."""
    s, b = sb
    return t.reshape(s, b, t.shape[-1]).transpose(0, 1).reshape(s * b, t.shape[-1]).cpu()


def moe_layers(caps: dict[str, torch.Tensor]) -> list[int]:
    return sorted(int(k.split(".")[0][5:]) for k in caps if k.endswith("." + LOGITS))


def compare_routing(hf: dict[str, torch.Tensor], mc: dict[str, torch.Tensor], base: dict[str, Any],
                    seq_len: int) -> list[dict[str, Any]]:
    """One row per MoE layer present on both sides (``base`` fields + routing metrics)."""
    rows = []
    for layer in moe_layers(hf):
        if point(layer, LOGITS) not in mc:
            continue
        a, b = hf[point(layer, LOGITS)], mc[point(layer, LOGITS)]
        diff = (a - b).abs()
        row: dict[str, Any] = {**base, "layer": layer, "tokens": int(a.shape[0]), "experts": int(a.shape[1]),
                               "router_logits_max_abs": float(diff.max()),
                               "router_logits_rel_err": float(torch.linalg.norm(a - b) / max(float(torch.linalg.norm(a)), 1e-30))}
        ti, tm = hf.get(point(layer, TOPK)), mc.get(point(layer, TOPK))
        if ti is not None and tm is not None and ti.shape == tm.shape:
            same_set = (ti.sort(-1).values == tm.sort(-1).values).all(-1)
            flips = same_set & ~(ti == tm).all(-1)
            bad = (~same_set).nonzero().flatten().tolist()
            load_h = torch.bincount(ti.flatten(), minlength=a.shape[1])
            load_m = torch.bincount(tm.flatten(), minlength=a.shape[1])
            row.update({"topk": int(ti.shape[1]), "topk_agreement": float(same_set.float().mean()),
                        "mismatched_tokens": len(bad), "rank_flips": int(flips.sum()),
                        "first_mismatches": "; ".join(_describe(t, ti, tm, seq_len) for t in bad[:MAX_LISTED]),
                        "load_max_diff": int((load_h - load_m).abs().max()),
                        "load_hf": " ".join(map(str, load_h.tolist())), "load_mcore": " ".join(map(str, load_m.tolist()))})
        rows.append(row)
    return rows


def _describe(t: int, hf_idx: torch.Tensor, mc_idx: torch.Tensor, seq_len: int) -> str:
    """``b0:t17 hf[1,5] mc[1,6]``: where a token's experts differ (batch, position in the sample)."""
    def ids(row: torch.Tensor) -> str:
        return ",".join(str(e) for e in row.tolist())

    return f"b{t // seq_len}:t{t % seq_len} hf[{ids(hf_idx[t])}] mc[{ids(mc_idx[t])}]"
