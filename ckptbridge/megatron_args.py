"""The boundary between ckptbridge's argument names and Megatron-LM's.

Mapping files translate an HF config into Megatron arguments. Most names are
Megatron-LM's own (``pretrain_gpt.py``'s argparse destinations); two are
megatron-core ``TransformerConfig`` names instead. A checkpoint written by
Megatron-LM stores its names; this module is the one place that converts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
