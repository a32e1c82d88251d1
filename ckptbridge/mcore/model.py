"""Build, load and run a real megatron-core ``GPTModel`` from Megatron-LM ``args``.

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
from torch.distributed.checkpoint.api import CheckpointException

from ckptbridge.mcore.compat import apply_cpu_patches, cuda_to_cpu
from ckptbridge.megatron_args import from_megatron_lm
from ckptbridge.spec_names import LOCAL_TO_TE_LAYER_KEYS, LOCAL_TO_TE_MLA_KEYS, LOCAL_TO_TE_MOE_LAYER_KEYS

apply_cpu_patches()

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel  # noqa: E402
from megatron.core.dist_checkpointing.core import CheckpointingException  # noqa: E402
from megatron.core.dist_checkpointing.validation import StrictHandling  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import (  # noqa: E402
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
    get_gpt_mtp_block_spec,
)
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402
from ckptbridge.mcore.config import gpt_model_kwargs, te_usable, transformer_config_from_args  # noqa: E402,F401
from megatron.core.transformer.dot_product_attention import DotProductAttention  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules  # noqa: E402

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
]

#: Top-level module prefixes of a ``GPTModel`` (sharded keys and state-dict keys).
_MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "output_layer.", "mtp.")

#: the name align/runner.py imports (kept: te_usable lives in mcore/config.py now)
_te_usable = te_usable

_ARGS_ATTR = "_ckptbridge_args"


def _our_names(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with Megatron-LM's names for ckptbridge's settings (``num_experts``,
    ``layernorm_epsilon``) under ckptbridge's, so Megatron-LM's own checkpoint args build too."""
    return argparse.Namespace(**from_megatron_lm(vars(args)))


class CheckpointMismatchError(RuntimeError):
    """Raised when checkpoint and model disagree on (non ``_extra_state``) keys."""


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
    megatron's per-layer block spec (first-k-dense MoE, MLA), local modules only.

    Block specs come from ``get_gpt_decoder_block_spec(use_transformer_engine=False)`` (the
    layers of this pipeline stage / virtual chunk).  MLA layers get :class:`_LocalMLACoreAttention`
    and their keys map is set to request TE-spec names (:data:`LOCAL_TO_TE_MLA_KEYS`, plus the
    fused fc1 norm in dense layers); non-MLA MoE layers get :data:`LOCAL_TO_TE_MOE_LAYER_KEYS`.
    """
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
    per_layer = bool(getattr(config, "multi_latent_attention", False)) or getattr(config, "moe_layer_freq", 1) != 1
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
            setattr(model, _ARGS_ATTR, args)
            models.append(model)
    return models


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def _is_extra_state(key: str) -> bool:
    return key.endswith("_extra_state")


def _chunk_key(models: Sequence[torch.nn.Module], i: int) -> str:
    """Megatron-LM's state-dict key for chunk ``i``: ``model`` or ``model0``, ``model1``..."""
    return "model" if len(models) == 1 else f"model{i}"


def _sharded_sd_metadata(ckpt_dir: str) -> dict[str, Any] | None:
    """Reconstruct the ``metadata`` the checkpoint's sharded keys were produced with.

    Megatron-LM passes ``sharded_sd_metadata`` to ``model.sharded_state_dict(metadata=...)``
    and stores it as ``content_metadata`` in ``common.pt``.  Two flags change *model* keys:
    ``singleton_local_shards`` (SwiGLU ``linear_fc1.weight_w/_v`` and per-layer keys) and
    ``non_homogeneous_layers`` (per-layer ``decoder.layers.<i>.`` keys instead of one tensor
    stacked over layers).  Without ``content_metadata`` (e.g. a checkpoint written directly with
    ``dist_checkpointing.save``) the layout is detected from the tensor names in ``.metadata``.
    """
    content = dist_checkpointing.load_content_metadata(ckpt_dir)
    meta: dict[str, Any] = {}
    if content:
        for k in ("singleton_local_shards", "non_homogeneous_layers"):
            if k in content:
                meta[k] = content[k]
        return meta or None
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(ckpt_dir).read_metadata().state_dict_metadata.keys()
    if any(re.match(r"decoder\.layers\.\d+\.", k) for k in keys):
        meta["non_homogeneous_layers"] = True
    if any(k.endswith("linear_fc1.weight_w") for k in keys):
        meta["singleton_local_shards"] = True
    return meta or None


def load_torch_dist(
    models: Sequence[GPTModel], ckpt_dir: str | os.PathLike[str], *, strict: bool = True
) -> dict[str, set[str]]:
    """Load a torch_dist checkpoint folder (``iter_XXXXXXX/`` or ``release/``) into ``models``.

    Uses megatron's own ``dist_checkpointing.load`` with ``StrictHandling.RETURN_ALL``, then
    ``load_state_dict`` like Megatron-LM.  In megatron's vocabulary "unexpected" keys are keys
    the *model* requests that the checkpoint lacks and "missing" keys are checkpoint entries no
    rank requested (computed globally, over all ranks).

    ``_extra_state`` handling (why the strict check needs special-casing): every local-spec
    ``ColumnParallelLinear``/``RowParallelLinear`` contributes a ``<module>._extra_state``
    ``ShardedObject`` whose value is ``None`` (``GPTModel`` drops ``output_layer._extra_state``).
    megatron-core writes these as byte entries; a converter may omit them, and TE checkpoints
    carry more of them (e.g. ``core_attention._extra_state``).  With RETURN_ALL an absent
    requested object is removed from the request and the module keeps its (empty) state, and
    ``load_state_dict`` re-adds ``_extra_state=None`` through the linear layers' pre-hook, so
    ``_extra_state`` mismatches are harmless in both directions and are ignored here.

    With ``strict`` a ``CheckpointMismatchError`` is raised (on every rank) when a model
    tensor is absent from the checkpoint or a model-like checkpoint entry (``embedding.``,
    ``decoder.``, ``output_layer.``, ``mtp.``) is not consumed.  Other checkpoint entries
    (optimizer state, ``rng_state``...) are always ignored.  Shape disagreements (including a
    wrong layer count with the default stacked-layer layout) are detected by megatron itself
    and re-raised as ``CheckpointMismatchError`` regardless of ``strict``.

    Returns ``{"unexpected": ..., "missing": ...}`` (``_extra_state`` keys included) for
    inspection.
    """
    apply_cpu_patches()
    ckpt_dir = os.fspath(ckpt_dir)
    metadata = _sharded_sd_metadata(ckpt_dir)
    if any(getattr(m, "mtp_process", False) and not m.pre_process for m in models):
        # a last stage with MTP blocks ties its embedding replica to the first stage's through the
        # data-parallel group Megatron-LM puts in the metadata (gpt_model.py:834-842)
        metadata = {**(metadata or {}), "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    sharded_sd = {
        _chunk_key(models, i): m.sharded_state_dict(metadata=metadata)
        for i, m in enumerate(models)
    }
    try:
        with cuda_to_cpu():
            loaded, missing, unexpected = dist_checkpointing.load(
                sharded_sd, ckpt_dir, strict=StrictHandling.RETURN_ALL
            )
    except (CheckpointingException, CheckpointException) as e:
        # e.g. "Global shape mismatch ..." when the layer count / TP-invariant shapes differ
        # (the default layout stacks layers on a leading num_layers axis).
        raise CheckpointMismatchError(f"megatron could not load {ckpt_dir}: {_cause(e)}") from e
    if strict:
        bad_unexpected = sorted(k for k in unexpected if not _is_extra_state(k))
        bad_missing = sorted(
            k for k in missing if not _is_extra_state(k) and k.startswith(_MODEL_KEY_PREFIXES)
        )
        if bad_unexpected or bad_missing:
            raise CheckpointMismatchError(
                f"torch_dist checkpoint {ckpt_dir} does not match the model: "
                f"absent from checkpoint={bad_unexpected}, unused in checkpoint={bad_missing}"
            )
    for i, m in enumerate(models):
        _load_chunk(m, loaded[_chunk_key(models, i)])
    return {"unexpected": set(unexpected), "missing": set(missing)}


def _cause(exc: BaseException) -> str:
    """The readable reason of a failed load: torch's ``CheckpointException`` prints only
    ``CheckpointException ranks:dict_keys([0])`` first, its per-rank exceptions (e.g. megatron's
    shape mismatch naming the tensor) after their tracebacks; this puts each rank's on one line."""
    if isinstance(exc, CheckpointException):
        return "; ".join(f"rank {rank}: {type(err).__name__}: {err}".strip() for rank, (err, _) in sorted(exc.failures.items()))
    return str(exc)


def _load_chunk(model: torch.nn.Module, state_dict: Mapping[str, Any]) -> None:
    """``load_state_dict`` that only tolerates ``_extra_state`` mismatches."""
    result = model.load_state_dict(dict(state_dict), strict=False)
    missing = [k for k in result.missing_keys if not _is_extra_state(k)]
    unexpected = [k for k in result.unexpected_keys if not _is_extra_state(k)]
    if missing or unexpected:
        raise CheckpointMismatchError(f"missing keys={missing}, unexpected keys={unexpected}")


#: TE ``GroupedLinear`` (``TEGroupedMLP``, ``moe_grouped_gemm``) state-dict names of local expert
#: ``e``: ``mlp.experts.linear_fc1.weight<e>``; ``SequentialMLP`` names it
#: ``mlp.experts.local_experts.<e>.linear_fc1.weight``.
_GROUPED_EXPERT_KEY = re.compile(r"(.*\.mlp\.experts\.)(linear_fc[12])\.(weight|bias)(\d+)$")


def _te_to_local(model: torch.nn.Module, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename fused-norm / grouped-expert TE keys to local-spec names where the model needs them."""
    own = set(model.state_dict().keys())
    out: dict[str, Any] = {}
    for k, v in state_dict.items():
        if k not in own:
            for local, te in LOCAL_TO_TE_LAYER_KEYS.items():
                if te in k and k.replace(te, local) in own:
                    k = k.replace(te, local)
                    break
            else:
                m = _GROUPED_EXPERT_KEY.match(k)
                if m:
                    local_key = f"{m[1]}local_experts.{m[4]}.{m[2]}.{m[3]}"
                    if local_key in own:
                        k = local_key
        out[k] = v
    return out


def load_legacy_rank(models: Sequence[GPTModel], state_dict: Mapping[str, Any]) -> None:
    """Load one legacy per-rank checkpoint (``mp_rank_XX[_YYY]/model_optim_rng.pt``).

    ``state_dict`` is the loaded file (or just its model part): ``{'model': sd}`` for a single
    chunk, ``{'model0': sd0, 'model1': sd1, ...}`` with virtual pipeline stages.  Semantics
    are ``load_state_dict(strict=True)`` except that ``_extra_state`` keys may be absent or
    extra.  The local spec's ``state_dict()`` keys per decoder layer ``i`` (*local* index on
    this stage, starting at 0) are::

        decoder.layers.i.input_layernorm.weight
        decoder.layers.i.self_attention.linear_qkv.weight   (+ .bias with add_qkv_bias)
        decoder.layers.i.self_attention.linear_qkv._extra_state
        decoder.layers.i.self_attention.q_layernorm.weight  (qk_layernorm)
        decoder.layers.i.self_attention.k_layernorm.weight  (qk_layernorm)
        decoder.layers.i.self_attention.linear_proj.weight / ._extra_state
        decoder.layers.i.pre_mlp_layernorm.weight
        decoder.layers.i.mlp.linear_fc1.weight / ._extra_state   ([gate; up] per TP rank)
        decoder.layers.i.mlp.linear_fc2.weight / ._extra_state

    plus ``embedding.word_embeddings.weight`` on the first stage, and on the last stage
    ``decoder.final_layernorm.weight``, ``output_layer._extra_state`` (always) and
    ``output_layer.weight`` (untied; or tied with PP>1, where the last stage keeps its own copy
    of the embedding -- with tied embeddings and PP=1 there is no ``output_layer.weight``).  TE-spec names for the pre-norms
    (``self_attention.linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``)
    are accepted and renamed (see ``LOCAL_TO_TE_LAYER_KEYS``).

    MoE layers (``SequentialMLP`` experts; ``e`` is the *local* expert index on this EP rank,
    global expert ``ep_rank * num_local_experts + e``) have instead of ``mlp.linear_fc1/2``::

        decoder.layers.i.pre_mlp_layernorm.weight           (a module in both specs)
        decoder.layers.i.mlp.router.weight                  ([num_experts, hidden], replicated)
        decoder.layers.i.mlp.experts.local_experts.e.linear_fc1.weight / ._extra_state
        decoder.layers.i.mlp.experts.local_experts.e.linear_fc2.weight / ._extra_state
        decoder.layers.i.mlp.shared_experts.linear_fc1.weight / linear_fc2.weight (+ _extra_state)
        decoder.layers.i.mlp.shared_experts.gate_weight     ([1, hidden], with the shared gate)

    TE grouped-GEMM expert names (``mlp.experts.linear_fc1.weight<e>``) are renamed to these.
    """
    if len(models) == 1 and "model" in state_dict:
        parts = [state_dict["model"]]
    elif len(models) > 1 and all(f"model{i}" in state_dict for i in range(len(models))):
        parts = [state_dict[f"model{i}"] for i in range(len(models))]
    elif len(models) == 1 and any(k.startswith(_MODEL_KEY_PREFIXES) for k in state_dict):
        parts = [state_dict]
    else:
        raise CheckpointMismatchError(
            f"expected 'model' or 'model0'..'model{len(models) - 1}' in state dict, "
            f"got keys {sorted(state_dict)[:10]}"
        )
    for m, sd in zip(models, parts, strict=True):
        _load_chunk(m, _te_to_local(m, sd))


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------


def _gather_tp_last_dim(t: torch.Tensor) -> torch.Tensor:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return t
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(tp)]
    torch.distributed.all_gather(
        parts, t, group=parallel_state.get_tensor_model_parallel_group()
    )
    return torch.cat(parts, dim=-1)


class main_logits_only:
    """Context manager: run ``models`` without their MTP blocks.

    With ``mtp_num_layers`` set, ``GPTModel.forward`` computes the MTP losses and needs labels
    (gpt_model.py:611-612): MTP is a training head in megatron-core 0.16.1.  To compare the
    main model's logits, the blocks stay loaded but are not run.
    """

    def __init__(self, models: Sequence[GPTModel]):
        self.models = list(models)

    def __enter__(self) -> list[GPTModel]:
        self.saved = [(m, m.mtp_process, m.config.mtp_num_layers) for m in self.models]
        for m in self.models:
            m.mtp_process = False
            m.config.mtp_num_layers = None
        return self.models

    def __exit__(self, *exc: Any) -> None:
        for m, process, layers in self.saved:
            m.mtp_process = process
            m.config.mtp_num_layers = layers


def forward_logits(
    models: Sequence[GPTModel], tokens: torch.Tensor, *, vocab_size: int | None = None
) -> torch.Tensor | None:
    """Forward ``tokens`` ([b, s] int64, identical on every rank) through all PP stages.

    Uses megatron's ``get_forward_backward_func`` with ``forward_only=True`` and
    ``collect_non_loss_data=True`` (so the last stage's "loss function" receives the logits),
    under :func:`cuda_to_cpu` for the schedules' ``device="cuda"`` counters (P4).  The
    attention mask is explicit (``[1, 1, s, s]`` bool, True = masked, like Megatron-LM's
    ``get_ltor_masks_and_position_ids``) so megatron never builds its CUDA default mask.

    Microbatching: one microbatch of the whole batch, except with virtual pipeline stages
    where megatron's interleaved schedule needs at least ``pp`` microbatches; there the batch
    is split per sample (padded by repeating the last sample, padding dropped afterwards) and
    ``microbatch_group_size_per_vp_stage`` is set to the microbatch count for the call.

    Returns ``[b, s, vocab]`` logits in the model dtype, gathered over TP and sliced to
    ``args.vocab_size`` (or ``vocab_size``), on last-stage ranks; ``None`` elsewhere.
    """
    apply_cpu_patches()
    models = list(models)
    args = getattr(models[0], _ARGS_ATTR, None)
    if vocab_size is None and args is not None:
        vocab_size = int(args.vocab_size)
    config = models[0].config
    b, s = tokens.shape
    tokens = tokens.to(torch.long)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()

    if vpp is not None:
        n_mb = max(b, pp)
        samples = [tokens[min(i, b - 1) : min(i, b - 1) + 1] for i in range(n_mb)]
        microbatches, mbs = samples, 1
    else:
        n_mb, microbatches, mbs = 1, [tokens], b

    position_ids = torch.arange(s, dtype=torch.long).unsqueeze(0)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]

    def loss_func(output: torch.Tensor, non_loss_data: bool = False) -> torch.Tensor:
        return _gather_tp_last_dim(output)

    def forward_step(data_iterator: Any, model: GPTModel) -> tuple[torch.Tensor, Any]:
        mb = next(data_iterator)
        out = model(
            input_ids=mb,
            position_ids=position_ids.expand(mb.shape[0], -1),
            attention_mask=mask,
        )
        return out, loss_func

    if vpp is not None:
        data_iterator: Any = [iter(list(microbatches)) for _ in models]
    else:
        data_iterator = iter(microbatches)

    saved_group = config.microbatch_group_size_per_vp_stage
    if vpp is not None:
        config.microbatch_group_size_per_vp_stage = n_mb
    try:
        for m in models:
            m.eval()
        with torch.no_grad(), cuda_to_cpu():
            store = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=data_iterator,
                model=models if len(models) > 1 else models[0],
                num_microbatches=n_mb,
                seq_length=s,
                micro_batch_size=mbs,
                forward_only=True,
                collect_non_loss_data=True,
            )
    finally:
        config.microbatch_group_size_per_vp_stage = saved_group

    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    logits = torch.cat(list(store), dim=0)[:b]
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    return logits
