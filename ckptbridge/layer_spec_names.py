"""The one table of names that differ between megatron-core's TransformerEngine spec and its local spec.

The TE spec fuses a layer's pre-norms into the linear that follows them
(``TELayerNormColumnParallelLinear``: ``<linear>.layer_norm_weight``); the local spec keeps each norm as a
module of its own. Nothing else is named differently (TEGroupedMLP's experts aside: see ``grouped``
in the mapping schema). TE -> local is unambiguous, so mapping files name TE tensors only and the local
name follows from this table; local -> TE depends on the layer (a MoE layer's TE spec keeps its
``pre_mlp_layernorm`` module; only multi-latent attention fuses its q/kv norms), hence the per-layer-kind
maps megatron's ``sharded_state_dict_keys_map`` takes.
"""

from __future__ import annotations

#: TE spec infix -> local spec infix (gpt_layer_specs.py, megatron-core 0.16.1)
FUSED_NORMS: dict[str, str] = {
    "self_attention.linear_qkv.layer_norm_": "input_layernorm.",
    "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm.",
    "self_attention.linear_q_up_proj.layer_norm_": "self_attention.q_layernorm.",  # multi-latent attention
    "self_attention.linear_kv_up_proj.layer_norm_": "self_attention.kv_layernorm.",  # multi-latent attention
    "self_attention.in_proj.layer_norm_": "input_layernorm.",  # gated delta-net (Qwen3-Next)
}
#: local -> TE; where two TE names share a local one (the input norm) the first, attention's, answers
_LOCAL = {local: te for te, local in reversed(FUSED_NORMS.items())}

#: local prefix -> TE prefix (``sharded_state_dict_keys_map``) of a dense layer (the local spec's own map)
LOCAL_TO_TE_LAYER_KEYS: dict[str, str] = {k: _LOCAL[k] for k in ("input_layernorm.", "pre_mlp_layernorm.")}
#: ... of a MoE layer: the TE MoE spec keeps ``pre_mlp_layernorm`` as a module
LOCAL_TO_TE_MOE_LAYER_KEYS: dict[str, str] = {k: _LOCAL[k] for k in ("input_layernorm.",)}
#: ... the norms of multi-latent attention with q/k norms (its input norm stays a module in both specs)
LOCAL_TO_TE_MLA_KEYS: dict[str, str] = {k: _LOCAL[k] for k in ("self_attention.q_layernorm.", "self_attention.kv_layernorm.")}
#: ... of a gated delta-net layer: its input norm is fused into ``in_proj`` (experimental_attention_variant_module_specs.py:56-73)
LOCAL_TO_TE_GDN_KEYS: dict[str, str] = {"input_layernorm.": "self_attention.in_proj.layer_norm_"}


def te_to_local(name: str) -> str:
    """A TE-spec tensor or module name under the local spec."""
    for te, local in FUSED_NORMS.items():
        if "." + te in name:
            return name.replace("." + te, "." + local, 1)
    return name
