"""Tensors an HF folder may hold that are not weights of the model: what a mapping file's
``ignore:`` and ``fp8_keep:`` sections say, validated when the file loads.

The reader stays strict: a tensor is only dropped when an ``ignore`` rule names it *and* its
content is proven redundant -- ``check: rope_inv_freq`` (the rotary frequencies older transformers
saved as a buffer; they must equal what the config implies) or ``check: copy_of`` (e.g. a stored
``lm_head.weight`` of a tied model, which must equal the embedding bit for bit). ``fp8_keep``
lists the 2-D per-layer weights that block-scaled FP8 checkpoints keep unquantized (routers).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import expr
from ..errors import MappingError

LAYER = "{L}"
CHECKS = {"rope_inv_freq": {"base", "dim"}, "copy_of": {"of"}}


@dataclass(frozen=True)
class IgnoreRule:
    """One droppable HF tensor name (``{L}``: every decoder layer) and how its content is proven redundant."""

    hf: str
    check: str  # a key of CHECKS
    when: str | None = None  # over Megatron args: the rule applies only then
    of: str | None = None  # copy_of: the mapped HF tensor it must equal bit for bit
    base: str | None = None  # rope_inv_freq: the rotary base (an expression over the args)
    dim: str | None = None  # rope_inv_freq: the rotary dimension (an expression over the args)

    def applies(self, args: Mapping[str, Any]) -> bool:
        return self.when is None or bool(expr.evaluate(self.when, args))

    def names(self, num_layers: int) -> list[tuple[str, int | None]]:
        """Concrete names with their layer (None: a global tensor)."""
        if LAYER in self.hf:
            return [(self.hf.replace(LAYER, str(layer)), layer) for layer in range(num_layers)]
        return [(self.hf, None)]

    def partner(self, layer: int | None) -> str:
        """copy_of: the concrete name of the tensor this one must equal."""
        assert self.of is not None
        return self.of.replace(LAYER, str(layer)) if layer is not None else self.of


def parse_ignores(raw: Any, where: str, config_keys: set[str]) -> tuple[IgnoreRule, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise MappingError(f"{where}: ignore must be a list of rules")
    out = []
    for i, entry in enumerate(raw):
        at = f"{where}: ignore[{i}]"
        if not isinstance(entry, Mapping) or "hf" not in entry or entry.get("check") not in CHECKS:
            raise MappingError(f"{at}: needs hf and check (one of {sorted(CHECKS)})")
        needed = CHECKS[entry["check"]]
        unknown = set(entry) - {"hf", "check", "when"} - needed
        if unknown or not needed <= set(entry):
            raise MappingError(f"{at}: check {entry['check']} takes hf, when and {sorted(needed)}; "
                               f"unknown {sorted(unknown)}, missing {sorted(needed - set(entry))}")
        rule = IgnoreRule(**{k: str(v) for k, v in entry.items()})
        used = set().union(*(expr.names_in(getattr(rule, f)) for f in ("when", "base", "dim")))
        if used - config_keys:
            raise MappingError(f"{at}: uses {sorted(used - config_keys)}, which the config section does not define")
        if rule.of is not None and (LAYER in rule.of) != (LAYER in rule.hf):
            raise MappingError(f"{at}: hf and of must both be per-layer ({LAYER}) or both global")
        out.append(rule)
    return tuple(out)


def parse_fp8_keep(raw: Any, where: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Sequence) or isinstance(raw, str) or not all(isinstance(n, str) for n in raw):
        raise MappingError(f"{where}: fp8_keep must be a list of HF tensor names")
    return tuple(raw)


def check_against_rules(ignores: Sequence[IgnoreRule], fp8_keep: Sequence[str], hf_names: set[str], where: str) -> None:
    """A copy_of partner and an fp8_keep name must be a mapped HF tensor. (An ignored name may be one
    under other settings -- a stored ``lm_head`` is a weight when embeddings are untied; the plan
    refuses a name that is both at once.)"""
    for rule in ignores:
        if rule.of is not None and rule.of not in hf_names:
            raise MappingError(f"{where}: ignore {rule.hf!r} is a copy_of {rule.of!r}, which no tensor rule maps")
    for name in fp8_keep:
        if name not in hf_names:
            raise MappingError(f"{where}: fp8_keep names {name!r}, which no tensor rule maps")


def parse_carry(raw: Any, where: str) -> tuple[str, ...]:
    """``carry:`` -- a list of HF name patterns (``*`` matches any run of characters, dots included)."""
    if raw is None:
        return ()
    if not isinstance(raw, Sequence) or isinstance(raw, str) or not all(isinstance(n, str) and n for n in raw):
        raise MappingError(f"{where}: carry must be a list of HF tensor name patterns (e.g. 'visual.*')")
    return tuple(raw)


def carried_name(name: str, patterns: Iterable[str]) -> bool:
    """Whether an HF tensor name is one a mapping's ``carry`` patterns name."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def check_carry(patterns: Sequence[str], hf_names: Iterable[str], where: str) -> None:
    """A carried tensor is never a weight too: no pattern may name a tensor rule's HF name (``{L}`` read as 0)."""
    for name in hf_names:
        concrete = name.replace("{L}", "0").replace("{E}", "0").replace("{M}", "0")
        hit = [p for p in patterns if fnmatch.fnmatchcase(concrete, p)]
        if hit:
            raise MappingError(f"{where}: carry pattern {hit[0]!r} names {name!r}, which a tensor rule maps")
