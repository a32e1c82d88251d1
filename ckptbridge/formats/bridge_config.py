"""Megatron-Bridge's ``run_config.yaml``: its ``model:`` section read as Megatron args, and written beside
ckptbridge's torch_dist output so that Megatron-Bridge's ``export_ckpt`` can build the model.

Megatron-Bridge (0.3.1) keeps no ``args`` in ``common.pt``; the model is a *model provider* dataclass
(``GPTModelProvider`` / ``MLAModelProvider``: megatron-core ``TransformerConfig`` fields plus the
provider's own) dumped by its ``ConfigContainer.to_yaml`` with ``yaml.safe_dump``: functions and torch
dtypes as ``{_target_: "torch.nn.functional.silu", _call_: false}``, enums as ``{_target_, _call_: true,
_args_: [value]}``. This module knows that layout from Megatron-Bridge's source (``training/utils/
config_utils.py``, ``utils/yaml_utils.py``, ``models/gpt_provider.py``, ``models/mla_provider.py``);
Megatron-Bridge itself cannot be installed on a CPU-only machine (it needs CUDA builds of
TransformerEngine and others), so its real files were not read here: see docs/megatron-interop.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from ..errors import FormatError
from ..layout import padded_vocab_size

RUN_CONFIG = "run_config.yaml"
GPT_PROVIDER = "megatron.bridge.models.gpt_provider.GPTModelProvider"
MLA_PROVIDER = "megatron.bridge.models.mla_provider.MLAModelProvider"
SILU = "torch.nn.functional.silu"

#: ckptbridge's Megatron argument -> the provider field holding the same setting, where the names differ
_FIELDS = {"norm_epsilon": "layernorm_epsilon", "use_rope_scaling": "rope_scaling", "max_position_embeddings": "seq_length"}
#: the Megatron arguments written as provider fields (under `_FIELDS` names): megatron-core
#: ``TransformerConfig`` / ``MLATransformerConfig`` fields or ``GPTModelProvider``'s own; a provider
#: refuses any other keyword. Everything else a provider needs is derived below.
WRITTEN = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "norm_epsilon", "normalization", "add_bias_linear", "add_qkv_bias", "qk_layernorm", "position_embedding_type",
    "rotary_base", "rotary_percent", "use_rope_scaling", "rope_scaling_factor", "max_position_embeddings",
    "vocab_size", "make_vocab_size_divisible_by", "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size", "moe_shared_expert_gate", "moe_router_pre_softmax", "moe_aux_loss_coeff",
    "moe_grouped_gemm", "moe_token_dispatcher_type", "moe_layer_freq", "moe_router_score_function",
    "moe_router_enable_expert_bias", "moe_router_topk_scaling_factor", "moe_router_num_groups",
    "moe_router_group_topk", "moe_router_dtype", "multi_latent_attention", "q_lora_rank", "kv_lora_rank",
    "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "rope_type", "rotary_scaling_factor",
    "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "mtp_num_layers",
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
    "expert_model_parallel_size", "expert_tensor_parallel_size",
)


def _target(value: Any) -> str | None:
    return value.get("_target_") if isinstance(value, dict) else None


def args_from_run_config(path: Path) -> dict[str, Any]:
    """The ``model:`` section of a Megatron-Bridge ``run_config.yaml`` as Megatron args (ckptbridge's names)."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise FormatError(f"{path}: not valid YAML ({exc})") from None
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, dict) or not _target(model):
        raise FormatError(f"{path}: no model provider (a 'model:' section with a _target_)")
    fields = {k: v for k, v in model.items() if not k.startswith("_")}
    args: dict[str, Any] = {k: v for k, v in fields.items() if not isinstance(v, dict)}
    for ours, theirs in _FIELDS.items():
        if theirs in fields:
            args[ours] = args.pop(theirs)
    activation = _target(fields.get("activation_func"))
    if fields.get("gated_linear_unit") and activation != SILU:
        raise FormatError(f"{path}: gated activation {activation!r} is not SwiGLU (silu)")
    args["swiglu"] = bool(fields.get("gated_linear_unit")) and activation == SILU
    args["untie_embeddings_and_output_weights"] = not fields.get("share_embeddings_and_output_weights", True)
    heads, groups = fields.get("num_attention_heads"), fields.get("num_query_groups")
    args["group_query_attention"] = groups is not None and groups != heads
    dtype = _target(fields.get("params_dtype")) or "torch.float32"
    args["params_dtype"] = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(args["params_dtype"], torch.dtype):
        raise FormatError(f"{path}: params_dtype {dtype!r} is not a torch dtype")
    vocab, tp = fields.get("vocab_size"), int(fields.get("tensor_model_parallel_size") or 1)
    if vocab is None:
        raise FormatError(f"{path}: the model provider has no vocab_size")
    args["padded_vocab_size"] = (padded_vocab_size(int(vocab), int(fields.get("make_vocab_size_divisible_by") or 128), tp)
                                 if fields.get("should_pad_vocab") else int(vocab))
    args["transformer_impl"] = "transformer_engine"  # Megatron-Bridge trains with TE names
    return args


def run_config(margs: Mapping[str, Any]) -> dict[str, Any]:
    """A ``run_config.yaml`` (``model:`` section only: what ``export_ckpt`` reads) for these Megatron args."""
    mla = bool(margs.get("multi_latent_attention"))
    provider: dict[str, Any] = {"_target_": MLA_PROVIDER if mla else GPT_PROVIDER}
    for key in WRITTEN:
        if key in margs and (mla or key not in _MLA_ONLY):
            value = margs[key]
            provider[_FIELDS.get(key, key)] = list(value) if isinstance(value, tuple) else value
    provider.update(
        gated_linear_unit=bool(margs.get("swiglu")),
        activation_func={"_target_": SILU if margs.get("swiglu") else "torch.nn.functional.gelu", "_call_": False},
        share_embeddings_and_output_weights=not margs.get("untie_embeddings_and_output_weights", False),
        should_pad_vocab=int(margs["padded_vocab_size"]) != int(margs["vocab_size"]),
        params_dtype={"_target_": str(margs.get("params_dtype", torch.float32)), "_call_": False},
    )
    return {"model": provider}


#: MLATransformerConfig's own fields: a GPTModelProvider has none of them
_MLA_ONLY = {"q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "rope_type",
             "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"}


def run_config_text(margs: Mapping[str, Any]) -> str:
    return yaml.safe_dump(run_config(margs), sort_keys=False)
