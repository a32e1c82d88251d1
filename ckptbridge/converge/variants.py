"""Training variants are data (``alignment/converge_variants.yaml``); this module reads and expands them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import CkptBridgeError

_KEYS = {"description", "optimizer", "fp8", "data_seed", "resume", "fault", "role"}
FAULTS = ("skip_optimizer_state_on_resume",)
ENVELOPE = "baseline-seed2"


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    optimizer: dict[str, Any] = field(default_factory=dict)
    fp8: str | None = None
    data_seed: int = 0
    resume: bool = False
    fault: str | None = None
    role: str | None = None


def variants_file() -> Path:
    here = Path(__file__).resolve()
    packaged = here.parents[1] / "_data" / "alignment" / "converge_variants.yaml"
    return packaged if packaged.exists() else here.parents[2] / "alignment" / "converge_variants.yaml"


def load_variants(path: Path | None = None) -> tuple[dict[str, Variant], dict[str, list[str]]]:
    """All variants by name, and the group names that expand to several of them."""
    path = path or variants_file()
    raw = yaml.safe_load(path.read_text()) or {}
    out: dict[str, Variant] = {}
    for name, body in (raw.get("variants") or {}).items():
        body = dict(body or {})
        unknown = set(body) - _KEYS
        if unknown:
            raise CkptBridgeError(f"{path}: variant {name!r} has unknown keys {sorted(unknown)}")
        if body.get("fault") is not None and body["fault"] not in FAULTS:
            raise CkptBridgeError(f"{path}: variant {name!r}: unknown fault {body['fault']!r} (known: {FAULTS})")
        out[name] = Variant(name=name, description=str(body.pop("description", "")), **body)
    groups = {g: list(v) for g, v in (raw.get("groups") or {}).items()}
    for g, members in groups.items():
        missing = [m for m in members if m not in out]
        if missing:
            raise CkptBridgeError(f"{path}: group {g!r} names unknown variants {missing}")
    if "baseline" not in out:
        raise CkptBridgeError(f"{path}: no 'baseline' variant")
    return out, groups


def select(names: list[str], envelope: bool = True, path: Path | None = None) -> list[Variant]:
    """Expand groups, always run ``baseline`` first and (with ``envelope``) its second-seed twin."""
    registry, groups = load_variants(path)
    chosen: list[str] = ["baseline"] + ([ENVELOPE] if envelope and ENVELOPE in registry else [])
    for name in names:
        for member in groups.get(name, [name]):
            if member not in registry:
                known = sorted(registry) + sorted(groups)
                raise CkptBridgeError(f"unknown variant {member!r}; known: {', '.join(known)}")
            if member not in chosen:
                chosen.append(member)
    return [registry[n] for n in chosen]
