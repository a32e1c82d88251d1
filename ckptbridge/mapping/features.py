"""Megatron-LM's model-feature arguments, with the value each has when the feature is off.

A checkpoint trained by Megatron-LM carries every argument of its parser. Reading one without
an HF config, ckptbridge must know the model is one a mapping describes: a feature that no
mapping's ``config`` section sets (a zero-centred norm, interleaved rotary, a sliding window...)
must be off, else the export would silently compute something else. Mapping ``detect``
expressions may read these names too; a checkpoint whose args lack one (ckptbridge's own, or an
older Megatron-LM) is read as having the feature off.

Values are Megatron-LM 0.16's parser defaults (``megatron/training/arguments.py``).
"""

from __future__ import annotations

from typing import Any

#: what separates the families (``detect`` reads these)
FAMILY_FEATURES: dict[str, Any] = {
    "num_moe_experts": None,
    "multi_latent_attention": False,
    "qk_layernorm": False,
    "add_qkv_bias": False,
    "add_bias_linear": True,
    "moe_shared_expert_intermediate_size": None,
    "moe_shared_expert_gate": False,
    "moe_layer_freq": 1,
    "mtp_num_layers": None,
    "q_lora_rank": None,
}

#: features no mapping expresses yet: unless a mapping's config sets one, it must be off
MUST_BE_OFF: dict[str, Any] = {
    "layernorm_zero_centered_gamma": False,
    "apply_layernorm_1p": False,
    "apply_residual_connection_post_layernorm": False,
    "rotary_interleaved": False,
    "rotary_seq_len_interpolation_factor": None,
    "no_rope_freq": None,
    "mrope_section": None,
    "window_size": None,
    "window_attn_skip_freq": None,
    "squared_relu": False,
    "openai_gelu": False,
    "quick_geglu": False,
    "glu_linear_offset": 0.0,
    "activation_func_clamp_value": None,
    "qk_l2_norm": False,
    "attention_output_gate": False,
    "softmax_type": "vanilla",
    "experimental_attention_variant": None,
    "linear_attention_freq": None,
    "heterogeneous_layers_config_path": None,
    "heterogeneous_layers_config_encoded_json": None,
    "moe_latent_size": None,
    "apply_query_key_layer_scaling": False,
}

FEATURES_OFF: dict[str, Any] = {**FAMILY_FEATURES, **MUST_BE_OFF}


def with_features(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` with every feature argument present (absent ones read as off)."""
    return {**FEATURES_OFF, **args}
