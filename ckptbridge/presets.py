"""Model presets (real HF configs in ``alignment/presets``) and tiny seeded models built from them.

There is no model hub here: examples and tests take a real config, shrink
widths and depth while keeping every structural feature (GQA with several
groups, rope scaling, tied embeddings, biases, q/k norms, explicit head_dim),
fill it with seeded random weights and save it with ``save_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import CkptBridgeError


def presets_dir() -> Path:
    packaged = Path(__file__).resolve().parent / "_data" / "alignment" / "presets"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "alignment" / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.json"))


def convertible_config(preset: dict[str, Any]) -> dict[str, Any]:
    """The preset's real HF config with its ``overrides`` applied: what ckptbridge can convert when the
    real one has a feature megatron-core lacks (Phi-3-mini's 2047-token sliding window). A VLM whose config
    nests its language model (``text_config``) takes the overrides there."""
    cfg, overrides = preset["hf_config"], preset.get("overrides", {})
    if isinstance(cfg.get("text_config"), dict):
        return {**cfg, "text_config": {**cfg["text_config"], **overrides}}
    return {**cfg, **overrides}


def load_preset(name: str) -> dict[str, Any]:
    path = presets_dir() / f"{name}.json"
    if not path.exists():
        raise CkptBridgeError(f"unknown preset {name!r}; known: {', '.join(preset_names())}")
    return json.loads(path.read_text())


def shrink_config(cfg: dict[str, Any], layers: int = 2, hidden: int = 64, heads: int = 8, groups: int = 4,
                  ffn: int = 128, vocab: int = 1001, experts: int = 8, topk: int = 2) -> dict[str, Any]:
    """Small widths, same structure. An explicit ``head_dim`` stays explicit and is made to differ
    from hidden/heads, so the ``kv_channels`` path is exercised. A VLM's nested ``text_config`` is shrunk
    so, and its vision tower to two small blocks."""
    if isinstance(cfg.get("text_config"), dict):
        text = shrink_config(cfg["text_config"], layers, hidden, heads, groups, ffn, vocab, experts, topk)
        return {**cfg, "text_config": text, **({"vision_config": shrink_vision(cfg["vision_config"], hidden)}
                                               if isinstance(cfg.get("vision_config"), dict) else {})}
    out = dict(cfg)
    out.update(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=groups,
               intermediate_size=ffn, vocab_size=vocab)
    if "head_dim" in cfg:
        out["head_dim"] = 2 * hidden // heads
    if "kv_lora_rank" in cfg:  # multi-latent attention: every head has its own K/V, small latent ranks
        out["num_key_value_heads"] = heads
        out.update(kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
        if cfg.get("q_lora_rank") is not None:
            out["q_lora_rank"] = 32
        if cfg.get("n_group", 1) > 1:  # group-limited routing stays group-limited; one group (Kimi-K2) stays one
            out["n_group"], out["topk_group"] = 2, 1
    if "first_k_dense_replace" in cfg:  # DeepSeek, GLM-4.5: one dense layer, then MoE layers
        out["first_k_dense_replace"] = min(cfg["first_k_dense_replace"], 1)
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):  # mixture of experts: fewer, narrower experts
        if key in cfg:
            out[key] = experts
            out["num_experts_per_tok"] = min(topk, cfg.get("num_experts_per_tok") or topk)  # top-1 stays top-1
    if "moe_intermediate_size" in cfg:
        out["moe_intermediate_size"] = ffn // 4
    if "shared_expert_intermediate_size" in cfg:
        out["shared_expert_intermediate_size"] = ffn // 2
    if isinstance(cfg.get("layer_types"), list):  # per-layer attention kinds: the first layers' pattern, a small
        out["layer_types"] = cfg["layer_types"][:layers]  # window, so test sequences are longer than it
        if cfg.get("sliding_window") is not None:
            out["sliding_window"] = min(int(cfg["sliding_window"]), 5)
    if "linear_num_key_heads" in cfg:  # gated delta-net layers: TP-2-divisible heads, 2 value heads per key head
        out.update(linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=16, linear_value_head_dim=16)
    if "full_attention_interval" in cfg:  # a hybrid keeps both kinds of layer: the last of every `layers` is full
        out["full_attention_interval"] = min(int(cfg["full_attention_interval"]), layers)
    if "intermediate_size_mlp" in cfg:  # Llama 4's dense layers, beside its experts' intermediate_size
        out["intermediate_size_mlp"] = 2 * ffn
    for key in ("no_rope_layers",):  # other per-layer lists: the first layers' entries
        if isinstance(cfg.get(key), list) and cfg[key]:
            out[key] = cfg[key][:layers]
    if isinstance(cfg.get("moe_layers"), list):  # layer indices: those that remain
        out["moe_layers"] = [i for i in cfg["moe_layers"] if i < layers]
    rope = out.get("rope_scaling") or out.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get("mrope_section"), list):  # multimodal rope: same proportions
        half, section = out.get("head_dim", hidden // heads) // 2, rope["mrope_section"]  # of the smaller head
        small = [max(1, s * half // sum(section)) for s in section]
        small[-1] += half - sum(small)
        out["rope_scaling" if "rope_scaling" in out else "rope_parameters"] = {**rope, "mrope_section": small}
    if isinstance(cfg.get("vision_config"), dict):  # a VLM's vision tower: tiny, carried through unchanged
        out["vision_config"] = shrink_vision(cfg["vision_config"], hidden)
    if out.get("max_window_layers") is not None:
        out["max_window_layers"] = layers
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in out:
            out[key] = [1, 2] if isinstance(out[key], list) else 1
    return out


def shrink_vision(vision: dict[str, Any], text_hidden: int) -> dict[str, Any]:
    """A vision tower of two blocks and small widths, projecting into the shrunk language model."""
    out = dict(vision)
    for key, value in (("depth", 2), ("num_hidden_layers", 2), ("hidden_size", 32), ("intermediate_size", 64),
                       ("num_heads", 2), ("num_attention_heads", 2)):
        if key in out:
            out[key] = value
    for key in ("out_hidden_size", "vision_output_dim", "projector_input_dim", "projector_output_dim"):
        if key in out:
            out[key] = text_hidden
    if isinstance(out.get("fullatt_block_indexes"), list):
        out["fullatt_block_indexes"] = [1]
    return out


def model_class(config: Any, architecture: str | None) -> Any:
    """The transformers class a model is: the one its config's ``architectures`` names (a VLM's, which
    AutoModelForCausalLM maps to another class or none), else AutoModelForCausalLM's."""
    import transformers
    from transformers import AutoModelForCausalLM

    cls = getattr(transformers, architecture, None) if architecture else None
    if cls is None:
        cls = AutoModelForCausalLM._model_mapping.get(type(config), None)
    if cls is None:
        raise CkptBridgeError(f"transformers has no model class for {type(config).__name__} ({architecture})")
    return cls


def build_tiny_hf(preset: str, out: Path, layers: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32,
                  **shrink: int) -> Path:
    """Save a seeded random HF model of ``preset``'s architecture to ``out``; returns ``out``."""
    from transformers import AutoConfig

    raw = shrink_config(convertible_config(load_preset(preset)), layers=layers, **shrink)
    model_type = raw.pop("model_type")
    architecture = (raw.pop("architectures", None) or [None])[0]
    config = AutoConfig.for_model(model_type, **raw)
    torch.manual_seed(seed)
    model = model_class(config, architecture)._from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.1 if p.dim() == 1 else 0.05
            base = 1.0 if "norm" in name else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=gen))
    model.to(dtype).save_pretrained(out)
    return Path(out)
