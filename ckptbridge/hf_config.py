"""Read an HF ``config.json`` in either transformers dialect into one flat namespace.

Checkpoints saved by transformers 4 carry ``rope_theta``/``rope_scaling``/
``torch_dtype``; transformers 5 writes ``rope_parameters``/``dtype``. Mapping
files are written against the normalised names below, once, for every family.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .dtypes import LONG_NAMES
from .errors import FormatError

#: fields that older or smaller configs omit, with the value transformers assumes
_DEFAULTS: dict[str, Any] = {
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "sliding_window": None,
    "use_sliding_window": False,
    "layer_types": None,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "num_nextn_predict_layers": 0,  # no multi-token-prediction blocks (DeepSeek-V3 configs name theirs)
}

#: names one transformers version writes where another writes the other (its ``attribute_map``)
_ALIASES = [("num_experts", "num_local_experts")]

_DTYPES = LONG_NAMES


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FormatError(f"{path}: no config.json; an HF checkpoint folder needs one") from None
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from None


def normalise(raw: dict[str, Any]) -> dict[str, Any]:
    """Flatten the rope settings and fill defaults; the raw dict is left untouched."""
    cfg = {**_DEFAULTS, **raw}
    cfg.setdefault("max_window_layers", cfg.get("num_hidden_layers"))
    for a, b in _ALIASES:
        if a in cfg and b not in cfg:
            cfg[b] = cfg[a]
        elif b in cfg and a not in cfg:
            cfg[a] = cfg[b]
    if cfg.get("head_dim") is None and "hidden_size" in cfg and "num_attention_heads" in cfg:
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    if cfg.get("num_key_value_heads") is None:
        cfg["num_key_value_heads"] = cfg.get("num_attention_heads")
    rope = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
    cfg["rope_theta"] = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
    cfg["rope_type"] = rope.get("rope_type", rope.get("type", "default")) or "default"
    cfg["rope_factor"] = rope.get("factor")
    cfg["rope_low_freq_factor"] = rope.get("low_freq_factor")
    cfg["rope_high_freq_factor"] = rope.get("high_freq_factor")
    cfg["rope_original_max_position_embeddings"] = rope.get("original_max_position_embeddings")
    for key, value in rope.items():  # every other rope field (yarn's beta_fast, mscale...) as rope_<field>
        cfg.setdefault(f"rope_{key}", value)
    # per-layer attention kinds (Ministral, Gemma 2/3...) as megatron's per-layer window list: 1 = sliding
    types = cfg.get("layer_types")
    cfg["sliding_layers"] = [int(t == "sliding_attention") for t in types] if isinstance(types, list) else None
    cfg["architecture"] = (raw.get("architectures") or [None])[0]
    return cfg


def config_dtype(raw: dict[str, Any]) -> torch.dtype | None:
    """The dtype the config declares (``dtype`` in v5, ``torch_dtype`` in v4)."""
    name = raw.get("dtype") or raw.get("torch_dtype")
    return _DTYPES.get(name) if isinstance(name, str) else None


def with_dtype(raw: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The config with its dtype field set, in whichever dialect it already uses."""
    name = {v: k for k, v in _DTYPES.items()}[dtype]
    out = dict(raw)
    key = "torch_dtype" if "torch_dtype" in raw and "dtype" not in raw else "dtype"
    out[key] = name
    return out
