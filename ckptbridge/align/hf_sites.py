"""Where each HF decoder layer's attention block lives, read from the family's mapping file.

MCore calls every layer's token mixer ``self_attention``; HF names it per model and, in a hybrid, per
layer (Qwen3-Next: ``self_attn`` on the full-attention layers, ``linear_attn`` on the gated delta-net
ones). The block to record as a layer's ``attn_out`` is therefore found as data, as the router is
(:mod:`.routing`): the child of the HF layer that holds the HF tensors the mapping maps to
``decoder.layers.{L}.self_attention.*``. The input norm a TE linear fuses (``*.layer_norm_weight``,
megatron's name for it) is not the attention's own and is left out; of the children the mapping names,
the one this layer has and that holds most of those tensors is the block (a layer holds one).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from ckptbridge.errors import CkptBridgeError

#: MCore's token mixer of every decoder layer, as the mapping names its tensors
MCORE_ATTENTION = "decoder.layers.{L}.self_attention."
_FUSED_NORM = (".layer_norm_weight", ".layer_norm_bias")  # the input norm inside a TE linear


def model_architecture(model: torch.nn.Module) -> str:
    """The HF architecture a loaded model's mapping is found by: its config's first, else its class name."""
    return (getattr(model.config, "architectures", None) or [type(model).__name__])[0]


def hf_attention_modules(model: torch.nn.Module, layers: Sequence[torch.nn.Module]) -> list[torch.nn.Module]:
    """Each HF layer's attention block (the module MCore's ``self_attention`` stands for)."""
    from ckptbridge.mapping.registry import default_registry

    arch = model_architecture(model)
    rules = [r for r in default_registry().for_architecture(arch).tensors
             if r.mcore.startswith(MCORE_ATTENTION) and not r.mcore.endswith(_FUSED_NORM)]
    # the child is read after the layer index, not from the whole name: a VLM's checkpoint names (Qwen2.5-VL's
    # model.layers.{L}.*) need not be where transformers puts the decoder (model.language_model.layers)
    votes = Counter(name.split("{L}.", 1)[1].split(".")[0] for r in rules for name in r.hf if "{L}." in name)
    out = []
    for i, layer in enumerate(layers):
        found = [child for child, _ in votes.most_common() if isinstance(getattr(layer, child, None), torch.nn.Module)]
        if not found:
            raise CkptBridgeError(f"{arch}: HF layer {i} ({type(layer).__name__}) has none of the modules the mapping "
                                  f"maps to {MCORE_ATTENTION}* ({', '.join(sorted(votes)) or 'no rule'})")
        out.append(getattr(layer, found[0]))
    return out
