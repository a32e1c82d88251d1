"""The decoder block of a hybrid gated delta-net model (Qwen3-Next / Qwen3.5) from local modules.

megatron-core 0.16.1 builds such a model only from Transformer Engine modules:
``get_transformer_block_with_experimental_attention_variant_spec`` asserts
``transformer_impl == "transformer_engine"`` (models/gpt/experimental_attention_variant_module_specs.py:356),
fuses each gated delta-net layer's input norm into ``in_proj`` (a ``TELayerNormColumnParallelLinear``,
:56-73, ``fuse_input_layernorm``) and takes the full-attention layers from the TE layer spec (:390);
its zero-centred norms (``layernorm_zero_centered_gamma``: ``x * (1 + w)``) are TE's, the local torch norm
asserts the setting off (transformer/torch_norm.py:26-28). :func:`hybrid_block_spec` assembles the same
layers -- the same per-layer attention and MLP patterns (megatron's own ``get_linear_attention_pattern`` /
``get_moe_layer_pattern``), the same pipeline slicing -- from local modules: the input norm a module of
its own, :class:`LocalNorm` wherever the TE spec puts a ``TENorm`` (every norm the config makes
zero-centred: input, pre-MLP, q/k, the delta-net ``out_norm`` and the final norm), and each layer's
``sharded_state_dict_keys_map`` naming the fused norms as TE does, so the local model requests the
checkpoint keys of the TE model (``self_attention.in_proj.layer_norm_weight``...).
"""

from __future__ import annotations

from typing import Any

import torch

from ckptbridge.mcore.compat import apply_cpu_patches
from ckptbridge.layer_spec_names import LOCAL_TO_TE_GDN_KEYS, LOCAL_TO_TE_LAYER_KEYS

apply_cpu_patches()  # P14 before GatedDeltaNet is built

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add  # noqa: E402
from megatron.core.models.gpt.experimental_attention_variant_module_specs import (  # noqa: E402
    get_linear_attention_pattern,
    get_moe_layer_pattern,
)
from megatron.core.models.backends import LocalSpecProvider  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_mtp_block_spec_for_backend  # noqa: E402
from megatron.core.ssm.gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules  # noqa: E402
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402
from megatron.core.transformer.enums import LayerType  # noqa: E402
from megatron.core.transformer.identity_op import IdentityOp  # noqa: E402
from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionBlockSubmodules  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.torch_norm import L2Norm, WrappedTorchNorm  # noqa: E402
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build  # noqa: E402
from megatron.core.transformer.transformer_layer import (  # noqa: E402
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

__all__ = ["ZeroCenteredRMSNorm", "LocalNorm", "is_hybrid", "hybrid_block_spec", "hybrid_mtp_block_spec"]


class ZeroCenteredRMSNorm(torch.nn.Module):
    """RMSNorm with a zero-centred gain, ``x / rms(x) * (1 + w)``, ``w`` starting at 0: TE's ``RMSNorm``
    with ``zero_centered_gamma`` (what megatron builds for ``layernorm_zero_centered_gamma``) and
    transformers' ``Qwen3NextRMSNorm``. Computed in fp32, returned in the input's dtype, as both do."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


class LocalNorm:
    """The local norm megatron's ``TENorm`` stands for: :class:`ZeroCenteredRMSNorm` when the config
    asks for ``layernorm_zero_centered_gamma``, else megatron's own ``WrappedTorchNorm``. Built by
    ``build_module`` with ``WrappedTorchNorm``'s arguments, hence a class whose ``__new__`` answers."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs: Any) -> torch.nn.Module:
        if not config.layernorm_zero_centered_gamma:
            return WrappedTorchNorm(config, hidden_size, eps, **kwargs)
        if config.normalization != "RMSNorm":
            raise ValueError(f"a local zero-centred {config.normalization} is not built (only RMSNorm)")
        return ZeroCenteredRMSNorm(hidden_size, eps)


def is_hybrid(config: TransformerConfig) -> bool:
    """A model whose attention layers are (partly) gated delta-net ones."""
    return getattr(config, "experimental_attention_variant", None) == "gated_delta_net"


def _gated_delta_net() -> ModuleSpec:
    """experimental_attention_variant_module_specs.py:56-73 with the input norm left out (a layer module)."""
    return ModuleSpec(
        module=GatedDeltaNet,
        submodules=GatedDeltaNetSubmodules(in_proj=ColumnParallelLinear, out_norm=LocalNorm, out_proj=RowParallelLinear),
    )


def _local_parts(config: TransformerConfig, num_experts: int | None) -> tuple[ModuleSpec, ModuleSpec]:
    """The local spec's self-attention and MLP (MoE with ``num_experts``), q/k norms as :class:`LocalNorm`."""
    layer = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=config.qk_layernorm,
                                     normalization=config.normalization, qk_l2_norm=config.qk_l2_norm)
    attention = layer.submodules.self_attention
    for name in ("q_layernorm", "k_layernorm"):
        if getattr(attention.submodules, name) not in (IdentityOp, L2Norm):
            setattr(attention.submodules, name, LocalNorm)
    return attention, layer.submodules.mlp


def hybrid_block_spec(config: TransformerConfig, vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """This pipeline stage's (virtual chunk's) layers, as
    ``get_transformer_block_with_experimental_attention_variant_spec`` lays them out (:160-277), from
    local modules; torch_dist keys are the TE spec's (the module docstring)."""
    if config.multi_latent_attention:
        raise ValueError("gated delta-net with multi-latent attention layers is not built locally")
    linear = get_linear_attention_pattern(config)
    moe = get_moe_layer_pattern(config) if config.num_moe_experts else [0] * config.num_layers
    gdn = _gated_delta_net()
    attention, moe_mlp = _local_parts(config, config.num_moe_experts)
    _, dense_mlp = _local_parts(config, None)
    specs = []
    for is_linear, is_moe in zip(linear, moe, strict=True):
        keys = dict(LOCAL_TO_TE_GDN_KEYS if is_linear else {"input_layernorm.": LOCAL_TO_TE_LAYER_KEYS["input_layernorm."]})
        if not is_moe:  # the TE dense MLP fuses its norm into linear_fc1; a MoE layer keeps pre_mlp_layernorm
            keys["pre_mlp_layernorm."] = LOCAL_TO_TE_LAYER_KEYS["pre_mlp_layernorm."]
        specs.append(ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            input_layernorm=LocalNorm,
            self_attention=gdn if is_linear else attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=LocalNorm,
            mlp=moe_mlp if is_moe else dense_mlp,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys,
        )))
    if config.pipeline_model_parallel_layout is not None:
        ids = config.pipeline_model_parallel_layout.get_layer_id_list(layer_type=LayerType.decoder, vp_stage=vp_stage)
    else:
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
        ids = range(offset, offset + get_num_layers_to_build(config, vp_stage=vp_stage))
    return TransformerBlockSubmodules(layer_specs=[specs[i] for i in ids], layer_norm=LocalNorm)


class _LocalNormBackend(LocalSpecProvider):
    """megatron's local backend with :class:`LocalNorm` for its norms (an MTP block's ``enorm``, ``hnorm`` and
    ``final_layernorm``: ``TENorm`` in the TE backend, zero-centred with the config)."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return LocalNorm


def hybrid_mtp_block_spec(config: TransformerConfig, block: TransformerBlockSubmodules,
                          vp_stage: int | None = None) -> MultiTokenPredictionBlockSubmodules | None:
    """megatron's MTP block spec (gpt_layer_specs.py ``get_gpt_mtp_block_spec_for_backend``: the transformer layer
    is the stage's last decoder layer, as with TE) with :class:`LocalNorm` norms; None off the MTP stage."""
    return get_gpt_mtp_block_spec_for_backend(config=config, spec=block, backend=_LocalNormBackend(), vp_stage=vp_stage)
