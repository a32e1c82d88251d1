"""Megatron-LM ``args`` -> megatron-core ``TransformerConfig`` and ``GPTModel`` arguments.

Follows Megatron-LM's ``core_transformer_config_from_args``: every config field is read from the
argument of the same name, a few from renamed or derived arguments (the tables of
:mod:`ckptbridge.megatron_settings`), so any model setting a mapping declares (a sliding window and
its layer pattern, a softmax scale, a zero-centred norm...) reaches megatron. What differs is only
what makes this a *checking* model: the compute dtype is the caller's, dropout is 0, weights are
initialised on CPU when CUDA is absent, and the run settings in
:data:`~ckptbridge.megatron_settings.CHECKING_FIELDS` (fusions, FP8, sequence parallelism...) keep
megatron-core's defaults, which are their off values.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ckptbridge.mcore.compat import apply_cpu_patches
from ckptbridge.megatron_args import from_megatron_lm, to_megatron_lm
from ckptbridge.megatron_settings import CHECKING_FIELDS, CONFIG_ATTRIBUTES, MODEL_ARGS, RENAMED_FIELDS, config_fields

apply_cpu_patches()

from megatron.core.transformer import TransformerConfig  # noqa: E402
from megatron.core.transformer.transformer_config import MLATransformerConfig  # noqa: E402


def _on_cpu() -> bool:
    return not torch.cuda.is_available()


def te_usable() -> bool:
    """TransformerEngine modules need both the package and a CUDA device."""
    if _on_cpu():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def megatron_lm_view(args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """``args`` under Megatron-LM's names, whichever names they were written with."""
    raw = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    return to_megatron_lm(from_megatron_lm(raw))


def _activation(lm: Mapping[str, Any]) -> Any:
    if lm.get("swiglu"):
        return F.silu
    if lm.get("squared_relu"):
        from megatron.core.activations import squared_relu

        return squared_relu
    if lm.get("quick_geglu"):  # Megatron-LM: gated, x * sigmoid(1.702 x) (gpt-oss)
        from megatron.core.fusions.fused_bias_geglu import quick_gelu  # the one mlp.py compares with

        return quick_gelu
    return F.gelu


def transformer_config_kwargs(args: argparse.Namespace | Mapping[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The ``TransformerConfig`` keyword arguments Megatron-LM would derive from ``args``, with the
    checking model's fixed values (see the module docstring)."""
    lm = megatron_lm_view(args)
    mla = bool(lm.get("multi_latent_attention"))
    kw: dict[str, Any] = {f: lm[f] for f in config_fields(mla) if f in lm and f not in CHECKING_FIELDS}
    for field, (arg, negated) in RENAMED_FIELDS.items():
        if arg in lm and field not in CHECKING_FIELDS:
            kw[field] = (not lm[arg]) if negated else lm[arg]
    kw["gated_linear_unit"] = bool(lm.get("swiglu") or lm.get("quick_geglu"))
    kw["activation_func"] = _activation(lm)
    kw["num_query_groups"] = lm.get("num_query_groups") if lm.get("group_query_attention") else None
    if int(lm.get("pipeline_model_parallel_size") or 1) == 1:  # Megatron-LM accepts these only with PP
        kw.pop("num_layers_in_first_pipeline_stage", None)
        kw.pop("num_layers_in_last_pipeline_stage", None)
    if kw.get("window_size") is not None:
        kw["window_size"] = tuple(kw["window_size"])
    if not kw.get("num_moe_experts"):
        kw["num_moe_experts"] = None
    else:
        kw["num_moe_experts"] = int(kw["num_moe_experts"])
        kw["expert_model_parallel_size"] = int(lm.get("expert_model_parallel_size") or 1)
        kw.setdefault("moe_token_dispatcher_type", "allgather")
        if not te_usable():  # SequentialMLP: its sharded state dict is TEGroupedMLP's (moe/experts.py:773)
            kw["moe_grouped_gemm"] = False
    freq = kw.get("moe_layer_freq")
    if isinstance(freq, (list, tuple)):
        kw["moe_layer_freq"] = 1 if all(f == 1 for f in freq) else list(freq)
    if not kw.get("mtp_num_layers"):
        kw.pop("mtp_num_layers", None)
    if mla:
        kw["q_lora_rank"] = lm.get("q_lora_rank")  # None (no q-LoRA) is meaningful; the class default is 512
        kw["rope_type"] = lm.get("rope_type") or "yarn"
        kw["multi_latent_attention"] = True
    kw.update(params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
              hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=_on_cpu(), sequence_parallel=False)
    return kw


def transformer_config_from_args(
    args: argparse.Namespace, dtype: torch.dtype = torch.float32, **overrides: Any
) -> TransformerConfig:
    """The ``TransformerConfig`` (``MLATransformerConfig`` with ``multi_latent_attention``) of ``args``:
    :func:`transformer_config_kwargs`, then ``overrides`` (any config field).

    Consequences worth knowing: MoE routers use ``args``' own settings (``moe_router_dtype`` None:
    router math in the model dtype; pass ``moe_router_dtype="fp32"`` for HF's fp32 routing in bf16);
    the dispatcher is ``args.moe_token_dispatcher_type`` (``alltoall`` runs with compat patch P6);
    ``moe_layer_freq`` lists (first-k-dense) make :func:`ckptbridge.mcore.model.build_gpt_model`
    build a per-layer block spec; the local MLA attention needs ``kv_channels == v_head_dim``.
    """
    kw = transformer_config_kwargs(args, dtype)
    kw.update(overrides)
    cls = MLATransformerConfig if kw.get("multi_latent_attention") else TransformerConfig
    config = cls(**kw)
    lm = megatron_lm_view(args)
    for name in CONFIG_ATTRIBUTES:  # read by megatron-core with getattr only where set (YaRN on GPTModel)
        if lm.get(name) is not None:
            setattr(config, name, lm[name])
    return config


def gpt_model_kwargs(args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """The ``GPTModel`` constructor arguments Megatron-LM's model provider takes from ``args``
    (:data:`~ckptbridge.megatron_settings.MODEL_ARGS`)."""
    lm = megatron_lm_view(args)
    defaults = {"position_embedding_type": "learned_absolute", "rotary_percent": 1.0, "rotary_base": 10000,
                "use_rope_scaling": False, "rope_scaling_factor": 8.0, "rotary_seq_len_interpolation_factor": None,
                "untie_embeddings_and_output_weights": False}
    kw = {MODEL_ARGS[k]: lm[k] if lm.get(k) is not None else v for k, v in defaults.items()}
    kw["share_embeddings_and_output_weights"] = not kw["share_embeddings_and_output_weights"]
    kw["rotary_percent"], kw["rotary_base"] = float(kw["rotary_percent"]), int(kw["rotary_base"])
    kw["rope_scaling"], kw["rope_scaling_factor"] = bool(kw["rope_scaling"]), float(kw["rope_scaling_factor"])
    kw["vocab_size"] = int(lm["padded_vocab_size"])
    kw["max_sequence_length"] = int(lm["max_position_embeddings"])
    return kw


#: attribute of a built GPTModel holding the args it was built from (the forward reads the vocab from it)
ARGS_ATTR = "_ckptbridge_args"
