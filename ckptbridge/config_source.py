"""Where an MCore checkpoint's HF config comes from, and the proof that it describes the checkpoint.

A checkpoint ckptbridge wrote carries its HF config (the ckptbridge record). One written by
Megatron-LM's training does not: it has Megatron-LM's ``args`` only. In that case the config comes,
in this order, from ``--hf-config`` (an HF folder or a ``config.json``), else it is synthesized from
the args by the mapping's ``hf_config`` section (the inverse of its ``config`` section), the family
picked by the mappings' ``detect`` expressions or ``--arch``. Either way the config is translated
back into Megatron args and must agree with the checkpoint's own, field by field, so a wrong
config, or a model no mapping can say, is refused naming the field instead of exporting wrongly.
Values the args cannot decide (the unpadded vocabulary, token ids) come from flags, never guesses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import FormatError, OptionError, PlanError, UnsupportedArchitectureError
from .hf_config import read_config, with_dtype
from .mapping.features import MUST_BE_OFF, with_features
from .mapping.registry import MappingRegistry, default_registry
from .mapping.schema import ArchMapping
from .megatron_args import from_megatron_lm
from .spec import ModelSpec

#: Megatron args a mapping derives from the HF config that training may legitimately change
#: (they shape no tensor and no forward computation of the exported model)
TRAINING_CHOICES = frozenset({
    "moe_aux_loss_coeff", "moe_token_dispatcher_type", "moe_grouped_gemm", "moe_router_dtype",
    "max_position_embeddings", "vocab_size",
})

#: HF config fields no Megatron argument holds: written as null unless given (--hf-set)
UNKNOWN_TO_MEGATRON = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass(frozen=True)
class ConfigOptions:
    """What the user said about a checkpoint's HF config (``convert``/``inspect``/``compare`` flags)."""

    hf_config: Path | None = None  # an HF folder (its config, tokenizer and generation config) or a config.json
    arch: str | None = None  # HF architecture (LlamaForCausalLM) or mapping family (llama)
    vocab_size: int | None = None  # the unpadded vocabulary, when the checkpoint stores only the padded one
    hf_set: tuple[tuple[str, Any], ...] = ()  # further HF config fields (token ids...)

    def given(self) -> list[str]:
        """The flags that were set, as the user spells them."""
        return [flag for flag, value in (("--hf-config", self.hf_config), ("--arch", self.arch),
                                          ("--vocab-size", self.vocab_size), ("--hf-set", self.hf_set or None))
                if value is not None]

    def asset_folder(self) -> Path | None:
        """The HF folder whose tokenizer and generation config travel with the export."""
        return self.hf_config if self.hf_config is not None and self.hf_config.is_dir() else None


@dataclass(frozen=True)
class ResolvedConfig:
    spec: ModelSpec
    origin: str  # "ckptbridge record", "--hf-config PATH" or "synthesized from Megatron args (family)"
    notes: tuple[str, ...] = ()  # what the user should know (fields left null...)
    used_options: tuple[str, ...] = ()  # the ConfigOptions flags this config was made from


#: the flags each way of finding the config reads (the others have no effect on it)
FROM_HF_CONFIG = ("--hf-config", "--hf-set")
SYNTHESIZED = ("--arch", "--vocab-size", "--hf-set")


def refuse_unused(options: ConfigOptions | None, iteration: int | None, sources: Mapping[Path, Any]) -> None:
    """Refuse ``--iteration`` and the HF-config flags when they did nothing to any of ``sources`` (path ->
    opened source): an HF folder reads none of them, a checkpoint carrying ckptbridge's record reads only
    ``--hf-config`` (which replaces the record) and ``--hf-set``, ``--hf-config`` makes ``--arch`` and
    ``--vocab-size`` moot."""
    given = (["--iteration"] if iteration is not None else []) + (options.given() if options else [])
    commons = {path: getattr(source, "common", None) for path, source in sources.items()}
    used = {flag for c in commons.values() if c is not None for flag in ("--iteration", *c.used_options)}
    unused = [flag for flag in given if flag not in used]
    if unused:
        why = "; ".join(f"{path} is an HF folder" if c is None else f"{path} has its HF config from: {c.origin}"
                        for path, c in commons.items())
        raise OptionError(f"{'/'.join(unused)} would have no effect: {why}")


def checkpoint_args(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Megatron-LM's ``args`` under ckptbridge's names, with what Megatron-LM's ``validate_args``
    derives filled in the way it derives it (query groups without GQA, kv_channels, expert width)."""
    try:
        args = from_megatron_lm(raw)
    except ValueError as exc:
        raise FormatError(f"checkpoint args disagree with themselves: {exc}") from None
    heads, hidden = args.get("num_attention_heads"), args.get("hidden_size")
    if heads and not args.get("group_query_attention") and not args.get("multi_latent_attention"):
        args["num_query_groups"] = heads
    if args.get("kv_channels") is None and heads and hidden:
        args["kv_channels"] = hidden // heads
    if args.get("num_moe_experts") and args.get("moe_ffn_hidden_size") is None:
        args["moe_ffn_hidden_size"] = args.get("ffn_hidden_size")
    return args


def resolve(raw_args: Mapping[str, Any], record: Any, where: Path, options: ConfigOptions | None = None,
            registry: MappingRegistry | None = None) -> ResolvedConfig:
    """The model of an MCore checkpoint whose ``args`` are ``raw_args`` (``where``: its common file)."""
    options = options or ConfigOptions()
    registry = registry or default_registry()
    if isinstance(record, dict) and "hf_config" in record and options.hf_config is None:
        return ResolvedConfig(ModelSpec.from_stored(record["hf_config"], record["mapping"], record.get("overrides")),
                              "ckptbridge record")
    args = checkpoint_args(raw_args)
    if options.hf_config is not None:
        raw = read_config(options.hf_config)
        raw.update(dict(options.hf_set))
        spec = ModelSpec.from_hf_config(raw, registry)
        check_agrees(spec, args, where, f"--hf-config {options.hf_config}")
        return ResolvedConfig(spec, f"--hf-config {options.hf_config}", used_options=FROM_HF_CONFIG)
    return synthesize(args, where, options, registry)


def synthesize(args: dict[str, Any], where: Path, options: ConfigOptions, registry: MappingRegistry) -> ResolvedConfig:
    env = with_features(args)
    env["vocab_size"] = _vocab_size(args, where, options)
    mappings = [_named(options.arch, registry)] if options.arch else _detected(env, where, registry)
    reasons = []
    for mapping in mappings:
        raw = mapping.synthesize_hf_config(env)
        raw = with_dtype(raw, args["params_dtype"]) if isinstance(args.get("params_dtype"), torch.dtype) else raw
        missing = [f for f in UNKNOWN_TO_MEGATRON if f not in dict(options.hf_set)]
        raw.update({f: None for f in missing})
        raw.update(dict(options.hf_set))
        try:
            spec = ModelSpec.from_hf_config(raw, registry)
            check_agrees(spec, args, where, f"the {mapping.family} mapping")
        except (PlanError, UnsupportedArchitectureError) as exc:
            reasons.append(str(exc))
            continue
        notes = (f"{', '.join(missing)} are not stored by Megatron; written as null (set them with --hf-set "
                 "FIELD=VALUE or pass --hf-config)",) if missing else ()
        return ResolvedConfig(spec, f"synthesized from Megatron args ({mapping.family})", notes, SYNTHESIZED)
    raise UnsupportedArchitectureError(reasons[0] if len(reasons) == 1 else "; ".join(reasons))


def check_agrees(spec: ModelSpec, args: Mapping[str, Any], where: Path, source: str) -> None:
    """Every architectural Megatron argument the HF config implies must equal the checkpoint's, and
    every feature no mapping expresses must be off; the first disagreement is an error naming it."""
    mapping = spec.mapping
    for key, want in spec.args.items():
        if key in TRAINING_CHOICES or key not in args:
            continue
        if not _same(args[key], want, args, key):
            hf_field = mapping.config.get(key)
            raise PlanError(f"{where}: {key} is {args[key]!r} in the checkpoint's args, but {source} implies "
                            f"{want!r} (from HF {hf_field!r}); refusing to export with a config that does not "
                            "describe the checkpoint")
    for key, off in MUST_BE_OFF.items():
        if key not in mapping.config and key in args and not _same(args[key], off, args, key):
            raise UnsupportedArchitectureError(
                f"{where}: the checkpoint's args set {key}={args[key]!r}, which the {mapping.family} mapping cannot "
                "express (no mapping sets it); refusing to export a model that would compute something else")
    padded, vocab = args.get("padded_vocab_size"), spec.args.get("vocab_size")
    if padded is not None and vocab is not None and int(vocab) > int(padded):
        raise PlanError(f"{where}: vocab_size {vocab} from {source} exceeds the checkpoint's padded vocabulary {padded}")


def _same(have: Any, want: Any, args: Mapping[str, Any], key: str = "") -> bool:
    if have is None or want is None:  # unset and off/zero are one thing in Megatron's args
        return (have or None) == (want or None)
    if isinstance(have, (list, tuple)) or isinstance(want, (list, tuple)):
        if key not in PER_LAYER_FREQUENCIES and not (isinstance(have, (list, tuple)) and isinstance(want, (list, tuple))):
            return False
        layers = int(args.get("num_layers") or 0)
        have, want = _per_layer(have, layers, key), _per_layer(want, layers, key)
        return len(have) == len(want) and all(_same(a, b, args) for a, b in zip(have, want))
    if isinstance(have, (int, float)) and isinstance(want, (int, float)):
        return math.isclose(have, want, rel_tol=1e-9, abs_tol=0.0)
    return have == want


#: Megatron arguments that are an int k or a per-layer 0/1 list, and what the int means
PER_LAYER_FREQUENCIES = {
    "moe_layer_freq": "every k-th layer (0, k, 2k...) is MoE",
    "window_attn_skip_freq": "every k-th layer (k-1, 2k-1...) attends to the full context, the others slide",
    "linear_attention_freq": "every k-th layer (k-1, 2k-1...) is full attention, the others linear (1 in the list)",
}


def _per_layer(freq: Any, layers: int, key: str) -> list[Any]:
    """An int-or-list per-layer argument as its list (megatron-core 0.16.1 ``transformer_layer``/``moe``
    semantics, transformer/utils.py ``is_layer_window_attention``: ``moe_layer_freq`` k marks layers 0, k,
    2k as MoE; ``window_attn_skip_freq`` k makes layers k-1, 2k-1 full attention and the others slide,
    and in its list form 1 = sliding window)."""
    if isinstance(freq, (list, tuple)):
        return list(freq)
    k = int(freq)
    if key in ("window_attn_skip_freq", "linear_attention_freq"):
        return [0 if (i + 1) % k == 0 else 1 for i in range(layers)]
    return [1 if i % k == 0 else 0 for i in range(layers)]


def _vocab_size(args: Mapping[str, Any], where: Path, options: ConfigOptions) -> int:
    if options.vocab_size is not None:
        return int(options.vocab_size)
    if args.get("vocab_size") is not None:
        # Megatron-LM's NullTokenizer adds an end-of-document token to --vocab-size
        return int(args["vocab_size"]) + (1 if args.get("tokenizer_type") == "NullTokenizer" else 0)
    raise PlanError(f"{where}: the checkpoint stores only the padded vocabulary (padded_vocab_size="
                    f"{args.get('padded_vocab_size')}); pass --vocab-size N (the tokenizer's vocabulary) or --hf-config")


def _named(arch: str, registry: MappingRegistry) -> ArchMapping:
    return registry.family(arch) if arch in registry.families else registry.for_architecture(arch)


def _detected(env: Mapping[str, Any], where: Path, registry: MappingRegistry) -> list[ArchMapping]:
    found = [registry.family(f) for f in registry.families if registry.family(f).describes(env)]
    if not found:
        shown = {k: env.get(k) for k in ("num_moe_experts", "multi_latent_attention", "qk_layernorm", "add_qkv_bias",
                                          "moe_shared_expert_intermediate_size", "normalization", "swiglu")}
        raise UnsupportedArchitectureError(
            f"{where}: no mapping describes a model with these args ({', '.join(f'{k}={v!r}' for k, v in shown.items())}); "
            f"supported: {', '.join(registry.architectures)} (pass --arch or --hf-config to choose)")
    return found
