"""A model's identity: its HF config, its mapping, its Megatron arguments, and the
ordered list of canonical tensors every conversion walks.

The canonical form of a tensor is MCore's *global* tensor (all TP shards
joined, vocabulary unpadded, TE-spec name, global layer index). Readers
produce it and writers consume it, so any source pairs with any destination.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import MappingError
from .hf_config import normalise
from .layout import ParallelLayout, padded_vocab_size
from .mapping.registry import MappingRegistry, build_mapping, default_registry
from .mapping.schema import EXPERT, ArchMapping, ExtraState, TensorRule
from .sharding import pad_rows
from .transforms import Shape

DEFAULT_VOCAB_DIVISIBLE_BY = 128


@dataclass(frozen=True)
class PlannedTensor:
    """One canonical tensor and where it comes from / goes to on each side."""

    rule: TensorRule
    layer: int | None
    expert: int | None
    mcore: str
    hf_names: tuple[str, ...]
    hf_shapes: tuple[Shape, ...]
    shape: Shape

    def stored_shape(self, margs: Mapping[str, Any]) -> Shape:
        """The global shape MCore stores: the vocabulary padded to ``padded_vocab_size``."""
        return (int(margs["padded_vocab_size"]), *self.shape[1:]) if self.rule.shard.padded else self.shape

    def to_stored(self, canonical: torch.Tensor, margs: Mapping[str, Any]) -> torch.Tensor:
        return pad_rows(canonical, int(margs["padded_vocab_size"])) if self.rule.shard.padded else canonical

    def from_stored(self, stored: torch.Tensor) -> torch.Tensor:
        """Drop MCore's vocabulary padding rows; they never enter the canonical form."""
        return stored[: self.shape[0]] if self.rule.shard.padded else stored

    def dtype(self, default: torch.dtype) -> torch.dtype:
        """The dtype this tensor is stored in: the rule's pinned dtype, else the conversion's."""
        return self.rule.dtype or default



@dataclass
class ModelSpec:
    mapping: ArchMapping
    hf_config: dict[str, Any]  # the raw config.json, exactly as read
    args: dict[str, Any]  # Megatron-LM argument names (no layout)
    mapping_data: dict[str, Any] = field(default_factory=dict)  # resolved mapping file, travels with MCore checkpoints

    @classmethod
    def from_hf_config(cls, raw: dict[str, Any], registry: MappingRegistry | None = None) -> "ModelSpec":
        registry = registry or default_registry()
        norm = normalise(raw)
        mapping = registry.for_architecture(norm["architecture"])
        return cls(mapping, raw, mapping.translate_config(norm), registry.resolved_dict(mapping.family))

    @classmethod
    def from_stored(cls, hf_config: dict[str, Any], mapping_data: dict[str, Any]) -> "ModelSpec":
        """Rebuild from what an MCore checkpoint carries, with the mapping it was written with."""
        mapping = build_mapping(mapping_data, f"mapping stored in checkpoint ({mapping_data.get('family')})")
        return cls(mapping, hf_config, mapping.translate_config(normalise(hf_config)), mapping_data)

    @property
    def num_layers(self) -> int:
        return int(self.args["num_layers"])

    def rules(self) -> list[TensorRule]:
        return self.mapping.rules_for(self.args)

    def planned(self) -> list[PlannedTensor]:
        """All canonical tensors in write order: first-stage globals, layers, last-stage globals."""
        rules = self.rules()
        out = [self._plan(r, None) for r in rules if r.place == "first"]
        experts = int(self.args.get("num_moe_experts") or 0)
        for layer in range(self.num_layers):
            for r in rules:
                if r.per_layer and not r.in_layer(layer, self.args):
                    continue
                if r.per_expert:
                    out += [self._plan(r, layer, e) for e in range(experts)]
                elif r.per_layer:
                    out.append(self._plan(r, layer))
        out += [self._plan(r, None) for r in rules if r.place == "last"]
        if not self.stacked:
            for side, names in (("HF", [n for pt in out for n in pt.hf_names]), ("MCore", [pt.mcore for pt in out])):
                if len(set(names)) != len(names):
                    dup = next(n for n in names if names.count(n) > 1)
                    raise MappingError(f"{self.mapping.source}: {side} tensor {dup!r} is produced by two rules")
        return out

    def extra_states(self) -> list[tuple[ExtraState, int | None, int | None]]:
        """Every (module, global layer, global expert) whose empty ``_extra_state`` MCore saves."""
        experts = int(self.args.get("num_moe_experts") or 0)
        out: list[tuple[ExtraState, int | None, int | None]] = []
        for extra in self.mapping.extra_state:
            if extra.place != "layer":
                out.append((extra, None, None))
                continue
            for layer in range(self.num_layers):
                if extra.in_layer(layer, self.args):
                    out += [(extra, layer, e) for e in range(experts)] if EXPERT in extra.module else [(extra, layer, None)]
        return out

    @property
    def stacked(self) -> bool:
        """Whether every layer has the same tensors (torch_dist then stacks them on a layer axis)."""
        return all(r.layers is None for r in self.rules())

    def _plan(self, rule: TensorRule, layer: int | None, expert: int | None = None) -> PlannedTensor:
        shapes = tuple(rule.hf_shapes(self.args))
        return PlannedTensor(
            rule=rule,
            layer=layer,
            expert=expert,
            mcore=rule.mcore_name(layer, expert=expert),
            hf_names=tuple(rule.hf_names(layer, expert)),
            hf_shapes=shapes,
            shape=tuple(rule.transform.mcore_shape(shapes, self.args)),
        )

    def megatron_args(self, layout: ParallelLayout, dtype: torch.dtype, spec: str, ckpt_format: str,
                      vocab_divisible_by: int = DEFAULT_VOCAB_DIVISIBLE_BY, grouped_gemm: bool = False) -> dict[str, Any]:
        """Everything a Megatron-LM trainer needs to rebuild this model at this layout."""
        layout.check_divides(self.args)
        layout.chunks(self.num_layers)  # raises LayoutError on a layer split that does not fit
        return {
            **self.args,
            **layout.to_args(),
            "make_vocab_size_divisible_by": vocab_divisible_by,
            "padded_vocab_size": padded_vocab_size(self.args["vocab_size"], vocab_divisible_by, layout.tp),
            "transformer_impl": "transformer_engine" if spec == "te" else "local",
            "params_dtype": dtype,
            "bf16": dtype == torch.bfloat16,
            "fp16": dtype == torch.float16,
            "ckpt_format": ckpt_format,
            "moe_grouped_gemm": bool(grouped_gemm and self.args.get("num_moe_experts")),
            "seq_length": min(int(self.args.get("max_position_embeddings") or 4096), 4096),
            "num_layers_per_virtual_pipeline_stage": (
                self.num_layers // (layout.pp * layout.vpp) if layout.vpp else None
            ),
        }

