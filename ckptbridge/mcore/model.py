"""Build a real megatron-core ``GPTModel`` from Megatron-LM ``args`` (loading: :mod:`.load`; the
pipelined forward: :mod:`.forward`; both re-exported here, where the harness looks for them).

Megatron-LM checkpoints carry the training ``argparse.Namespace`` (``common.pt['args']`` for
torch_dist, ``model_optim_rng.pt['args']`` for the legacy format).  This module turns that
namespace into the same ``TransformerConfig`` / ``GPTModel`` Megatron-LM's ``pretrain_gpt``
would build, so that checkpoints written by a converter can be validated by megatron-core's
*own* loading code (``dist_checkpointing.load`` / ``load_state_dict``) and forward pass.

Typical use inside one process of an initialised gloo/nccl group::

    init_parallel(tp=2, pp=2)
    models = build_gpt_model(args)
    load_torch_dist(models, "ckpt/iter_0000010")
    logits = forward_logits(models, tokens)   # full-vocab logits on the last PP stage

On CPU the minimal patches from :mod:`ckptbridge.mcore.compat` are applied automatically.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ckptbridge.mcore.compat import apply_cpu_patches, cuda_to_cpu
from ckptbridge.megatron_args import from_megatron_lm
from ckptbridge.layer_spec_names import LOCAL_TO_TE_LAYER_KEYS, LOCAL_TO_TE_MLA_KEYS, LOCAL_TO_TE_MOE_LAYER_KEYS

apply_cpu_patches()

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import (  # noqa: E402
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
    get_gpt_mtp_block_spec,
)
from megatron.core.transformer import TransformerConfig  # noqa: E402
from ckptbridge.mcore.config import ARGS_ATTR, gpt_model_kwargs, te_usable, transformer_config_from_args  # noqa: E402,F401
from megatron.core.transformer.dot_product_attention import DotProductAttention  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules  # noqa: E402
from ckptbridge.mcore.hybrid import hybrid_block_spec, hybrid_mtp_block_spec, is_hybrid  # noqa: E402

__all__ = [
    "init_parallel",
    "transformer_config_from_args",
    "layer_spec_from_args",
    "build_gpt_model",
    "load_torch_dist",
    "load_legacy_rank",
    "forward_logits",
    "LOCAL_TO_TE_LAYER_KEYS",
    "LOCAL_TO_TE_MOE_LAYER_KEYS",
    "CheckpointMismatchError",
    "LOCAL_TO_TE_MLA_KEYS",
    "decoder_spec_from_config",
    "main_logits_only",
    "forward_mtp_logits",
]

#: Top-level module prefixes of a ``GPTModel`` (sharded keys and state-dict keys).
#: the name align/runner.py imports (kept: te_usable lives in mcore/config.py now)
_te_usable = te_usable


def _our_names(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with Megatron-LM's names for ckptbridge's settings (``num_experts``,
    ``layernorm_epsilon``) under ckptbridge's, so Megatron-LM's own checkpoint args build too."""
    return argparse.Namespace(**from_megatron_lm(vars(args)))


# --------------------------------------------------------------------------------------------
# parallel state
# --------------------------------------------------------------------------------------------


def init_parallel(
    tp: int,
    pp: int,
    vpp: int | None = None,
    *,
    seed: int = 1234,
    create_gloo_process_groups: bool = False,
    ep: int = 1,
    etp: int | None = None,
) -> None:
    """Initialise megatron ``parallel_state`` inside an already initialised process group.

    Order is megatron's default (``tp-cp-ep-dp-pp``): ranks ``[0, tp)`` form the first TP group,
    PP stages are ``tp * dp`` ranks apart.  ``ep`` / ``etp`` are the expert-model-parallel and
    expert-tensor-parallel sizes of MoE models (``etp=None`` means ``etp = tp``, megatron's
    default); the expert grid is ``etp * ep * edp * pp`` over the same ranks, so ``world`` must
    be divisible by ``etp * ep * pp``.  Any previous model-parallel state is destroyed
    first so the function can be called repeatedly in one process (e.g. in tests).

    The RNG is seeded like Megatron-LM's ``_set_random_seed``: the default CPU generator with
    ``seed`` and the model-parallel tracker via ``model_parallel_cuda_manual_seed`` (which uses
    the CPU tracker of patch P3 when CUDA is absent).  ``create_gloo_process_groups`` is off by
    default because on CPU every group already is a gloo group and the extra groups only cost
    start-up time.
    """
    apply_cpu_patches()
    if not torch.distributed.is_initialized():
        raise RuntimeError("init_parallel needs torch.distributed.init_process_group() first")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        create_gloo_process_groups=create_gloo_process_groups,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


# --------------------------------------------------------------------------------------------
# config / spec / model
# --------------------------------------------------------------------------------------------


def _num_experts(args: argparse.Namespace) -> int | None:
    n = getattr(args, "num_moe_experts", None)
    return int(n) if n else None


def layer_spec_from_args(args: argparse.Namespace, use_te: bool | None = None) -> ModuleSpec:
    """Transformer-layer spec: local (pure PyTorch) unless TE is requested *and* usable.

    ``use_te=None`` follows ``args.transformer_impl`` but falls back to the local spec when
    TransformerEngine or CUDA is missing; torch_dist checkpoints of both specs share key names
    for dense models, so the fallback loads the same checkpoints.

    MoE models (``args.num_moe_experts``) get the MoE layer spec (router, ``SequentialMLP``
    experts with ``moe_grouped_gemm=False`` on the local spec, shared experts when
    ``args.moe_shared_expert_intermediate_size`` is set; shared-expert gating is a config
    field).  For MoE the local spec's ``sharded_state_dict_keys_map`` is replaced by
    :data:`LOCAL_TO_TE_MOE_LAYER_KEYS`: the stock map renames ``pre_mlp_layernorm.`` to
    ``mlp.linear_fc1.layer_norm_`` (gpt_layer_specs.py:417-420), a key that does not exist for
    MoE layers, whereas the TE MoE spec keeps a separate ``pre_mlp_layernorm`` module
    (gpt_layer_specs.py:291) -- with the override the local model requests
    ``decoder.layers.pre_mlp_layernorm.weight`` exactly like TE-spec Megatron-LM.
    """
    args = _our_names(args)
    if use_te is None:
        use_te = getattr(args, "transformer_impl", "local") == "transformer_engine"
    qk_layernorm = bool(getattr(args, "qk_layernorm", False))
    num_experts = _num_experts(args)
    if use_te and te_usable():
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts,
            moe_grouped_gemm=bool(getattr(args, "moe_grouped_gemm", False)),
            qk_layernorm=qk_layernorm,
        )
    spec = get_gpt_layer_local_spec(
        num_experts=num_experts,
        moe_grouped_gemm=False,
        qk_layernorm=qk_layernorm,
        normalization=args.normalization,
    )
    if num_experts is not None:
        spec.submodules.sharded_state_dict_keys_map = dict(LOCAL_TO_TE_MOE_LAYER_KEYS)
    return spec


#: Local-spec MLA layers keep their norms as modules and, unlike the dense local spec, have no
#: ``sharded_state_dict_keys_map`` (gpt_layer_specs.py:366-392); :data:`LOCAL_TO_TE_MLA_KEYS` (the TE spec's
#: fused names, gpt_layer_specs.py:100-127) makes the local model request what Megatron-LM saves. Dense
#: (first-k) layers also fuse the pre-MLP norm into fc1; MoE layers keep ``pre_mlp_layernorm``.


class _LocalMLACoreAttention(DotProductAttention):
    """The local ``DotProductAttention`` for MLA layers.

    ``MLASelfAttention`` passes ``k_channels``/``v_channels`` to its core attention
    (transformer/multi_latent_attention.py:155-166), which only ``TEDotProductAttention``
    accepts: the local class (transformer/dot_product_attention.py:42-52) raises ``TypeError``, so
    megatron-core 0.16.1 cannot build an MLA model without TransformerEngine.  The local class
    already takes the head sizes from the tensors it gets; only its output width uses
    ``kv_channels * heads``, which is right when ``kv_channels == v_head_dim`` (Megatron-LM's
    DeepSeek recipes and our mappings set ``--kv-channels`` to ``v_head_dim``), checked here.
    The softmax scale (with yarn's mscale) comes from ``MLASelfAttention``.
    """

    def __init__(self, *args: Any, k_channels: int | None = None, v_channels: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if v_channels is not None and v_channels != self.config.kv_channels:
            raise ValueError(f"local MLA attention needs kv_channels == v_head_dim ({self.config.kv_channels} != {v_channels})")


def _allow_mla_without_te() -> None:
    """multi_latent_attention.py:54-65 sets ``HAVE_TE = True`` whenever megatron's TE extension
    module imports, which it does without TransformerEngine (extensions/transformer_engine.py:61-77
    stands a ``MagicMock`` in for ``te``), so ``isinstance(self.linear_proj, TELinear)``
    (multi_latent_attention.py:183-185) gets a non-type and raises ``TypeError``.  Without
    TransformerEngine the flag must be False; nothing else reads it.  Not CPU-specific (a TE-less
    bug, like compat P5), so it lives here beside the only code that builds MLA models."""
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        from megatron.core.transformer import multi_latent_attention

        multi_latent_attention.HAVE_TE = False


def decoder_spec_from_config(
    config: TransformerConfig, args: argparse.Namespace, vp_stage: int | None
) -> ModuleSpec | TransformerBlockSubmodules:
    """The decoder spec for this rank's chunk: one layer spec when every layer is alike, else
    megatron's per-layer block spec (first-k-dense MoE, MLA), local modules only; gated delta-net
    hybrids (``experimental_attention_variant``) get :func:`ckptbridge.mcore.hybrid.hybrid_block_spec`.

    Block specs come from ``get_gpt_decoder_block_spec(use_transformer_engine=False)`` (the
    layers of this pipeline stage / virtual chunk).  MLA layers get :class:`_LocalMLACoreAttention`
    and their keys map is set to request TE-spec names (:data:`LOCAL_TO_TE_MLA_KEYS`, plus the
    fused fc1 norm in dense layers); non-MLA MoE layers get :data:`LOCAL_TO_TE_MOE_LAYER_KEYS`.
    """
    if is_hybrid(config):
        return hybrid_block_spec(config, vp_stage)
    mla = bool(getattr(config, "multi_latent_attention", False))
    if not mla and getattr(config, "moe_layer_freq", 1) == 1:
        return layer_spec_from_args(args, use_te=False)
    if mla:
        _allow_mla_without_te()
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=args.normalization,
                                       vp_stage=vp_stage)
    fixed: dict[int, ModuleSpec] = {}
    for spec in block.layer_specs:
        if id(spec) in fixed:
            continue
        fixed[id(spec)] = spec
        moe = "MoELayer" in getattr(spec.submodules.mlp.module, "__name__", "")
        if mla:
            spec.submodules.self_attention.submodules.core_attention = _LocalMLACoreAttention
            keys = dict(LOCAL_TO_TE_MLA_KEYS) if config.qk_layernorm else {}
            if not moe:
                keys["pre_mlp_layernorm."] = LOCAL_TO_TE_LAYER_KEYS["pre_mlp_layernorm."]
            spec.submodules.sharded_state_dict_keys_map = keys
        elif moe:
            spec.submodules.sharded_state_dict_keys_map = dict(LOCAL_TO_TE_MOE_LAYER_KEYS)
    return block


def build_gpt_model(
    args: argparse.Namespace,
    dtype: torch.dtype = torch.float32,
    *,
    use_te: bool | None = None,
    **config_overrides: Any,
) -> list[GPTModel]:
    """Build this rank's ``GPTModel`` chunks (one per virtual pipeline stage), in eval mode.

    Follows Megatron-LM's ``get_model``/``model_provider``: chunk ``i`` gets ``vp_stage=i``,
    ``pre_process``/``post_process`` from ``parallel_state.is_pipeline_first/last_stage`` with
    ``ignore_virtual=False``, ``vocab_size=args.padded_vocab_size``,
    ``max_sequence_length=args.max_position_embeddings`` and shares embedding and output
    weights unless ``args.untie_embeddings_and_output_weights``.  ``init_parallel`` must have
    been called with the same TP/PP/VPP as ``args`` (and, for MoE models, the same
    ``expert_model_parallel_size`` / ``expert_tensor_parallel_size``; ETP ``None`` = TP).

    Construction runs under :func:`cuda_to_cpu` because with tied embeddings and PP>1 the
    last stage all-reduces its embedding copy after ``weight.data.cuda()``
    (models/common/language_module/language_module.py:244).
    """
    apply_cpu_patches()
    args = _our_names(args)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    want = (
        int(args.tensor_model_parallel_size),
        int(args.pipeline_model_parallel_size),
        getattr(args, "virtual_pipeline_model_parallel_size", None),
    )
    if (tp, pp, vpp) != want:
        raise ValueError(f"parallel_state has (tp, pp, vpp)={(tp, pp, vpp)} but args want {want}")
    ep = parallel_state.get_expert_model_parallel_world_size()
    want_ep = int(getattr(args, "expert_model_parallel_size", 1) or 1)
    etp = parallel_state.get_expert_tensor_parallel_world_size()
    want_etp = int(getattr(args, "expert_tensor_parallel_size", None) or tp)
    if _num_experts(args) is not None and (ep, etp) != (want_ep, want_etp):
        raise ValueError(
            f"parallel_state has (ep, etp)={(ep, etp)} but args want {(want_ep, want_etp)}"
        )

    config = transformer_config_from_args(args, dtype=dtype, **config_overrides)
    per_layer = (bool(getattr(config, "multi_latent_attention", False)) or getattr(config, "moe_layer_freq", 1) != 1
                 or is_hybrid(config))
    models: list[GPTModel] = []
    with cuda_to_cpu():
        for vp_stage in range(vpp or 1):
            stage = vp_stage if vpp is not None else None
            if per_layer and (use_te is None or not use_te or not te_usable()):
                spec: Any = decoder_spec_from_config(config, args, stage)
            else:
                spec = layer_spec_from_args(args, use_te=use_te)
            mtp_spec = None
            if getattr(config, "mtp_num_layers", None):
                # MTP blocks on the last stage, their transformer layer built like the last decoder layer
                if is_hybrid(config):
                    mtp_spec = hybrid_mtp_block_spec(config, spec, stage)
                else:
                    mtp_spec = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False, vp_stage=stage)
            model = GPTModel(
                config=config,
                transformer_layer_spec=spec,
                pre_process=parallel_state.is_pipeline_first_stage(
                    ignore_virtual=False, vp_stage=stage
                ),
                post_process=parallel_state.is_pipeline_last_stage(
                    ignore_virtual=False, vp_stage=stage
                ),
                parallel_output=True,
                vp_stage=stage,
                mtp_block_spec=mtp_spec,
                **gpt_model_kwargs(args),
            )
            model.eval()
            setattr(model, ARGS_ATTR, args)
            models.append(model)
    return models


from ckptbridge.mcore.forward import forward_logits, forward_mtp_logits, main_logits_only  # noqa: E402
from ckptbridge.mcore.load import CheckpointMismatchError, load_legacy_rank, load_torch_dist  # noqa: E402
