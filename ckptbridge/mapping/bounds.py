"""Types and ranges of the Megatron arguments that size a model, checked before anything is planned.

A config.json is input: ``num_hidden_layers: 100000000`` used to run for minutes into a MemoryError,
``2.5`` or ``"64"`` was written into Megatron's args as it was. Every size a mapping derives must be a
real integer in a sane range, every float a finite number, before a shape is computed from it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..errors import UnsupportedArchitectureError

#: sizes: (smallest, largest); None values (an absent feature) are allowed
INTEGERS: dict[str, tuple[int, int]] = {
    "num_layers": (1, 100_000),
    "hidden_size": (1, 1 << 20),
    "ffn_hidden_size": (1, 1 << 22),
    "num_attention_heads": (1, 1 << 16),
    "num_query_groups": (1, 1 << 16),
    "kv_channels": (1, 1 << 16),
    "vocab_size": (1, 1 << 26),
    "num_moe_experts": (1, 1 << 16),
    "moe_router_topk": (1, 1 << 16),
    "moe_ffn_hidden_size": (1, 1 << 22),
    "moe_shared_expert_intermediate_size": (1, 1 << 22),
    "q_lora_rank": (1, 1 << 20),
    "kv_lora_rank": (1, 1 << 20),
    "qk_head_dim": (1, 1 << 16),
    "qk_pos_emb_head_dim": (1, 1 << 16),
    "v_head_dim": (1, 1 << 16),
    "mtp_num_layers": (0, 1_000),
    "max_position_embeddings": (1, 1 << 34),
}
#: real numbers that must be finite and positive
POSITIVE_FLOATS = ("norm_epsilon", "rotary_base", "rope_scaling_factor", "rotary_scaling_factor")


def check_bounds(args: Mapping[str, Any], where: str, source: Mapping[str, Any] | None = None) -> None:
    """Raise naming the argument (and the config field it came from, when ``source`` maps it) whose value
    has the wrong type or lies out of range."""
    def named(key: str) -> str:
        field = (source or {}).get(key)
        return f"{key} (from {field!r})" if isinstance(field, str) and field.isidentifier() else key

    for key, (lo, hi) in INTEGERS.items():
        value = args.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise UnsupportedArchitectureError(f"{where}: {named(key)} must be an integer, not {value!r}")
        if not lo <= value <= hi:
            raise UnsupportedArchitectureError(f"{where}: {named(key)} = {value} is outside {lo}..{hi}")
    for key in POSITIVE_FLOATS:
        value = args.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise UnsupportedArchitectureError(f"{where}: {named(key)} must be a finite positive number, not {value!r}")
