"""Forward hooks that record activations of an HF model and of megatron-core ``GPTModel`` chunks.

Hooks only -- neither library is edited.  Both recorders store CPU copies laid out
``[batch, seq, ...]`` under the names of :mod:`.points`.  The MCore recorder can also

* *inject* HF's hidden state at the input of each decoder layer and of the final norm
  (isolated mode: every layer of both models sees the same input, so each layer's own error
  shows instead of the error accumulated below it), and
* give RoPE explicit position ids (the long-position probe).  ``GPTModel``'s ``position_ids``
  never reach RoPE (its rotary embedding always covers ``0..s-1``), so a forward hook replaces the
  rotary output by rows of megatron's own ``RotaryEmbedding.forward(max(position)+1)``.  Multi-latent
  attention (DeepSeek) has no model-level rotary embedding: each ``MLASelfAttention`` owns one
  (``YarnRotaryEmbedding``, returning ``(angles, mscale)``), so every layer's is hooked.  Hooking
  only the model-level one left MLA at ``0..s-1`` while HF ran at the probe positions, which is
  what made DeepSeek-V3 "fail" the probe by ~0.9 in fp32 (ckptbridge issue 11).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import points as P
from . import routing
from .hf_sites import hf_attention_modules


def _first(out: Any) -> torch.Tensor:
    """Modules return a tensor, or a tuple whose first item is the activation (MCore's (out, bias))."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _with_bias(out: Any) -> torch.Tensor:
    """An MCore block's ``(out, bias)`` as HF's output: the bias megatron adds later (in bias-dropout-add)
    added here (gpt-oss's o_proj bias), so the block outputs compare like for like."""
    if isinstance(out, (tuple, list)) and len(out) > 1 and isinstance(out[1], torch.Tensor):
        return out[0] + out[1]
    return _first(out)


def _keep(t: torch.Tensor, seq_first: bool = False) -> torch.Tensor:
    t = t.detach()
    if seq_first:
        t = t.transpose(0, 1)
    return t.to("cpu", copy=True).contiguous()


class _Hooks:
    """Owns hook handles; removes them all on exit, even when the forward raised."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.tensors: dict[str, torch.Tensor] = {}

    def __enter__(self) -> "_Hooks":
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _record(self, module: torch.nn.Module, name: str, seq_first: bool = False, bias: bool = False,
                like_input: bool = False) -> None:
        def hook(_m: torch.nn.Module, args: Any, out: Any) -> None:
            t = _with_bias(out) if bias else _first(out)
            x = args[0] if like_input and args and isinstance(args[0], torch.Tensor) else None
            if x is not None and t.shape != x.shape and t.numel() == x.numel():
                t = t.reshape(x.shape)  # a block that flattens tokens (Llama 4's MoE returns [b*s, h])
            self.tensors[name] = _keep(t, seq_first)

        self.handles.append(module.register_forward_hook(hook))


def hf_mlp(layer: torch.nn.Module) -> torch.nn.Module:
    """An HF decoder layer's feed-forward block: ``mlp``, or Llama 4's ``feed_forward``."""
    block = getattr(layer, "mlp", None)
    return block if block is not None else layer.feed_forward


def hf_decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (``model.model``) of an HF ``*ForCausalLM``; of a VLM, its language model's
    (Qwen2.5-VL's ``model.model.language_model``, Llama 4's ``model.language_model.model``)."""
    inner = getattr(model, "model", None)
    if inner is None:
        inner = getattr(getattr(model, "language_model", None), "model", None)
    elif not hasattr(inner, "layers"):
        inner = getattr(inner, "language_model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise TypeError(f"{type(model).__name__} has no .model.layers; not a decoder-only HF model")
    return inner


class HFRecorder(_Hooks):
    """Records every point of an HF decoder-only model, plus each layer's and the final norm's
    input (what isolated mode feeds to MCore).  Logits are taken from the model output by the
    caller, so they are not hooked here."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        dec = hf_decoder(model)
        self._record(dec.embed_tokens, P.EMBEDDING)
        for i, (layer, attention) in enumerate(zip(dec.layers, hf_attention_modules(model, dec.layers))):
            self._record_input(layer, P.layer_input(i))
            self._record(layer.input_layernorm, P.layer_point(i, "attn_norm"))
            self._record(attention, P.layer_point(i, "attn_out"))  # self_attn, or linear_attn (from the mapping)
            self._record(layer.post_attention_layernorm, P.layer_point(i, "mlp_norm"))
            self._record(hf_mlp(layer), P.layer_point(i, "mlp_out"), like_input=True)
            self._record(layer, P.layer_point(i, "output"))
        self._record_input(dec.norm, P.FINAL_NORM_INPUT)
        self._record(dec.norm, P.FINAL_NORM)
        routing.hook_hf(self, model, dec.layers)

    def _record_input(self, module: torch.nn.Module, name: str) -> None:
        def pre(_m: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            self.tensors[name] = _keep(hidden)

        self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))


class MCoreRecorder(_Hooks):
    """Records every point of this rank's ``GPTModel`` chunks (global layer numbers), optionally
    injecting HF inputs (``inject``: ``layer{i}.input`` / ``final_norm.input`` -> ``[b, s, h]``)
    and giving RoPE the explicit ``positions`` (one per token; None = ``0..s-1``).

    Without sequence parallelism every hooked output is the full tensor on every TP rank (the
    row-parallel outputs are all-reduced inside the module), so rank 0's record is complete for
    PP=1; with PP each stage records its own layers.
    """

    def __init__(self, models: Sequence[torch.nn.Module], inject: dict[str, torch.Tensor] | None = None,
                 positions: Sequence[int] | None = None) -> None:
        super().__init__()
        self.inject = inject or {}
        self.injected: list[str] = []
        for m in models:
            if getattr(m, "pre_process", False):
                self._record(m.embedding, P.EMBEDDING, seq_first=True)
            if positions is not None and getattr(m, "rotary_pos_emb", None) is not None:
                self._rope_positions(m.rotary_pos_emb, list(positions))
            for layer in m.decoder.layers:
                i = int(layer.layer_number) - 1
                own_rope = getattr(layer.self_attention, "rotary_pos_emb", None)  # MLA
                if positions is not None and own_rope is not None:
                    self._rope_positions(own_rope, list(positions))
                self._inject(layer, P.layer_input(i), kw="hidden_states")
                self._record(layer.input_layernorm, P.layer_point(i, "attn_norm"), seq_first=True)
                self._record(layer.self_attention, P.layer_point(i, "attn_out"), seq_first=True, bias=True)
                self._record(layer.pre_mlp_layernorm, P.layer_point(i, "mlp_norm"), seq_first=True)
                self._record(layer.mlp, P.layer_point(i, "mlp_out"), seq_first=True, bias=True)
                self._record(layer, P.layer_point(i, "output"), seq_first=True)
            routing.hook_mcore(self, m.decoder.layers)
            final = getattr(m.decoder, "final_layernorm", None)
            if final is not None:
                self._inject(final, P.FINAL_NORM_INPUT, kw=None)
                self._record(final, P.FINAL_NORM, seq_first=True)

    def _inject(self, module: torch.nn.Module, name: str, kw: str | None) -> None:
        if name not in self.inject:
            return
        source = self.inject[name]

        def pre(_m: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
            current = args[0] if args else kwargs[kw]  # type: ignore[index]
            if tuple(current.shape) != (source.shape[1], source.shape[0], *source.shape[2:]):
                raise ValueError(f"cannot inject {name}: MCore has {tuple(current.shape)} [s, b, h], "
                                 f"HF gave {tuple(source.shape)} [b, s, h]")
            new = source.transpose(0, 1).to(device=current.device, dtype=current.dtype).contiguous()
            self.injected.append(name)
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, kw: new}

        self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))

    def _rope_positions(self, rope: torch.nn.Module, positions: list[int]) -> None:
        index = torch.tensor(positions, dtype=torch.long)
        if type(rope).__name__ == "MultimodalRotaryEmbedding":  # takes the [3, b, s] position ids: give these
            def pre(m: torch.nn.Module, args: Any, kwargs: Any) -> Any:
                ids = args[0]
                if ids.shape[-1] != len(positions):
                    raise ValueError(f"RoPE covers {ids.shape[-1]} tokens, {len(positions)} positions were given")
                return (index.to(ids.device).expand_as(ids), *args[1:]), kwargs

            self.handles.append(rope.register_forward_pre_hook(pre, with_kwargs=True))
            return

        def hook(m: torch.nn.Module, _args: Any, out: Any) -> Any:
            angles = _first(out)  # YarnRotaryEmbedding returns (angles, mscale): mscale is position-free
            if angles.shape[0] != len(positions):
                raise ValueError(f"RoPE covers {angles.shape[0]} tokens, {len(positions)} positions were given")
            full = m.forward(max(positions) + 1)  # megatron's own angles for 0..max (bypasses this hook)
            if isinstance(out, tuple):
                return (_first(full)[index.to(angles.device)], *out[1:])
            return full[index.to(full.device)]

        self.handles.append(rope.register_forward_hook(hook))
