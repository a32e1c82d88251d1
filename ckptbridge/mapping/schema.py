"""The in-memory form of one mapping file, validated when it is loaded.

A rule names the HF tensor(s), the canonical MCore name (TE spec, global layer
index ``{L}``, global expert index ``{E}``), an optional local-spec name, the
expected HF shapes as expressions over MCore arguments, an invertible
transform and a shard kind. Every concrete name is generated from the plan,
so lookups both ways are dictionary lookups over planned names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import expr
from ..errors import MappingError, UnsupportedArchitectureError
from ..sharding import ShardKind, get_kind
from ..transforms import Shape, Transform, check_round_trip, get_transform

LAYER = "{L}"
EXPERT = "{E}"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: small config used to prove each rule's transform invertible when a file loads
PROBE_ARGS: dict[str, Any] = {
    "hidden_size": 8,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "kv_channels": 3,
    "ffn_hidden_size": 6,
    "vocab_size": 10,
    "padded_vocab_size": 16,
    "num_layers": 2,
    "num_moe_experts": 4,
    "moe_ffn_hidden_size": 4,
    "moe_shared_expert_intermediate_size": 6,
}


@dataclass(frozen=True)
class TensorRule:
    mcore: str
    hf: tuple[str, ...]
    shapes: tuple[tuple[str | int, ...], ...]
    transform: Transform
    shard: ShardKind
    local: str
    place: str  # "layer", "first" or "last"
    when: str | None = None
    parallel: str = "tp"  # which tensor-parallel size splits it: "tp", or "etp" for routed experts
    dist: str | None = None  # torch_dist key template, when it is not the MCore name
    layers: str | None = None  # which layers have it (an expression over the args and L); None: all
    grouped: str | None = None  # legacy name when experts are grouped (TEGroupedMLP: ...linear_fc1.weight{E})
    hf_fused: str | None = None  # HF tensor holding every expert's MCore tensor on a leading axis (transformers 5)
    hf_alt: tuple[str, ...] = ()  # the same HF tensors under the names another transformers layout uses
    dtype: torch.dtype | None = None  # kept in this dtype whatever --dtype says (e.g. a router bias in fp32)

    @property
    def per_layer(self) -> bool:
        return self.place == "layer"

    @property
    def per_expert(self) -> bool:
        return EXPERT in self.mcore

    def applies(self, args: Mapping[str, Any]) -> bool:
        return self.when is None or bool(expr.evaluate(self.when, args))

    def hf_names(self, layer: int | None, expert: int | None = None) -> list[str]:
        return [_fill(n, layer, expert) for n in self.hf]

    def hf_alt_names(self, layer: int | None, expert: int | None = None) -> list[str]:
        return [_fill(n, layer, expert) for n in self.hf_alt]

    def mcore_name(self, layer: int | None, spec: str = "te", expert: int | None = None, grouped: bool = False) -> str:
        """The name in a model's state dict: TE or local spec, sequential or grouped experts."""
        if grouped and self.grouped:
            return _fill(self.grouped, layer, expert)
        return _fill(self.local if spec == "local" else self.mcore, layer, expert)

    def in_layer(self, layer: int, args: Mapping[str, Any]) -> bool:
        return self.layers is None or bool(expr.evaluate(self.layers, {**args, "L": layer}))

    def dist_key(self, layer: int | None, stacked: bool) -> str:
        """torch_dist key. In a model whose layers all look alike (``stacked``) per-layer names lose
        their index and gain a leading layer axis; otherwise each layer keeps its own keys, as
        megatron-core writes non-homogeneous models. Experts always gain an expert axis."""
        template = self.dist or self.mcore
        return layer_key(template, layer, stacked) if self.per_layer else template

    def hf_shapes(self, args: Mapping[str, Any]) -> list[Shape]:
        return [tuple(int(expr.evaluate(d, args)) for d in shape) for shape in self.shapes]

    def mcore_shape(self, args: Mapping[str, Any]) -> Shape:
        return tuple(self.transform.mcore_shape(self.hf_shapes(args), args))


def layer_key(template: str, layer: int, stacked: bool) -> str:
    """A per-layer name in torch_dist: without its index when layers are stacked on an axis, else filled in."""
    return template.replace("." + LAYER + ".", ".") if stacked else template.replace(LAYER, str(layer))


def _fill(template: str, layer: int | None, expert: int | None = None) -> str:
    for key, value in ((LAYER, layer), (EXPERT, expert)):
        if key in template:
            if value is None:
                raise MappingError(f"{template}: needs a value for {key}")
            template = template.replace(key, str(value))
    return template


@dataclass(frozen=True)
class ConfigCheck:
    when: str
    error: str


@dataclass(frozen=True)
class ExtraState:
    """A module whose ``_extra_state`` MCore saves (``None`` for local and fresh TE modules)."""

    module: str  # state-dict module name ({L} local layer, {E} local expert in a rank's file)
    place: str  # "layer" or "last"
    legacy_only: bool = False
    dist: str | None = None  # torch_dist module name, when it differs (routed experts)
    layers: str | None = None  # which layers have it, as for tensor rules

    def in_layer(self, layer: int, args: Mapping[str, Any]) -> bool:
        return self.layers is None or bool(expr.evaluate(self.layers, {**args, "L": layer}))


def parse_extra_state(raw: Mapping[str, Any], where: str) -> ExtraState:
    unknown = set(raw) - {"module", "place", "legacy_only", "dist", "layers"}
    if unknown or "module" not in raw:
        raise MappingError(f"{where}: needs 'module' (and optionally place, legacy_only, dist, layers); unknown {sorted(unknown)}")
    place = raw.get("place", "layer")
    if (LAYER in raw["module"]) != (place == "layer") or place not in ("layer", "last"):
        raise MappingError(f"{where}: per-layer modules (and only they) use {LAYER}; place is layer or last")
    return ExtraState(raw["module"], place, bool(raw.get("legacy_only", False)), raw.get("dist"), raw.get("layers"))


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

    def translate_config(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        """Normalised HF config -> Megatron-LM arguments; refuses unsupported features first."""
        for check in self.checks:
            try:
                failed = expr.evaluate(check.when, hf)
            except expr.UnknownName as exc:
                raise UnsupportedArchitectureError(f"{self.family}: config has no field {exc.name!r} needed by a check") from None
            if failed:
                raise UnsupportedArchitectureError(f"{self.family}: " + check.error.format_map(_Lenient(hf)))
        out: dict[str, Any] = {}
        for key, source in self.config.items():
            try:
                out[key] = expr.evaluate(source, hf)
            except expr.UnknownName as exc:
                raise UnsupportedArchitectureError(
                    f"{self.family}: config.json has no field {exc.name!r} (needed for {key})"
                ) from None
        return out

    def rules_for(self, args: Mapping[str, Any]) -> list[TensorRule]:
        return [r for r in self.tensors if r.applies(args)]


class _Lenient(dict):
    def __missing__(self, key: str) -> str:
        return f"<{key}?>"


def parse_rule(raw: Mapping[str, Any], where: str) -> TensorRule:
    unknown = set(raw) - {"mcore", "hf", "shapes", "transform", "shard", "local", "place", "when", "parallel", "dist",
                          "layers", "dtype", "grouped", "hf_fused", "hf_alt"}
    if unknown:
        raise MappingError(f"{where}: unknown rule field(s) {sorted(unknown)}")
    for key in ("mcore", "hf", "shapes", "shard"):
        if key not in raw:
            raise MappingError(f"{where}: rule needs {key!r}")
    hf = (raw["hf"],) if isinstance(raw["hf"], str) else tuple(raw["hf"])
    shapes = tuple(tuple(s) for s in raw["shapes"])
    transform = get_transform(raw.get("transform", "identity"))
    try:
        shard = get_kind(raw["shard"])
    except KeyError:
        raise MappingError(f"{where}: unknown shard kind {raw['shard']!r}") from None
    place = raw.get("place", "layer")
    mcore, local = raw["mcore"], raw.get("local", raw["mcore"])
    if place not in ("layer", "first", "last"):
        raise MappingError(f"{where}: place must be layer, first or last, not {place!r}")
    names = (mcore, local, *hf)
    if any((LAYER in n) != (place == "layer") for n in names):
        raise MappingError(f"{where}: per-layer rules (and only they) must use {LAYER} in every name")
    if any((EXPERT in n) != (EXPERT in mcore) for n in names) or (EXPERT in mcore and place != "layer"):
        raise MappingError(f"{where}: per-expert rules (and only they) must use {EXPERT} in every name, inside a layer")
    parallel = raw.get("parallel", "tp")
    if parallel not in ("tp", "etp"):
        raise MappingError(f"{where}: parallel must be tp or etp, not {parallel!r}")
    if raw.get("grouped") and not (EXPERT in raw["grouped"] and LAYER in raw["grouped"] and EXPERT in mcore):
        raise MappingError(f"{where}: a grouped-experts name belongs to a per-expert rule and uses {LAYER} and {EXPERT}")
    if raw.get("hf_alt") and len([raw["hf_alt"]] if isinstance(raw["hf_alt"], str) else raw["hf_alt"]) != len(hf):
        raise MappingError(f"{where}: hf_alt must name as many tensors as hf")
    if raw.get("hf_fused") and (EXPERT in raw["hf_fused"] or LAYER not in raw["hf_fused"] or EXPERT not in mcore):
        raise MappingError(f"{where}: hf_fused names one tensor per layer ({LAYER}, no {EXPERT}) of a per-expert rule")
    if raw.get("dist") and (LAYER in raw["dist"]) != (place == "layer"):
        raise MappingError(f"{where}: a per-layer rule's dist key must use {LAYER} too")
    if "layers" in raw and place != "layer":
        raise MappingError(f"{where}: 'layers' applies to per-layer rules only")
    if "dtype" in raw and raw["dtype"] not in _DTYPES:
        raise MappingError(f"{where}: dtype must be one of {sorted(_DTYPES)}")
    if len(shapes) != len(hf):
        raise MappingError(f"{where}: {len(hf)} HF names but {len(shapes)} shapes")
    if transform.arity is not None and transform.arity != len(hf):
        raise MappingError(f"{where}: transform {transform.name!r} takes {transform.arity} HF tensors, rule names {len(hf)}")
    return TensorRule(
        mcore=mcore,
        hf=hf,
        shapes=shapes,
        transform=transform,
        shard=shard,
        local=local,
        place=place,
        when=raw.get("when"),
        parallel=parallel,
        dist=raw.get("dist"),
        layers=raw.get("layers"),
        grouped=raw.get("grouped"),
        hf_fused=raw.get("hf_fused"),
        hf_alt=tuple([raw["hf_alt"]] if isinstance(raw.get("hf_alt"), str) else raw.get("hf_alt", ())),
        dtype=_DTYPES[raw["dtype"]] if "dtype" in raw else None,
    )


def validate_rules(rules: Sequence[TensorRule], where: str, config_keys: set[str]) -> None:
    """Names must be unique in both directions, and each transform must round-trip.

    Rules restricted to some layers (``layers:``) may share a name template with other such
    rules (DeepSeek's post-attention norm is a fused fc1 norm in dense layers and a separate
    norm in MoE layers); the plan then checks that no concrete name occurs twice.
    """
    for attr in ("mcore", "local"):
        seen: set[str] = set()
        for r in rules:
            name = getattr(r, attr)
            if name in seen and r.layers is None:
                raise MappingError(f"{where}: MCore name {name!r} is mapped twice")
            seen.add(name)
    hf_seen: set[str] = set()
    for r in rules:
        for n in r.hf:
            if n in hf_seen and r.layers is None:
                raise MappingError(f"{where}: HF name {n!r} is mapped twice")
            hf_seen.add(n)
    known = config_keys | set(PROBE_ARGS) | {"padded_vocab_size"}
    for r in rules:
        used = set().union(*(expr.names_in(d) for s in r.shapes for d in s), expr.names_in(r.when),
                           expr.names_in(r.layers) - {"L"})
        missing = used - known
        if missing:
            raise MappingError(f"{where}: rule {r.mcore} uses unknown config field(s) {sorted(missing)}")
        probe = {**{name: 3 for name in used}, **PROBE_ARGS}  # small sizes for any width the file names
        check_round_trip(r.transform, r.hf_shapes(probe), probe, f"{where}: rule {r.mcore}")
