"""The boundary between ckptbridge's argument names and Megatron-LM's.

Mapping files translate an HF config into Megatron arguments. Most names are
Megatron-LM's own (``pretrain_gpt.py``'s argparse destinations); two are
megatron-core ``TransformerConfig`` names instead. A checkpoint written by
Megatron-LM stores its names; this module is the one place that converts.

It also builds the *full* args Namespace Megatron-LM saves (:func:`full_megatron_lm_args`), from
Megatron-LM's own defaults shipped as data (``megatron_lm_defaults.json``), so that Megatron-LM,
its ``--use-checkpoint-args`` and Megatron-Bridge find every field they read.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .formats.safe_globals import stand_in

#: ckptbridge's name -> the name Megatron-LM's parser stores the same setting under, where they differ
MEGATRON_LM_NAMES: dict[str, str] = {
    "num_moe_experts": "num_experts",  # --num-experts
    "norm_epsilon": "layernorm_epsilon",  # --norm-epsilon (dest layernorm_epsilon)
}


def to_megatron_lm(args: Mapping[str, Any]) -> dict[str, Any]:
    """``args`` under Megatron-LM's names (what its ``--use-checkpoint-args`` and model providers read)."""
    return {MEGATRON_LM_NAMES.get(k, k): v for k, v in args.items()}


def from_megatron_lm(args: Mapping[str, Any]) -> dict[str, Any]:
    """Megatron-LM's ``args`` under ckptbridge's names. A value stored under both names (checkpoints
    ckptbridge wrote before it wrote Megatron-LM's names) must agree."""
    out = dict(args)
    for ours, theirs in MEGATRON_LM_NAMES.items():
        if theirs in args:
            if ours in args and args[ours] != args[theirs]:
                raise ValueError(f"args hold {ours}={args[ours]!r} and {theirs}={args[theirs]!r}")
            out[ours] = out.pop(theirs)
    return out


# ---------------------------------------------------------------------------------------------
# The full Megatron-LM args: what a pretrain_gpt.py run with this model's flags would store
# ---------------------------------------------------------------------------------------------

#: Megatron-LM's parse_args defaults + validate_args values (core_v0.16.1), produced once as data;
#: its "_about" field says how
DEFAULTS_FILE = Path(__file__).with_name("megatron_lm_defaults.json")

@functools.lru_cache(maxsize=1)
def megatron_lm_defaults() -> dict[str, Any]:
    """The stored data: ``args`` (encoded values), the parser defaults validate_args replaced, and
    what Megatron-LM adds when it saves."""
    return json.loads(DEFAULTS_FILE.read_text())


def _enum_member(encoded: Mapping[str, Any]) -> Any:
    """An enum member of the stored args. A megatron enum is its stand-in (`safe_globals`), which is
    pickled as the real class and value: megatron-core is neither needed nor imported to write args
    that Megatron-LM's own ``SAFE_GLOBALS`` load as its real enums. Others (``signal.Signals``) are real."""
    qualified = encoded["enum"]
    if qualified.startswith("megatron."):
        return stand_in(qualified)(encoded["value"], encoded["name"])
    module, _, name = qualified.rpartition(".")
    return getattr(importlib.import_module(module), name)[encoded["name"]]


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "torch.dtype" in value:
        return getattr(torch, value["torch.dtype"])
    if "enum" in value:
        return _enum_member(value)
    if "tuple" in value:
        return tuple(_decode(v) for v in value["tuple"])
    if "float" in value:
        return float(value["float"])
    raise ValueError(f"{DEFAULTS_FILE}: unknown encoded value {value!r}")


def _plain(value: Any, default: Any) -> Any:
    """``value`` as Megatron-LM's parser types it: tuples as lists (``moe_layer_freq``), a whole
    float as an int where the flag is an int (``--rotary-base 500000``)."""
    if isinstance(value, tuple):
        return [_plain(v, None) for v in value]
    if isinstance(value, float) and value.is_integer() and type(default) is int:
        return int(value)
    return value


def _derived(args: dict[str, Any], parser: Mapping[str, Any]) -> dict[str, Any]:
    """What validate_args derives from the values a model sets (arguments.py, core_v0.16.1), for
    the smallest world that holds the layout (data parallel fills what the expert grid needs)."""
    tp, pp = int(args["tensor_model_parallel_size"]), int(args["pipeline_model_parallel_size"])
    ep = int(args.get("expert_model_parallel_size") or 1)
    etp = int(args.get("expert_tensor_parallel_size") or tp)
    world = math.lcm(tp * pp, etp * ep * pp)
    dp = world // (tp * pp)
    interleaved = bool(args.get("virtual_pipeline_model_parallel_size"))
    out: dict[str, Any] = {
        "world_size": world, "inprocess_active_world_size": world, "rank": 0,
        "data_parallel_size": dp, "global_batch_size": int(args["micro_batch_size"]) * dp,
        "transformer_pipeline_model_parallel_size": pp,
        "expert_tensor_parallel_size": etp,
        "overlap_p2p_comm": interleaved and parser["overlap_p2p_comm"],
        "align_param_gather": interleaved and parser["align_param_gather"],
        "accumulate_allreduce_grads_in_fp32": bool(args["bf16"]),
        "use_dist_ckpt": args["ckpt_format"] != "torch",
        "encoder_num_layers": args["num_layers"], "encoder_seq_length": args["seq_length"],
        "apply_rope_fusion": args["position_embedding_type"] == "rope" and parser["apply_rope_fusion"],
    }
    if args["fp16"]:
        out["check_for_nan_in_loss_and_grad"] = False
    if not args["add_bias_linear"]:
        out["bias_gelu_fusion"] = False
    else:
        out["add_qkv_bias"] = True
    if args.get("num_experts") and args.get("moe_ffn_hidden_size") is None:
        out["moe_ffn_hidden_size"] = args["ffn_hidden_size"]
    return out


def full_megatron_lm_args(margs: Mapping[str, Any], iteration: int = 0) -> argparse.Namespace:
    """The args Namespace a Megatron-LM ``pretrain_gpt.py`` run with this model's flags would save:
    Megatron-LM's defaults (:data:`DEFAULTS_FILE`), overlaid with ``margs`` (ckptbridge's model,
    layout, dtype and format arguments) under Megatron-LM's names, plus what validate_args derives
    from them and what Megatron-LM adds when it saves. Settings Megatron-LM has no flag for (e.g.
    MLA's ``beta_fast``) are kept under ckptbridge's name: ckptbridge reads them back."""
    data = megatron_lm_defaults()
    args = {k: _decode(v) for k, v in data["args"].items()}
    args.update({k: _plain(v, args.get(k)) for k, v in to_megatron_lm(margs).items()})
    args.update(_derived(args, {k: _decode(v) for k, v in data["parser_defaults_changed_by_validate_args"].items()}))
    args.update({k: _decode(v) for k, v in data["added_at_save"].items()})
    args["iteration"] = iteration
    return argparse.Namespace(**args)
