"""A model's identity: its HF config, its mapping, its Megatron arguments, and the
ordered list of canonical tensors every conversion walks.

The canonical form of a tensor is MCore's *global* tensor (all TP shards
joined, vocabulary unpadded, TE-spec name, global layer index). Readers
produce it and writers consume it, so any source pairs with any destination.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .errors import MappingError
from .hf_config import architecture, normalise
from .layout import DEFAULT_VOCAB_DIVISIBLE_BY, ParallelLayout, padded_vocab_size
from .mapping.registry import MappingRegistry, build_mapping, default_registry
from .mapping.schema import EXPERT, ArchMapping, ExtraState, TensorRule
from .sharding import pad_rows
from .transform_op import Shape

@dataclass(frozen=True)
class PlannedTensor:
    """One canonical tensor and where it comes from / goes to on each side."""

    rule: TensorRule
    layer: int | None
    expert: int | None
    mcore_name: str  # its name in the MCore state dict (TE layer spec; see TensorRule.mcore_name for others)
    hf_names: tuple[str, ...]
    hf_shapes: tuple[Shape, ...]
    shape: Shape
    mtp: int | None = None  # MTP depth of a ``place: mtp`` tensor (then ``layer`` is None)
    hf_layer: int | None = None  # HF layer number: ``layer``, or the one an MTP block occupies
    hf_copies: tuple[str, ...] = ()  # HF tensors that must be (and are written as) exact copies of hf_names[0]

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



class ExtraStateAt(NamedTuple):
    """One ``_extra_state`` entry: its module, global layer, global expert and MTP depth."""

    extra: ExtraState
    layer: int | None
    expert: int | None
    mtp: int | None = None


#: the Megatron-LM argument that counts MTP blocks
MTP_ARG = "mtp_num_layers"


def _with_family_defaults(mapping: ArchMapping) -> ArchMapping:
    from dataclasses import replace

    registry = default_registry()
    if mapping.family not in registry.families:
        return mapping
    return replace(mapping, hf_defaults=dict(registry.family(mapping.family).hf_defaults))


@dataclass
class ModelSpec:
    mapping: ArchMapping
    hf_config: dict[str, Any]  # the raw config.json, exactly as read
    args: dict[str, Any]  # Megatron-LM argument names (no layout)
    mapping_data: dict[str, Any] = field(default_factory=dict)  # resolved mapping file, travels with MCore checkpoints
    overrides: dict[str, Any] = field(default_factory=dict)  # args the checkpoint's content decided (travel too)

    @classmethod
    def from_hf_config(cls, raw: dict[str, Any], registry: MappingRegistry | None = None) -> "ModelSpec":
        registry = registry or default_registry()
        mapping = registry.for_architecture(architecture(raw))
        return cls(mapping, raw, mapping.translate_config(normalise(raw, mapping.hf_defaults)),
                   registry.resolved_dict(mapping.family))

    @classmethod
    def from_stored(cls, hf_config: dict[str, Any], mapping_data: dict[str, Any],
                    overrides: Mapping[str, Any] | None = None) -> "ModelSpec":
        """Rebuild from what an MCore checkpoint carries, with the mapping it was written with."""
        mapping = build_mapping(mapping_data, f"mapping stored in checkpoint ({mapping_data.get('family')})")
        if "hf_defaults" not in mapping_data:  # written before mappings said their defaults: the family's own
            mapping = _with_family_defaults(mapping)
        overrides = dict(overrides or {})
        args = {**mapping.translate_config(normalise(hf_config, mapping.hf_defaults)), **overrides}
        return cls(mapping, hf_config, args, mapping_data, overrides)

    @property
    def num_layers(self) -> int:
        return int(self.args["num_layers"])

    @property
    def mtp_depth(self) -> int:
        """Multi-token-prediction blocks this model carries (0: none)."""
        return self.mapping.mtp_depth(self.args)

    def without_mtp(self) -> "ModelSpec":
        """The same model without its MTP blocks: what a checkpoint that lacks every MTP tensor holds
        (transformers' ``save_pretrained`` drops them but keeps ``num_nextn_predict_layers``). The
        override travels in MCore checkpoints, so the way back to HF writes none either."""
        overrides = {**self.overrides, MTP_ARG: None}
        return ModelSpec(self.mapping, self.hf_config, {**self.args, **overrides}, self.mapping_data, overrides)

    def for_source(self, present: set[str]) -> "ModelSpec":
        """This spec, or `without_mtp` when the mapping makes MTP optional and ``present`` (the
        source's tensor names) holds none of the MTP blocks' HF tensors. Partly present MTP blocks
        stay expected, so the strict checks name what is missing. Only the MTP blocks are planned
        here: the source plans the whole model once, with the spec this returns."""
        mtp = self.mapping.mtp
        if not (mtp and mtp.optional and self.mtp_depth):
            return self
        rules = self.rules()
        names: set[str] = set()
        for pt in self._mtp_blocks(rules):
            names.update(pt.hf_names)
            for alt in pt.rule.alternatives:
                names.update(alt.hf_names(pt.hf_layer, pt.expert, pt.mtp))
        for r in rules:  # the copies first/last tensors keep in each MTP block (mtp_copies: first/last rules only)
            names.update(self._copies(r))
        return self if names & present else self.without_mtp()

    def rules(self) -> list[TensorRule]:
        return self.mapping.rules_for(self.args)

    def planned(self) -> list[PlannedTensor]:
        """All canonical tensors in write order: first-stage globals, layers, last-stage globals."""
        rules = self.rules()
        out = [self._plan(r, None) for r in rules if r.place == "first"]
        experts = int(self.args.get("num_moe_experts") or 0)
        for layer in range(self.num_layers):
            for r in rules:
                if not r.per_layer or not r.in_layer(layer, self.args):
                    continue
                if r.per_expert:
                    out += [self._plan(r, layer, e) for e in range(experts)]
                else:
                    out.append(self._plan(r, layer))
        out += self._mtp_blocks(rules)  # megatron keeps MTP blocks after the decoder, on the last stage
        out += [self._plan(r, None) for r in rules if r.place == "last"]
        if not self.stacked or self.mtp_depth:
            hf_all = [n for pt in out if not pt.rule.shared or not pt.expert  # a fused-experts tensor: once
                      for n in (*pt.hf_names, *pt.hf_copies)]
            for side, names in (("HF", hf_all), ("MCore", [pt.mcore_name for pt in out])):
                if len(set(names)) != len(names):
                    dup = next(n for n in names if names.count(n) > 1)
                    raise MappingError(f"{self.mapping.source}: {side} tensor {dup!r} is produced by two rules")
        return out

    def _mtp_blocks(self, rules: list[TensorRule]) -> list[PlannedTensor]:
        """The MTP blocks' tensors, block by block."""
        experts = int(self.args.get("num_moe_experts") or 0)
        out: list[PlannedTensor] = []
        for depth in range(self.mtp_depth):
            for r in rules:
                if r.place == "mtp":
                    out += ([self._plan(r, None, e, depth) for e in range(experts)] if r.per_expert
                            else [self._plan(r, None, None, depth)])
        return out

    def _copies(self, rule: TensorRule) -> tuple[str, ...]:
        """The HF names of ``rule``'s copies in the MTP blocks (``mtp_copies``, one per block)."""
        return tuple(c.replace("{L}", str(self.num_layers + d)).replace("{M}", str(d))
                     for d in range(self.mtp_depth) for c in rule.mtp_copies)

    def extra_states(self) -> list[ExtraStateAt]:
        """Every (module, global layer, global expert, MTP depth) whose empty ``_extra_state`` MCore saves."""
        experts = int(self.args.get("num_moe_experts") or 0)
        out: list[ExtraStateAt] = []
        for extra in self.mapping.extra_state_for(self.args):
            per_expert = range(experts) if EXPERT in extra.module else [None]
            if extra.place == "last":
                out.append(ExtraStateAt(extra, None, None))
            elif extra.place == "mtp":
                out += [ExtraStateAt(extra, None, e, d) for d in range(self.mtp_depth) for e in per_expert]
            else:
                out += [ExtraStateAt(extra, layer, e) for layer in range(self.num_layers)
                        if extra.in_layer(layer, self.args) for e in per_expert]
        return out

    @property
    def stacked(self) -> bool:
        """Whether every layer has the same tensors (torch_dist then stacks them on a layer axis)."""
        return all(r.layers is None for r in self.rules())

    def _plan(self, rule: TensorRule, layer: int | None, expert: int | None = None, mtp: int | None = None) -> PlannedTensor:
        shapes = tuple(rule.hf_shapes(self.args))
        hf_layer = self.num_layers + mtp if mtp is not None else layer
        copies = self._copies(rule)
        return PlannedTensor(
            rule=rule,
            layer=layer,
            expert=expert,
            mcore_name=rule.mcore_name(layer, expert=expert, mtp=mtp),
            hf_names=tuple(rule.hf_names(hf_layer, expert, mtp)),
            hf_shapes=shapes,
            shape=tuple(rule.transform.mcore_shape(shapes, self.args)),
            mtp=mtp,
            hf_layer=hf_layer,
            hf_copies=copies,
        )

    def megatron_args(self, layout: ParallelLayout, dtype: torch.dtype, layer_spec: str, ckpt_format: str,
                      vocab_divisible_by: int = DEFAULT_VOCAB_DIVISIBLE_BY, grouped_gemm: bool = False) -> dict[str, Any]:
        """Everything a Megatron-LM trainer needs to rebuild this model at this layout."""
        layout.check_divides(self.args)
        layout.chunks(self.num_layers)  # raises LayoutError on a layer split that does not fit
        return {
            **self.args,
            **layout.to_args(),
            "make_vocab_size_divisible_by": vocab_divisible_by,
            "padded_vocab_size": padded_vocab_size(self.args["vocab_size"], vocab_divisible_by, layout.tp),
            "transformer_impl": "transformer_engine" if layer_spec == "te" else "local",
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

