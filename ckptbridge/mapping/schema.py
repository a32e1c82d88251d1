"""The in-memory form of one mapping file: rules, sections and the architecture they make up.

A rule names the HF tensor(s), the canonical MCore name (TE spec, global layer
index ``{L}``, global expert index ``{E}``), an optional local-spec name, the
expected HF shapes as expressions over MCore arguments, an invertible
transform and a shard kind. Every concrete name is generated from the plan,
so lookups both ways are dictionary lookups over planned names. The raw YAML
is read and validated into these types by :mod:`ckptbridge.mapping.parse`.

Multi-token-prediction (MTP) blocks are rules with ``place: mtp``: MCore names use
``{M}`` (the MTP depth, ``mtp.layers.{M}.``), HF names ``{L}``, filled with the HF
layer number the block occupies (``num_layers + M``: DeepSeek numbers MTP layers
after the decoder). An MTP block's transformer layer is not spelled out again: the
file's ``mtp`` section says which decoder layer it is built like and how its MCore
prefix is renamed (megatron builds it from the last decoder layer's spec).
"""

from __future__ import annotations

import warnings

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .. import expr
from ..errors import MappingError, UnsupportedArchitectureError
from ..sharding import ShardKind
from .bounds import check_bounds
from ..transform_layout import TakeExpert
from ..transform_op import Shape
from ..transforms import Pipeline
from .ignore import IgnoreRule

LAYER = "{L}"
EXPERT = "{E}"
MTP = "{M}"


@dataclass(frozen=True)
class Alternative:
    """An HF layout the reader may find instead of a rule's own (``alternatives:``): other names
    (transformers 5's ``mlp.gate`` for Mixtral's ``block_sparse_moe.gate``), other shapes and steps
    to the same MCore tensor. Only read, never written: the rule's own layout is what we write.
    A ``shared`` layout (its steps start with ``take_expert``) is one HF tensor per layer that holds
    every expert of a per-expert rule on its first axis."""

    hf: tuple[str, ...]
    shapes: tuple[tuple[str | int, ...], ...] | None  # None: (num_moe_experts, *the rule's MCore shape)
    transform: Pipeline

    @property
    def shared(self) -> bool:
        return isinstance(self.transform.steps[0], TakeExpert)

    def hf_names(self, layer: int | None, expert: int | None = None, mtp: int | None = None) -> list[str]:
        return [_fill(n, layer, None if self.shared else expert, mtp) for n in self.hf]

    def hf_shapes(self, rule: "TensorRule", args: Mapping[str, Any]) -> list[Shape]:
        if self.shapes is None:
            return [(int(args["num_moe_experts"]), *rule.mcore_shape(args))]
        return [tuple(int(expr.evaluate(d, args)) for d in shape) for shape in self.shapes]


@dataclass(frozen=True)
class TensorRule:
    mcore: str
    hf: tuple[str, ...]
    shapes: tuple[tuple[str | int, ...], ...]
    transform: Pipeline
    shard: ShardKind
    local: str
    place: str  # "layer", "first", "last" or "mtp"
    when: str | None = None
    parallel: str = "tp"  # which tensor-parallel size splits it: "tp", or "etp" for routed experts
    dist: str | None = None  # torch_dist key template, when it is not the MCore name
    layers: str | None = None  # which layers have it (an expression over the args and L); None: all
    grouped: str | None = None  # legacy name when experts are grouped (TEGroupedMLP: ...linear_fc1.weight{E})
    alternatives: tuple[Alternative, ...] = ()  # HF layouts the reader may find instead (read only)
    dtype: torch.dtype | None = None  # kept in this dtype whatever --dtype says (e.g. a router bias in fp32)
    mtp_copies: tuple[str, ...] = ()  # HF names (one per MTP block, {L}/{M}) holding exact copies of the HF tensor
    local_shard: ShardKind | None = None  # how the local spec splits it, when not as the TE spec does
    #: torch_dist keys of a ``parts`` tensor: megatron saves each part as its own tensor, ``<key>.<name>``
    #: (GatedDeltaNet's in_proj.weight.query ... .alpha); legacy keeps each rank's parts in one tensor
    dist_parts: tuple[str, ...] = ()

    def resolved(self, args: Mapping[str, Any]) -> "TensorRule":
        """The rule with its shard part sizes evaluated for one model."""
        if not self.shard.part_sizes and not (self.local_shard and self.local_shard.part_sizes):
            return self
        return replace(self, shard=self.shard.resolved(args),
                       local_shard=self.local_shard.resolved(args) if self.local_shard else None)

    def shard_kind(self, layer_spec: str) -> ShardKind:
        """The TP split under a layer spec (``te`` or ``local``): e.g. MLA's down-projections are replicated ``TELinear``s in
        the TE spec but ``ColumnParallelLinear``s in the local one (gpt_layer_specs.py:119-121, 377-379)."""
        return self.local_shard if layer_spec == "local" and self.local_shard is not None else self.shard

    @property
    def per_layer(self) -> bool:
        return self.place == "layer"

    @property
    def per_expert(self) -> bool:
        return EXPERT in self.mcore

    @property
    def shared(self) -> bool:
        """Whether the rule's own HF layout is one tensor per layer holding every expert (its steps
        start with ``take_expert``: gpt-oss's fused experts, the only layout transformers loads)."""
        return isinstance(self.transform.steps[0], TakeExpert)

    def applies(self, args: Mapping[str, Any]) -> bool:
        return self.when is None or bool(expr.evaluate(self.when, args))

    def hf_names(self, layer: int | None, expert: int | None = None, mtp: int | None = None) -> list[str]:
        """HF names; ``layer`` is the HF layer number (for an MTP block: the one it occupies)."""
        return [_fill(n, layer, None if self.shared else expert, mtp) for n in self.hf]

    def mcore_name(self, layer: int | None, layer_spec: str = "te", expert: int | None = None, grouped: bool = False,
                   mtp: int | None = None) -> str:
        """The name in a model's state dict: TE or local layer spec, sequential or grouped experts."""
        if grouped and self.grouped:
            return _fill(self.grouped, layer, expert, mtp)
        return _fill(self.local if layer_spec == "local" else self.mcore, layer, expert, mtp)

    def in_layer(self, layer: int, args: Mapping[str, Any]) -> bool:
        return self.layers is None or bool(expr.evaluate(self.layers, {**args, "L": layer}))

    def dist_key(self, layer: int | None, stacked: bool, mtp: int | None = None) -> str:
        """torch_dist key. In a model whose layers all look alike (``stacked``) per-layer names lose
        their index and gain a leading layer axis; otherwise each layer keeps its own keys, as
        megatron-core writes non-homogeneous models. Experts always gain an expert axis. MTP
        blocks are never stacked (megatron passes them no layer offset)."""
        template = self.dist or self.mcore
        if self.place == "mtp":
            return _fill(template, None, None, mtp)
        return layer_key(template, layer, stacked) if self.per_layer else template

    def hf_shapes(self, args: Mapping[str, Any]) -> list[Shape]:
        return [tuple(int(expr.evaluate(d, args)) for d in shape) for shape in self.shapes]

    def mcore_shape(self, args: Mapping[str, Any]) -> Shape:
        return tuple(self.transform.mcore_shape(self.hf_shapes(args), args))


def layer_key(template: str, layer: int, stacked: bool) -> str:
    """A per-layer name in torch_dist: without its index when layers are stacked on an axis, else filled in."""
    return template.replace("." + LAYER + ".", ".") if stacked else template.replace(LAYER, str(layer))


def _fill(template: str, layer: int | None, expert: int | None = None, mtp: int | None = None) -> str:
    for key, value in ((LAYER, layer), (EXPERT, expert), (MTP, mtp)):
        if key in template:
            if value is None:
                raise MappingError(f"{template}: needs a value for {key}")
            template = template.replace(key, str(value))
    return template


@dataclass(frozen=True)
class ConfigCheck:
    when: str
    error: str  # the message (for a ``warnings:`` entry: the warning text)


class MappingWarning(UserWarning):
    """A config that converts, but that the target megatron-core computes differently from HF
    (a ``warnings:`` entry of the mapping file); ``ckptbridge convert`` prints it as one line."""


@dataclass(frozen=True)
class ExtraState:
    """A module whose ``_extra_state`` MCore saves (``None`` for local and fresh TE modules)."""

    module: str  # state-dict module name ({L} local layer, {E} local expert in a rank's file, {M} MTP depth)
    place: str  # "layer", "last" or "mtp"
    legacy_only: bool = False
    dist: str | None = None  # torch_dist module name, when it differs (routed experts)
    layers: str | None = None  # which layers have it, as for tensor rules

    def in_layer(self, layer: int, args: Mapping[str, Any]) -> bool:
        return self.layers is None or bool(expr.evaluate(self.layers, {**args, "L": layer}))


@dataclass(frozen=True)
class MtpSection:
    """A file's ``mtp:`` section: how many multi-token-prediction blocks there are and how their
    transformer layer is derived from a decoder layer's rules (megatron builds it from the last
    decoder layer's spec, multi_token_prediction.py / gpt_layer_specs.py:700, so the rules that
    layer has are the ones the block has, under ``mtp.layers.{M}.transformer_layer.``)."""

    depth: str  # args expression: the number of MTP blocks (0 or None: none)
    like: str  # args expression: the decoder layer whose rules the MTP transformer layer takes
    rename: tuple[tuple[str, str], ...]  # MCore prefix of that layer -> MTP transformer-layer prefix
    optional: bool = False  # a checkpoint may lack every MTP tensor (transformers' save_pretrained drops them)
    #: HF prefix of that layer -> the MTP block's HF prefix, when the checkpoint names its MTP layer apart from the
    #: decoder's (Qwen3-Next's ``mtp.layers.{M}.``); empty: HF names kept, ``{L}`` = the layer the block occupies
    hf_rename: tuple[tuple[str, str], ...] = ()

    def count(self, args: Mapping[str, Any]) -> int:
        return int(expr.evaluate(self.depth, args) or 0)

    def _rename(self, name: str | None) -> str | None:
        if name is None:
            return None
        for old, new in self.rename:
            if name.startswith(old):
                return new + name[len(old):]
        raise MappingError(f"mtp: {name!r} does not start with any renamed prefix {[o for o, _ in self.rename]}")

    def _hf(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """HF names under ``hf_rename`` (kept when it is empty)."""
        if not self.hf_rename:
            return names
        out = []
        for name in names:
            old, new = next(((o, n) for o, n in self.hf_rename if name.startswith(o)), (None, None))
            if old is None:
                raise MappingError(f"mtp: HF name {name!r} does not start with any renamed prefix "
                                   f"{[o for o, _ in self.hf_rename]}")
            out.append(new + name[len(old):])
        return tuple(out)

    def derive_rules(self, rules: Sequence[TensorRule], args: Mapping[str, Any]) -> list[TensorRule]:
        """The MTP transformer layer's rules: the ``like`` layer's, MCore names renamed, HF names kept
        (their ``{L}`` is filled with the HF layer number the MTP block occupies) or renamed by ``hf_rename``."""
        like = int(expr.evaluate(self.like, args))
        return [replace(r, mcore=self._rename(r.mcore), local=self._rename(r.local), dist=self._rename(r.dist),
                        grouped=self._rename(r.grouped), place="mtp", layers=None, hf=self._hf(r.hf),
                        alternatives=tuple(replace(a, hf=self._hf(a.hf)) for a in r.alternatives))
                for r in rules if r.per_layer and r.in_layer(like, args)]

    def derive_extra(self, extras: Sequence[ExtraState], args: Mapping[str, Any]) -> list[ExtraState]:
        like = int(expr.evaluate(self.like, args))
        return [replace(e, module=self._rename(e.module), dist=self._rename(e.dist), place="mtp", layers=None)
                for e in extras if e.place == "layer" and e.in_layer(like, args)]


@dataclass(frozen=True)
class ArchMapping:
    family: str
    architectures: tuple[str, ...]
    description: str
    config: dict[str, str | int | float | bool]
    checks: tuple[ConfigCheck, ...]
    tensors: tuple[TensorRule, ...]
    extra_state: tuple[ExtraState, ...]
    source: str
    mtp: MtpSection | None = None
    hf_config: dict[str, Any] = field(default_factory=dict)  # Megatron args -> HF config.json fields
    detect: str | None = None  # over Megatron args: this family describes a checkpoint that has no HF config
    warnings: tuple[ConfigCheck, ...] = ()
    ignore: tuple[IgnoreRule, ...] = ()  # HF tensors that are not weights, dropped once proven redundant
    fp8_keep: tuple[str, ...] = ()  # 2-D per-layer HF weights that block-scaled FP8 checkpoints keep unquantized
    hf_defaults: dict[str, Any] = field(default_factory=dict)  # values an HF config of this class may omit
    carry: tuple[str, ...] = ()  # HF name patterns GPTModel has no place for, carried unchanged (a vision tower)
    hf_config_nest: dict[str, Any] | None = None  # {under: key, top: {field: expr}}: hf_config nested (a VLM's)

    def mtp_depth(self, args: Mapping[str, Any]) -> int:
        return self.mtp.count(args) if self.mtp else 0

    def translate_config(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        """Normalised HF config -> Megatron-LM arguments; refuses unsupported features first."""
        for check in self.checks:
            try:
                failed = expr.evaluate(check.when, hf)
            except expr.UnknownName as exc:
                raise UnsupportedArchitectureError(f"{self.family}: config has no field {exc.name!r} needed by a check") from None
            if failed:
                raise UnsupportedArchitectureError(f"{self.family}: " + check.error.format_map(_Lenient(hf)))
        for note in self.warnings:
            try:
                hit = expr.evaluate(note.when, hf)
            except expr.UnknownName:  # the (optional) field the warning is about is absent: nothing to warn about
                hit = False
            if hit:
                warnings.warn(MappingWarning(f"{self.family}: " + note.error.format_map(_Lenient(hf))), stacklevel=2)
        out: dict[str, Any] = {}
        for key, source in self.config.items():
            try:
                out[key] = expr.evaluate(source, hf)
            except expr.UnknownName as exc:
                raise UnsupportedArchitectureError(
                    f"{self.family}: config.json has no field {exc.name!r} (needed for {key})"
                ) from None
            except (TypeError, ValueError, ArithmeticError) as exc:  # a value of the wrong type in config.json
                raise UnsupportedArchitectureError(
                    f"{self.family}: config.json value for {key} ({source!r}) cannot be computed: {exc}") from None
        check_bounds(out, f"{self.family}: config.json", self.config)
        return out

    def describes(self, args: Mapping[str, Any]) -> bool:
        """Whether a Megatron checkpoint with these args is of this family (``detect``; without one,
        the family is only chosen by name)."""
        try:
            return self.detect is not None and bool(expr.evaluate(self.detect, args))
        except expr.UnknownName:
            return False

    def synthesize_hf_config(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """The HF ``config.json`` fields these Megatron args imply (the ``hf_config`` section: the
        inverse of ``config``). Lists come out as lists, as JSON has them; a field given as YAML
        ``null`` (not the expression ``None``) is left out: an included family's field this one lacks."""
        if not self.hf_config:
            raise UnsupportedArchitectureError(f"{self.family}: the mapping has no hf_config section (Megatron -> HF)")
        out = self._fields(self.hf_config, args)
        nest = self.hf_config_nest
        if nest is not None:  # a VLM's config: the language model's fields under one key, a few beside it
            return {**self._fields(nest["top"], args), nest["under"]: out}
        return out

    def _fields(self, fields: Mapping[str, Any], args: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, source in fields.items():
            if source is None:
                continue
            try:
                out[key] = _jsonable(expr.evaluate(source, args))
            except expr.UnknownName as exc:
                raise UnsupportedArchitectureError(
                    f"{self.family}: the checkpoint's args have no {exc.name!r} (needed for HF field {key})") from None
        return out

    def rules_for(self, args: Mapping[str, Any]) -> list[TensorRule]:
        """The rules that apply to a model: without MTP blocks, no ``place: mtp`` rule; with them,
        also the rules derived for their transformer layer."""
        rules = [r.resolved(args) for r in self.tensors
                 if r.applies(args) and (r.place != "mtp" or self.mtp_depth(args))]
        if self.mtp and self.mtp_depth(args):
            rules += self.mtp.derive_rules(rules, args)
        return rules

    def extra_state_for(self, args: Mapping[str, Any]) -> list[ExtraState]:
        extras = [e for e in self.extra_state if e.place != "mtp" or self.mtp_depth(args)]
        if self.mtp and self.mtp_depth(args):
            extras += self.mtp.derive_extra(extras, args)
        return extras


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


class _Lenient(dict):
    def __missing__(self, key: str) -> str:
        return f"<{key}?>"
