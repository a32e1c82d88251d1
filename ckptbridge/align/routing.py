"""MoE routing agreement: what each MoE layer's router chose, HF vs MCore, per token.

Layer metrics average over tokens; a router whose top-k choice flips for a handful of tokens moves
exactly those tokens' hidden states far (they go through other experts), while the layer's
relative error barely moves.  So every pass also records, per MoE layer:

* the router logits ``[tokens, experts]`` (MCore: the ``TopKRouter.gating`` result, recorded by
  wrapping that method on the instance),
* the chosen experts ``[tokens, k]`` and their combine weights, ordered by weight (MCore: the
  router's ``(probs, routing_map)``).

The HF router is found as data, not per model: it is the module holding the HF tensor that the
family's mapping file maps to MCore's ``decoder.layers.{L}.mlp.router.weight`` (``mlp.gate`` for
Mixtral/Qwen/DeepSeek/GLM, ``mlp.router`` for gpt-oss, ``feed_forward.router`` for Llama 4); what
its forward returns comes from its form (bare logits, or transformers 5's ``(logits, top-k weights,
top-k indices)``) or, for the other forms, from :data:`ROUTER_OUTPUTS`, keyed by the router's class.
An MCore MoE layer whose HF router was not recorded gets a row that says so (``hf_router``), never
silence.

Tokens are put in HF's ``[batch, seq]`` order on both sides (MCore flattens ``[seq, batch]``).
:func:`compare_routing` turns a pair of captures into one row per MoE layer: logit error, top-k
*set* agreement (share of tokens whose chosen experts are identical), rank flips (same set,
different order by weight), and the expert load histogram of each side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ckptbridge.errors import CkptBridgeError
from ckptbridge.mapping.schema import TensorRule

from .hf_sites import model_architecture

LOGITS, TOPK, WEIGHTS = "router_logits", "router_topk", "router_weights"
#: the MCore router weight of every MoE layer; the mapping rule that fills it names the HF router module
MCORE_ROUTER = "decoder.layers.{L}.mlp.router.weight"
#: What an HF router's forward returns, by class, where it is neither bare logits nor transformers 5's
#: ``(logits, top-k weights, top-k indices)`` (every ``*TopKRouter``: Mixtral, Qwen-MoE, DeepSeek, GLM, gpt-oss).
#: ``scores``: ``[tokens, experts]`` combine weights, exactly 0 off the chosen experts.
ROUTER_OUTPUTS: dict[str, tuple[str, ...]] = {
    "Llama4Router": ("scores", "logits"),  # sigmoid of the top-k logits scattered over -inf: sigmoid(-inf) = 0
}
_DEFAULT_OUTPUTS = {1: ("logits",), 3: ("logits", "weights", "indices")}
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


def hf_router_rule(arch: str) -> TensorRule | None:
    """The rule for :data:`MCORE_ROUTER` in the mapping of HF architecture ``arch``, or None."""
    from ckptbridge.mapping.registry import default_registry

    return next((r for r in default_registry().for_architecture(arch).tensors if r.mcore == MCORE_ROUTER), None)


def hf_router_path(rule: TensorRule | None, layer: int | str = "{L}") -> str | None:
    """``model.layers.3.mlp.gate``: the module holding the HF router weight of ``layer``."""
    if rule is None:
        return None
    name = rule.hf[0].replace("{L}", str(layer))
    return name[: -len(".weight")] if name.endswith(".weight") else name


def hf_router_where(arch: str) -> str:
    """Where the HF router is looked for, in words (reported when some MoE layer has none)."""
    path = hf_router_path(hf_router_rule(arch))
    if path is None:
        return f"the {arch} mapping has no rule for {MCORE_ROUTER}, so no HF router module is known"
    return f"the HF router is the module {path} (the mapping's rule for {MCORE_ROUTER})"


def unmeasured_layers(rows: Sequence[dict[str, Any]]) -> list[int]:
    """MoE layers (baseline passes) where MCore has a router and HF recorded none."""
    return sorted({int(r["layer"]) for r in rows if r.get("setting") == "baseline" and r.get("hf_router") == "not recorded"})


def router_outputs(router: torch.nn.Module, out: Any) -> dict[str, torch.Tensor]:
    """Name the parts of a router's output (:data:`ROUTER_OUTPUTS`, else by its form)."""
    parts = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    names = ROUTER_OUTPUTS.get(type(router).__name__) or _DEFAULT_OUTPUTS.get(len(parts))
    if names is None or len(names) != len(parts):
        raise CkptBridgeError(f"HF router {type(router).__name__} returns {len(parts)} values; add what they are to "
                              "ckptbridge.align.routing.ROUTER_OUTPUTS")
    return dict(zip(names, parts))


def hook_hf(recorder: Any, model: torch.nn.Module, layers: Sequence[torch.nn.Module]) -> None:
    """Record the router of every HF MoE layer (the module :func:`hf_router_path` names; a layer
    without one is dense, or its router is not where the mapping says: the MCore side then shows it)."""
    rule = hf_router_rule(model_architecture(model))
    if rule is None:  # a dense family
        return
    modules = dict(model.named_modules())
    for i in range(len(layers)):
        router = modules.get(hf_router_path(rule, i))  # type: ignore[arg-type]
        if router is None:  # a dense layer, or a router that is not where the mapping says
            continue

        def hook(m: torch.nn.Module, _args: Any, out: Any, i: int = i) -> None:
            named = router_outputs(m, out)
            logits = named["logits"].detach().float()
            logits = logits.reshape(-1, logits.shape[-1]).cpu()
            recorder.tensors[point(i, LOGITS)] = logits
            if "indices" in named:
                idx = named["indices"].detach().reshape(logits.shape[0], -1).cpu()
                w = named["weights"].detach().float().reshape(idx.shape).cpu()
            elif "scores" in named:
                scores = named["scores"].detach().float().reshape(logits.shape).cpu()
                idx = scores.ne(0).nonzero()[:, 1].reshape(logits.shape[0], -1)
                w = scores.gather(-1, idx)
            else:
                return
            recorder.tensors[point(i, TOPK)], recorder.tensors[point(i, WEIGHTS)] = _by_weight(idx, w)

        recorder.handles.append(router.register_forward_hook(hook))


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
    """One row per MoE layer present on both sides (``base`` fields + routing metrics), and one per MCore MoE
    layer whose HF router was not recorded (``hf_router: "not recorded"``, no metrics)."""
    rows: list[dict[str, Any]] = []
    for layer in sorted(set(moe_layers(mc)) - set(moe_layers(hf))):  # an MCore router with no HF router recorded
        rows.append({**base, "layer": layer, "experts": int(mc[point(layer, LOGITS)].shape[1]),
                     "hf_router": "not recorded"})
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
