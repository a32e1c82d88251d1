"""Find, load and look up mapping files.

Files live in the top-level ``mappings/`` folder (shipped inside the wheel as
``ckptbridge/_data/mappings``). A file may ``include`` another family's
``config`` or ``tensors`` section and override single fields, so a variant is
a few lines of data rather than a copy.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from ..errors import MappingError, UnsupportedArchitectureError
from .. import expr
from ..megatron_settings import check_config_keys
from .features import FEATURES_OFF
from .schema import ArchMapping, ConfigCheck, parse_extra_state, parse_mtp, parse_rule, validate_rules


def mappings_dir() -> Path:
    """The installed data folder, or the source tree's ``mappings/`` in a checkout."""
    packaged = Path(__file__).resolve().parents[1] / "_data" / "mappings"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "mappings"


def resolve_includes(raw: dict[str, Any], others: dict[str, dict[str, Any]], where: str) -> dict[str, Any]:
    """Expand ``include: family`` in the config, checks, tensors and extra_state sections.

    A dict section (config) merges the included one with the fields given beside ``include``.
    A list section takes the included list, drops the entries whose ``mcore``/``module`` name is
    listed under ``exclude`` and appends the entries under ``add``.
    """
    out = copy.deepcopy(raw)
    for section in ("config", "hf_config", "tensors", "checks", "extra_state"):
        value = out.get(section)
        if isinstance(value, dict) and "include" in value:
            base_name = value.pop("include")
            if base_name not in others:
                raise MappingError(f"{where}: {section} includes unknown family {base_name!r}")
            base = resolve_includes(others[base_name], others, base_name).get(section) or []
            if isinstance(base, dict):
                out[section] = {**base, **value}
                continue
            exclude = set(value.pop("exclude", []))
            add = value.pop("add", [])
            if value:
                raise MappingError(f"{where}: {section}: only include, exclude and add may stand together")
            kept = [e for e in base if not (isinstance(e, dict) and (e.get("mcore") in exclude or e.get("module") in exclude))]
            if len(base) - len(kept) != len(exclude):
                raise MappingError(f"{where}: {section} excludes names that {base_name} does not have")
            out[section] = copy.deepcopy(kept) + list(add)
    return out


def build_mapping(raw: dict[str, Any], where: str) -> ArchMapping:
    """Validate a resolved mapping dict; raises `MappingError` on anything it cannot prove sound."""
    for key in ("family", "architectures", "config", "tensors"):
        if key not in raw:
            raise MappingError(f"{where}: missing top-level {key!r}")
    config = dict(raw["config"])
    check_config_keys(config, where)
    rules = tuple(parse_rule(r, f"{where}: tensors[{i}]") for i, r in enumerate(raw["tensors"]))
    validate_rules(rules, where, set(config))
    checks = tuple(ConfigCheck(c["when"], c["error"]) for c in raw.get("checks") or [])
    notes = tuple(ConfigCheck(c["when"], c["warning"]) for c in raw.get("warnings") or [])
    extra = tuple(parse_extra_state(e, f"{where}: extra_state[{i}]") for i, e in enumerate(raw.get("extra_state") or []))
    mtp = parse_mtp(raw.get("mtp"), where)
    if mtp is not None and (expr.names_in(mtp.depth) | expr.names_in(mtp.like)) - set(config):
        raise MappingError(f"{where}: mtp depth/like use names that the config section does not define")
    if mtp is None and any(r.place == "mtp" for r in rules):
        raise MappingError(f"{where}: place: mtp rules need an mtp section")
    hf_config = dict(raw.get("hf_config") or {})
    detect = raw.get("detect")
    known = set(config) | set(FEATURES_OFF) | {"padded_vocab_size"}
    for key, source in [*hf_config.items(), ("detect", detect)]:
        if expr.names_in(source) - known:
            raise MappingError(f"{where}: hf_config {key} uses {sorted(expr.names_in(source) - known)}, "
                               "which the config section does not define")
    return ArchMapping(
        hf_config=hf_config,
        detect=detect,
        family=raw["family"],
        architectures=tuple(raw["architectures"]),
        description=raw.get("description", ""),
        config=config,
        checks=checks,
        tensors=rules,
        extra_state=extra,
        source=where,
        mtp=mtp,
        warnings=notes,
    )


class MappingRegistry:
    """All known mappings, indexed by family and by HF architecture name."""

    def __init__(self, folder: Path):
        raws: dict[str, dict[str, Any]] = {}
        self._files: dict[str, Path] = {}
        for path in sorted(Path(folder).glob("*.yaml")):
            try:
                data = yaml.safe_load(path.read_text())
            except yaml.YAMLError as exc:
                raise MappingError(f"{path}: not valid YAML ({exc})") from None
            if not isinstance(data, dict) or "family" not in data:
                raise MappingError(f"{path}: not a mapping file (needs a 'family')")
            raws[data["family"]] = data
            self._files[data["family"]] = path
        self._resolved = {f: resolve_includes(r, raws, str(self._files[f])) for f, r in raws.items()}
        self._by_family = {f: build_mapping(r, str(self._files[f])) for f, r in self._resolved.items()}
        self._by_arch: dict[str, ArchMapping] = {}
        for m in self._by_family.values():
            for arch in m.architectures:
                if arch in self._by_arch:
                    raise MappingError(f"architecture {arch} is claimed by both {self._by_arch[arch].family} and {m.family}")
                self._by_arch[arch] = m

    @property
    def architectures(self) -> list[str]:
        return sorted(self._by_arch)

    @property
    def families(self) -> list[str]:
        return sorted(self._by_family)

    def for_architecture(self, arch: str | None) -> ArchMapping:
        if arch not in self._by_arch:
            raise UnsupportedArchitectureError(
                f"unsupported architecture {arch!r}; supported: {', '.join(self.architectures)}"
            )
        return self._by_arch[arch]

    def family(self, name: str) -> ArchMapping:
        if name not in self._by_family:
            raise UnsupportedArchitectureError(f"unknown mapping family {name!r}; known: {', '.join(self.families)}")
        return self._by_family[name]

    def resolved_dict(self, family: str) -> dict[str, Any]:
        """The include-free mapping as plain data, to store inside an MCore checkpoint."""
        return copy.deepcopy(self._resolved[family])


@lru_cache(maxsize=1)
def default_registry() -> MappingRegistry:
    return MappingRegistry(mappings_dir())
