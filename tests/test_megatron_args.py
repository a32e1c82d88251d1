"""The args ckptbridge writes are the args Megatron-LM writes.

Four architectures (llama with llama3 rope scaling, qwen3, qwen3_moe, deepseek_v3 with MLA and
MTP) are converted HF -> torch_dist at ``--dst-iteration 100``. Their stored args are fed to
megatron-core's ``TransformerConfig`` the way Megatron-LM's ``core_transformer_config_from_args``
does (every dataclass field by name, plus its few renames), and the model built from that config
must be the model ckptbridge's own builder builds. The key set and values are checked against
the args of a real Megatron-LM (core_v0.16.1) checkpoint (``fixtures/megatron-lm/llama-td-tp2pp2``'s common.pt,
written by ``save_checkpoint`` for the model of ``fixtures/megatron-lm/llama-hf``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from ckptbridge.mcore import model as mm  # imports megatron-core (and its CPU patches) first
from ckptbridge.convert import Target, convert
from ckptbridge.layout import ParallelLayout
from ckptbridge.megatron_args import full_megatron_lm_args
from ckptbridge.megatron_settings import RENAMED_FIELDS
from ckptbridge.mcore.launch import ensure_single_rank_group
from ckptbridge.presets import build_tiny_hf
from ckptbridge.spec import ModelSpec
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec
from megatron.core.safe_globals import SAFE_GLOBALS
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_config import MLATransformerConfig

FIXTURE = Path(__file__).parent / "fixtures" / "megatron-lm"
REAL_COMMON = FIXTURE / "llama-td-tp2pp2" / "iter_0000100" / "common.pt"
REAL_CONFIG = FIXTURE / "llama-hf" / "config.json"
PRESETS = {"llama": "llama3.1-8b", "qwen3": "qwen3-8b", "qwen3_moe": "qwen3-30b-a3b", "deepseek_v3": "deepseek-v3"}
ITERATION = 100

#: Megatron-LM's core_transformer_config_from_args: TransformerConfig field <- how it is read from args
#: (every other field is read under its own name); the renames are ckptbridge's own table
MEGATRON_LM_RENAMES: dict[str, Any] = {
    **{field: (lambda a, arg=arg, neg=neg: (not getattr(a, arg)) if neg else getattr(a, arg))
       for field, (arg, neg) in RENAMED_FIELDS.items()},
    "num_query_groups": lambda a: a.num_query_groups if a.group_query_attention else None,
    "gated_linear_unit": lambda a: bool(a.swiglu),
    "activation_func": lambda a: F.silu if a.swiglu else F.gelu,
}

#: CPU, no TransformerEngine: what neither build may use (fused kernels, CUDA init); applied to both
CPU_ONLY = dict(use_cpu_initialization=True, perform_initialization=False, apply_rope_fusion=False,
                bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
                gradient_accumulation_fusion=False, persist_layer_norm=False, moe_grouped_gemm=False,
                moe_shared_expert_overlap=False, hidden_dropout=0.0, attention_dropout=0.0)

#: fields both configs must agree on: the model's shape and maths
COMPARED = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
            "normalization", "layernorm_epsilon", "gated_linear_unit", "activation_func", "add_bias_linear", "add_qkv_bias",
            "qk_layernorm", "num_moe_experts", "moe_ffn_hidden_size", "moe_router_topk", "moe_layer_freq",
            "moe_shared_expert_intermediate_size", "moe_router_score_function", "moe_router_enable_expert_bias",
            "moe_router_topk_scaling_factor", "moe_router_num_groups", "moe_router_group_topk", "moe_router_pre_softmax",
            "moe_router_dtype", "multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim",
            "qk_pos_emb_head_dim", "v_head_dim", "rotary_scaling_factor", "mscale", "mscale_all_dim", "mtp_num_layers",
            "tensor_model_parallel_size", "pipeline_model_parallel_size")

#: where the llama args differ from the real Megatron-LM checkpoint's, and why
FIXTURE_RUN_ONLY = {
    # that run's training / CPU / tokenizer flags, not the model's
    "adam_beta2", "lr", "min_lr", "lr_decay_iters", "lr_decay_style", "lr_warmup_iters", "train_iters", "weight_decay",
    "start_weight_decay", "end_weight_decay", "global_batch_size", "save", "save_interval", "use_distributed_optimizer",
    "distributed_backend", "use_cpu_initialization", "no_persist_layer_norm", "apply_rope_fusion", "bias_dropout_fusion",
    "bias_swiglu_fusion", "gradient_accumulation_fusion", "masked_softmax_fusion", "seq_length", "encoder_seq_length",
    "hidden_dropout", "attention_dropout", "tokenizer_type",
    "vocab_size",  # NullTokenizer's --vocab-size 1000 (it adds one token); ckptbridge stores the true 1001
    "iteration",  # Megatron-LM stores 0 inside args; common.pt['iteration'] holds the step
}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each preset converted HF -> torch_dist (bf16, TE names) at ``--dst-iteration 100``: the checkpoint roots."""
    root = tmp_path_factory.mktemp("margs")
    out = {}
    for i, (name, preset) in enumerate(PRESETS.items()):
        hf = build_tiny_hf(preset, root / name, layers=2, seed=i)
        convert(hf, root / f"{name}-mcore", None,
                Target("mcore", ParallelLayout(), "torch_dist", "te", torch.bfloat16, iteration=ITERATION))
        out[name] = root / f"{name}-mcore"
    return out


@contextmanager
def only_megatron_safe_globals() -> Iterator[None]:
    """torch's weights_only allow-list holding exactly megatron-core's SAFE_GLOBALS, as in Megatron-LM."""
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(SAFE_GLOBALS)
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)


def megatron_load(path: Path) -> dict[str, Any]:
    with only_megatron_safe_globals():
        return torch.load(path, weights_only=True)


def megatron_lm_config(args: argparse.Namespace) -> TransformerConfig:
    """``core_transformer_config_from_args`` (Megatron-LM core_v0.16.1) over ``args``, CPU-only fields fixed."""
    cls = MLATransformerConfig if args.multi_latent_attention else TransformerConfig
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    kw.update({field: read(args) for field, read in MEGATRON_LM_RENAMES.items()})
    if args.rope_type is None:
        kw.pop("rope_type", None)
    if len(args.cp_comm_type) == 1:
        kw["cp_comm_type"] = args.cp_comm_type[0]
    kw.update(CPU_ONLY)
    return cls(**kw)


def test_iteration_folder_tracker_and_args(written: dict[str, Path]) -> None:
    for root in written.values():
        assert (root / "latest_checkpointed_iteration.txt").read_text() == str(ITERATION)
        assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["hf_assets", f"iter_{ITERATION:07d}"]
        common = megatron_load(root / f"iter_{ITERATION:07d}" / "common.pt")
        assert common["iteration"] == ITERATION and common["args"].iteration == ITERATION


def test_megatron_lm_key_set_and_types(written: dict[str, Path]) -> None:
    """Megatron-LM's 658 keys, its enum instances and dtypes, readable with only its SAFE_GLOBALS."""
    real = vars(megatron_load(REAL_COMMON)["args"])
    for name, root in written.items():
        args = vars(megatron_load(root / f"iter_{ITERATION:07d}" / "common.pt")["args"])
        assert set(real) <= set(args), (name, sorted(set(real) - set(args)))
        assert "num_moe_experts" not in args and "norm_epsilon" not in args, name  # Megatron-LM's names only
        for key in ("attention_backend", "model_type", "exit_signal", "params_dtype", "main_grads_dtype"):
            assert type(args[key]) is type(real[key]), (name, key)
        assert args["params_dtype"] is torch.bfloat16 and args["bf16"] and args["ckpt_format"] == "torch_dist"


def test_llama_args_equal_a_real_megatron_lm_run() -> None:
    """Same model, same layout (TP2 x PP2, bf16, torch_dist): every value equals what Megatron-LM's own
    save_checkpoint stored, except that run's training/CPU flags."""
    real = vars(megatron_load(REAL_COMMON)["args"])
    spec = ModelSpec.from_hf_config(json.loads(REAL_CONFIG.read_text()))
    ours = vars(full_megatron_lm_args(spec.megatron_args(ParallelLayout(2, 2), torch.bfloat16, "te", "torch_dist")))
    assert set(ours) == set(real)
    differ = {k for k in real if repr(ours[k]) != repr(real[k])}
    assert differ <= FIXTURE_RUN_ONLY, sorted(differ - FIXTURE_RUN_ONLY)
    assert ours["layernorm_epsilon"] == 1e-5 and ours["use_rope_scaling"] and ours["rotary_base"] == 500000


@pytest.mark.parametrize("name", list(PRESETS))
def test_megatron_lm_config_builds_ckptbridges_model(written: dict[str, Path], name: str) -> None:
    args = megatron_load(written[name] / f"iter_{ITERATION:07d}" / "common.pt")["args"]
    ensure_single_rank_group()
    mm.init_parallel(1, 1, seed=0)
    theirs = megatron_lm_config(args)
    ours = mm.transformer_config_from_args(args, dtype=torch.bfloat16, **CPU_ONLY)
    assert type(theirs) is type(ours)
    for field in COMPARED:
        if hasattr(ours, field):
            assert getattr(theirs, field) == getattr(ours, field), field
    spec = mm.decoder_spec_from_config(theirs, args, None)
    model = GPTModel(
        config=theirs, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
        rotary_percent=args.rotary_percent, rope_scaling=args.use_rope_scaling, rope_scaling_factor=args.rope_scaling_factor,
        mtp_block_spec=get_gpt_mtp_block_spec(theirs, spec, use_transformer_engine=False) if args.mtp_num_layers else None,
    )
    (reference,) = mm.build_gpt_model(args, dtype=torch.bfloat16, use_te=False, **CPU_ONLY)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    assert shapes == {k: tuple(v.shape) for k, v in reference.state_dict().items() if isinstance(v, torch.Tensor)}
