"""Reading one mapping file's raw YAML into the :mod:`ckptbridge.mapping.schema` types, and refusing it.

Each section's parser checks field names, placeholders (``{L}``, ``{E}``, ``{M}``) and kinds, so a
malformed file fails when it loads with a message naming the rule; `validate_rules` then proves the
rules as a whole: names unique both ways, every rule's steps (and every alternative layout's)
invertible bit-exactly on small probe shapes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .. import expr
from ..dtypes import LONG_NAMES
from ..errors import MappingError
from ..sharding import get_kind
from ..layer_spec_names import te_to_local
from ..transform_layout import TakeExpert
from ..transforms import check_expert_stack, check_round_trip, parse_transform
from .schema import EXPERT, LAYER, MTP, Alternative, ExtraState, MtpSection, TensorRule

_DTYPES = LONG_NAMES

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


def parse_extra_state(raw: Mapping[str, Any], where: str) -> ExtraState:
    unknown = set(raw) - {"module", "place", "legacy_only", "dist", "layers"}
    if unknown or "module" not in raw:
        raise MappingError(f"{where}: needs 'module' (and optionally place, legacy_only, dist, layers); unknown {sorted(unknown)}")
    place = raw.get("place", "layer")
    if (LAYER in raw["module"]) != (place == "layer") or (MTP in raw["module"]) != (place == "mtp") \
            or place not in ("layer", "last", "mtp"):
        raise MappingError(f"{where}: per-layer modules (and only they) use {LAYER}, MTP modules {MTP}; "
                           "place is layer, last or mtp")
    return ExtraState(raw["module"], place, bool(raw.get("legacy_only", False)), raw.get("dist"), raw.get("layers"))


def parse_mtp(raw: Any, where: str) -> MtpSection | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or set(raw) - {"depth", "like", "rename", "optional", "hf_rename"} \
            or not {"depth", "like", "rename"} <= set(raw):
        raise MappingError(f"{where}: mtp needs depth, like and rename (and optionally optional, hf_rename)")
    rename = tuple((str(a), str(b)) for a, b in dict(raw["rename"]).items())
    hf_rename = tuple((str(a), str(b)) for a, b in dict(raw.get("hf_rename") or {}).items())
    if any(LAYER not in a or MTP not in b for a, b in rename + hf_rename):
        raise MappingError(f"{where}: mtp rename and hf_rename map a {LAYER} prefix to an {MTP} prefix")
    return MtpSection(str(raw["depth"]), str(raw["like"]), rename, bool(raw.get("optional", False)), hf_rename)


_RULE_FIELDS = {"mcore", "hf", "shapes", "transform", "shard", "local", "place", "when", "parallel", "dist", "layers",
                "dtype", "grouped", "alternatives", "hf_fused", "hf_alt", "mtp_copies", "local_shard",
                "dist_parts"}


def _names(value: Any) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _check_names(names: Sequence[str], place: str, per_expert: bool, where: str, shared: bool = False) -> None:
    """Placeholders: {L} in per-layer names, {M} in MTP MCore names, {E} in per-expert names (not in
    a shared layout's, which holds every expert)."""
    for n in names:
        if place == "mtp":
            pass  # {L}, {M} or neither (one block's names, Qwen3-Next's mtp.fc: two blocks would plan them twice)
        elif (LAYER in n) != (place == "layer") or MTP in n:
            raise MappingError(f"{where}: per-layer rules (and only they) must use {LAYER} in every name ({MTP}: place mtp)")
        if (EXPERT in n) != (per_expert and not shared):
            raise MappingError(f"{where}: per-expert rules (and only they) must use {EXPERT} in every name, inside a layer"
                               + (" (a take_expert layout names one tensor for all experts: no {E})" if shared else ""))


def parse_alternatives(raw: Mapping[str, Any], hf: tuple[str, ...], shapes: tuple, transform: Any,
                       where: str) -> tuple[Alternative, ...]:
    """``alternatives:`` (each: hf, and optionally shapes and transform, defaulting to the rule's), plus
    the older spellings ``hf_alt`` (the same tensors renamed) and ``hf_fused`` (every expert in one tensor)."""
    out: list[Alternative] = []
    for i, alt in enumerate(raw.get("alternatives") or []):
        at = f"{where}: alternatives[{i}]"
        if not isinstance(alt, Mapping) or "hf" not in alt or set(alt) - {"hf", "shapes", "transform"}:
            raise MappingError(f"{at}: an alternative has hf and optionally shapes and transform")
        names = _names(alt["hf"])
        steps = parse_transform(alt.get("transform", transform), at)
        alt_shapes = tuple(tuple(s) for s in alt["shapes"]) if "shapes" in alt else (None if isinstance(
            steps.steps[0], TakeExpert) else shapes)
        if alt_shapes is not None and len(alt_shapes) != len(names):
            raise MappingError(f"{at}: {len(names)} HF names but {len(alt_shapes)} shapes")
        out.append(Alternative(names, alt_shapes, steps))
    if raw.get("hf_alt"):
        names = _names(raw["hf_alt"])
        if len(names) != len(hf):
            raise MappingError(f"{where}: hf_alt must name as many tensors as hf")
        out.append(Alternative(names, shapes, parse_transform(transform, where)))
    if raw.get("hf_fused"):
        out.append(Alternative((raw["hf_fused"],), None, parse_transform("take_expert", where)))
    return tuple(out)


def parse_rule(raw: Mapping[str, Any], where: str) -> TensorRule:
    unknown = set(raw) - _RULE_FIELDS
    if unknown:
        raise MappingError(f"{where}: unknown rule field(s) {sorted(unknown)}")
    for key in ("mcore", "hf", "shapes", "shard"):
        if key not in raw:
            raise MappingError(f"{where}: rule needs {key!r}")
    hf = _names(raw["hf"])
    shapes = tuple(tuple(s) for s in raw["shapes"])
    transform = parse_transform(raw.get("transform", "identity"), f"{where} ({raw['mcore']})")
    try:
        shard = get_kind(raw["shard"])
        local_shard = get_kind(raw["local_shard"]) if "local_shard" in raw else None
    except KeyError:
        raise MappingError(f"{where}: unknown shard kind {raw.get('local_shard', raw['shard'])!r}") from None
    dist_parts = tuple(str(n) for n in raw.get("dist_parts", ()))
    if dist_parts and len(dist_parts) != len(shard.part_sizes):
        raise MappingError(f"{where}: dist_parts names one torch_dist key per part of a 'shard: {{parts: [...]}}' "
                           f"({len(shard.part_sizes)} parts), not {len(dist_parts)}")
    place = raw.get("place", "layer")
    mcore, local = raw["mcore"], raw.get("local", te_to_local(raw["mcore"]))  # local: only where the table cannot say
    if place not in ("layer", "first", "last", "mtp"):
        raise MappingError(f"{where}: place must be layer, first, last or mtp, not {place!r}")
    if place == "mtp":
        if any(MTP not in n or LAYER in n for n in (mcore, local)):
            raise MappingError(f"{where}: MTP rules use {MTP} in MCore names and {LAYER} (or {MTP}) in HF names")
    elif any((LAYER in n) != (place == "layer") or MTP in n for n in (mcore, local)):
        raise MappingError(f"{where}: per-layer rules (and only they) must use {LAYER} in every name ({MTP}: place mtp)")
    per_expert = EXPERT in mcore
    if EXPERT in local and not per_expert or per_expert and (EXPERT not in local or place not in ("layer", "mtp")):
        raise MappingError(f"{where}: per-expert rules (and only they) must use {EXPERT} in every name, inside a layer")
    own_shared = isinstance(transform.steps[0], TakeExpert)
    if own_shared and not per_expert:
        raise MappingError(f"{where}: a take_expert layout belongs to a per-expert rule ({EXPERT} in its MCore name)")
    _check_names(hf, place, per_expert, where, own_shared)
    alternatives = parse_alternatives(raw, hf, shapes, raw.get("transform", "identity"), f"{where} ({mcore})")
    for alt in alternatives:
        if alt.shared and not per_expert:
            raise MappingError(f"{where}: a take_expert layout belongs to a per-expert rule ({EXPERT} in its MCore name)")
        _check_names(alt.hf, place, per_expert, f"{where}: alternative {list(alt.hf)}", alt.shared)
    copies = _names(raw.get("mtp_copies", ()))
    if copies and (place not in ("first", "last") or len(hf) != 1 or any(LAYER not in c and MTP not in c for c in copies)):
        raise MappingError(f"{where}: mtp_copies belong to a first/last rule with one HF name, and use {LAYER} or {MTP}")
    parallel = raw.get("parallel", "tp")
    if parallel not in ("tp", "etp"):
        raise MappingError(f"{where}: parallel must be tp or etp, not {parallel!r}")
    index = MTP if place == "mtp" else LAYER  # what numbers the rule's MCore names
    if raw.get("grouped") and not (EXPERT in raw["grouped"] and index in raw["grouped"] and per_expert):
        raise MappingError(f"{where}: a grouped-experts name belongs to a per-expert rule and uses {index} and {EXPERT}")
    if raw.get("dist") and ((LAYER in raw["dist"]) != (place == "layer") or (MTP in raw["dist"]) != (place == "mtp")):
        raise MappingError(f"{where}: a per-layer (MTP) rule's dist key must use {LAYER} ({MTP}) too")
    if "layers" in raw and place != "layer":
        raise MappingError(f"{where}: 'layers' applies to per-layer rules only")
    if "dtype" in raw and raw["dtype"] not in _DTYPES:
        raise MappingError(f"{where}: dtype must be one of {sorted(_DTYPES)}")
    if len(shapes) != len(hf):
        raise MappingError(f"{where}: {len(hf)} HF names but {len(shapes)} shapes")
    if transform.arity is not None and transform.arity != len(hf):
        raise MappingError(f"{where}: rule {mcore}: transform {transform.name!r} takes {transform.arity} HF tensors, "
                           f"rule names {len(hf)}")
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
        alternatives=alternatives,
        dtype=_DTYPES[raw["dtype"]] if "dtype" in raw else None,
        mtp_copies=copies,
        local_shard=local_shard,
        dist_parts=dist_parts,
    )


def validate_rules(rules: Sequence[TensorRule], where: str, config_keys: set[str]) -> None:
    """Names must be unique in both directions, and each rule's steps (and each alternative layout's)
    must round-trip bit-exactly; the first failure names the rule.

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
        at = f"{where}: rule {r.mcore}"
        alt_names = set().union(*(a.transform.names() for a in r.alternatives),
                                *(expr.names_in(d) for a in r.alternatives for s in a.shapes or () for d in s))
        used = set().union(*(expr.names_in(d) for s in r.shapes for d in s), expr.names_in(r.when),
                           expr.names_in(r.layers) - {"L"}, r.transform.names(), alt_names,
                           *(expr.names_in(p) for p in r.shard.part_sizes))
        missing = used - known - {"E"}
        if missing:
            raise MappingError(f"{at} uses unknown config field(s) {sorted(missing)}")
        probe = {**{name: 3 for name in used}, **PROBE_ARGS}  # small sizes for any width the file names
        if r.shared:
            want = check_expert_stack(r.transform, r.hf_shapes(probe)[0], int(probe["num_moe_experts"]), probe, at)
        else:
            check_round_trip(r.transform, r.hf_shapes(probe), probe, at)
            want = r.mcore_shape(probe)
        if r.shard.part_sizes and sum(r.shard.resolved(probe).sizes or ()) != want[0]:
            raise MappingError(f"{at}: shard parts {list(r.shard.part_sizes)} do not add up to its first dimension")
        for alt in r.alternatives:
            where_alt = f"{at}: alternative layout {list(alt.hf)}"
            shapes = alt.hf_shapes(r, probe)
            if alt.shared:
                got = check_expert_stack(alt.transform, shapes[0], int(probe["num_moe_experts"]), probe, where_alt)
            else:
                check_round_trip(alt.transform, shapes, probe, where_alt)
                got = tuple(alt.transform.mcore_shape(shapes, probe))
            if tuple(got) != tuple(want):
                raise MappingError(f"{where_alt}: gives MCore shape {list(got)}, the rule's own layout {list(want)}")
