"""The ablation recipes (``alignment/ablations.yaml``) and the context manager that applies them.

Recipes are data; the implementations they name live in :mod:`.variants`.  A recipe either swaps
an implementation into one model (``side`` + ``impl``), changes the MCore layout (``layout``), or
combines other recipes (``members``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import CkptBridgeError
from ..presets import presets_dir
from .applicability import FEATURES, unmet
from .variants import IMPLS, VariantContext

SIDES = ("mcore", "hf")


@dataclass(frozen=True)
class Ablation:
    """One row of the ablation table."""

    name: str
    op: str
    side: str
    description: str
    why: str = ""
    same_because: str = ""
    impl: str | None = None
    members: tuple[str, ...] = ()
    layout: dict[str, int] = field(default_factory=dict)
    hf_order: bool = False
    emulated_unless: str | None = None  # "te" | "cuda"
    requires: tuple[str, ...] = ()  # model features (ckptbridge/align/applicability.py FEATURES)

    def emulated(self, ctx: VariantContext) -> bool:
        """True when this run uses the torch stand-in for a GPU kernel."""
        if self.emulated_unless == "te":
            return not ctx.te
        if self.emulated_unless == "cuda":
            return ctx.device != "cuda"
        return False


def ablations_file() -> Path:
    """``alignment/ablations.yaml`` (or its packaged copy), next to the presets folder."""
    return presets_dir().parent / "ablations.yaml"


def load_ablations(path: Path | None = None) -> dict[str, Ablation]:
    """Parse and validate the recipes; every ``impl`` and member must exist."""
    path = path or ablations_file()
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CkptBridgeError(f"{path}: cannot read ablation recipes ({exc})") from None
    out: dict[str, Ablation] = {}
    for entry in raw.get("ablations", []):
        try:
            ab = Ablation(name=entry["name"], op=entry["op"], side=entry["side"], description=entry["description"],
                          why=" ".join(str(entry.get("why", "")).split()),
                          same_because=" ".join(str(entry.get("same_because", "")).split()), impl=entry.get("impl"),
                          members=tuple(entry.get("members", ())), layout=dict(entry.get("layout") or {}),
                          hf_order=bool(entry.get("hf_order", False)), emulated_unless=entry.get("emulated_unless"),
                          requires=tuple(entry.get("requires", ())))
        except KeyError as exc:
            raise CkptBridgeError(f"{path}: ablation {entry.get('name', '?')!r} lacks {exc}") from None
        if ab.side not in SIDES:
            raise CkptBridgeError(f"{path}: ablation {ab.name!r}: side must be one of {SIDES}")
        if ab.impl is not None and ab.impl not in IMPLS:
            raise CkptBridgeError(f"{path}: ablation {ab.name!r} names unknown impl {ab.impl!r}")
        if ab.impl is None and not ab.members and not ab.layout:
            raise CkptBridgeError(f"{path}: ablation {ab.name!r} has neither impl, members nor layout")
        unknown = [f for f in ab.requires if f not in FEATURES]
        if unknown:
            raise CkptBridgeError(f"{path}: ablation {ab.name!r} requires unknown features {unknown} (known: {', '.join(FEATURES)})")
        if ab.name in out:
            raise CkptBridgeError(f"{path}: ablation {ab.name!r} defined twice")
        out[ab.name] = ab
    for ab in out.values():
        for member in ab.members:
            if member not in out or out[member].members:
                raise CkptBridgeError(f"{path}: {ab.name!r} member {member!r} is not a plain ablation")
    return out


def select(spec: str | None, registry: dict[str, Ablation]) -> list[Ablation]:
    """``"all"``, ``""``/``None`` (none), or a comma list of names or op prefixes (``rmsnorm``)."""
    if not spec:
        return []
    if spec.strip() == "all":
        return list(registry.values())
    chosen: list[Ablation] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        hits = [a for a in registry.values() if a.name == item or a.op == item]
        if not hits:
            raise CkptBridgeError(f"unknown ablation {item!r}; known: {', '.join(registry)}")
        chosen += [a for a in hits if a not in chosen]
    return chosen


def parts(ab: Ablation, registry: dict[str, Ablation]) -> list[Ablation]:
    """The plain ablations a recipe consists of (itself, or its members)."""
    return [registry[m] for m in ab.members] if ab.members else [ab]


def not_applicable(ab: Ablation, registry: dict[str, Ablation], args: dict[str, Any], hf_attention: str,
                   tp: int, pp: int) -> str | None:
    """Why the recipe cannot run on this model (a member's missing feature or the layout), else None."""
    for p in parts(ab, registry):
        reason = unmet(p.requires, p.layout, args, hf_attention, tp, pp)
        if reason:
            return reason if p is ab else f"member {p.name}: {reason}"
    return None


def layout_of(ab: Ablation, registry: dict[str, Ablation]) -> dict[str, int]:
    """Layout overrides of the recipe (merged over members)."""
    out: dict[str, int] = {}
    for p in parts(ab, registry):
        out.update(p.layout)
    return out


def hf_side_names(ab: Ablation | None, registry: dict[str, Ablation]) -> tuple[str, ...]:
    """Names of the HF-side parts: settings with equal tuples share one HF run."""
    return tuple(p.name for p in parts(ab, registry) if p.side == "hf" and p.impl) if ab else ()


def mcore_side_names(ab: Ablation | None, registry: dict[str, Ablation]) -> tuple[str, ...]:
    return tuple(p.name for p in parts(ab, registry) if p.side == "mcore" and p.impl) if ab else ()


@contextmanager
def applied(names: tuple[str, ...], side: str, target: Any, ctx: VariantContext,
            registry: dict[str, Ablation] | None = None) -> Iterator[None]:
    """Swap the named ablations of ``side`` into ``target`` for the duration of the block."""
    registry = registry or load_ablations()
    with ExitStack() as stack:
        for name in names:
            ab = registry[name]
            if ab.side != side or ab.impl is None:
                raise ValueError(f"ablation {name!r} is not an implementation swap on the {side} side")
            stack.enter_context(IMPLS[ab.impl](target, ctx))
        yield
