"""Read an HF ``config.json`` in either transformers dialect into one flat namespace.

Checkpoints saved by transformers 4 carry ``rope_theta``/``rope_scaling``/
``torch_dtype``; transformers 5 writes ``rope_parameters``/``dtype``. Mapping
files are written against the normalised names below, once, for every family.

No field gets a value here that the config does not hold: a field a config may omit (because
transformers' ``save_pretrained`` leaves out values equal to the class's default) takes the
default the *mapping* says (its ``hf_defaults`` section, copied from that config class), so a
family never inherits another family's default (a Gemma config read through Llama's
defaults would pass the SwiGLU check with ``hidden_act`` silently ``silu``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .dtypes import LONG_NAMES
from .errors import FormatError


#: names one transformers version writes where another writes the other (its ``attribute_map``)
_ALIASES = [("num_experts", "num_local_experts")]

_DTYPES = LONG_NAMES


def read_config(folder: Path) -> dict[str, Any]:
    """The ``config.json`` of an HF folder, or the file itself when ``folder`` is a config file
    (``--hf-config``, ``check-mapping --hf``): a JSON object, else a one-line error naming the file."""
    path = Path(folder) if Path(folder).is_file() else Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FormatError(f"{path}: no config.json; an HF checkpoint folder needs one") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise FormatError(f"{path}: holds a JSON {type(raw).__name__}, not an object")
    return raw


def normalise(raw: dict[str, Any], defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Flatten the rope settings, then fill the fields still absent from ``defaults`` (the mapping's
    ``hf_defaults``); the raw dict is left untouched.

    Per-layer-type rope settings (transformers 5's ``rope_parameters`` keyed by layer type, next to
    ``layer_types``) are not flattened: ``rope_parameters`` stays a dict the mapping reads by type
    (``rope_parameters['full_attention']['rope_theta']``), and ``rope_theta``/``rope_type`` are
    absent unless the config holds them at top level.

    A multimodal config (transformers 5 saves a VLM's language model under ``text_config``) is read
    as its language model's: the ``text_config`` fields over the top-level ones."""
    top, raw = raw, language_model(raw)
    cfg = dict(raw)
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
    per_type = bool(rope) and all(isinstance(v, dict) for v in rope.values())
    if per_type:
        rope = {}
    if "rope_theta" in raw or "rope_theta" in rope:
        cfg["rope_theta"] = raw.get("rope_theta", rope.get("rope_theta"))
    if not per_type:
        cfg["rope_type"] = rope.get("rope_type", rope.get("type", "default")) or "default"
    cfg["rope_factor"] = rope.get("factor")
    cfg["rope_low_freq_factor"] = rope.get("low_freq_factor")
    cfg["rope_high_freq_factor"] = rope.get("high_freq_factor")
    cfg["rope_original_max_position_embeddings"] = rope.get("original_max_position_embeddings")
    for key, value in rope.items():  # every other rope field (yarn's beta_fast, mscale...) as rope_<field>
        cfg.setdefault(f"rope_{key}", value)
    for key, value in (defaults or {}).items():
        cfg.setdefault(key, value)
    # per-layer attention kinds (Ministral, Gemma 2/3...) as megatron's per-layer window list: 1 = sliding
    types = cfg.get("layer_types")
    cfg["sliding_layers"] = [int(t == "sliding_attention") for t in types] if isinstance(types, list) else None
    cfg["architecture"] = architecture(top)
    return cfg


def language_model(raw: dict[str, Any]) -> dict[str, Any]:
    """A config as its language model's: a VLM's ``text_config`` fields (transformers 5 nests them there)
    over the top-level ones; any other config as it is."""
    return {**raw, **raw["text_config"]} if isinstance(raw.get("text_config"), dict) else raw


def architecture(raw: dict[str, Any]) -> str | None:
    """The HF architecture a config names (its first ``architectures`` entry)."""
    return (raw.get("architectures") or [None])[0]


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
