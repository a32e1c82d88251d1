"""Find, load and look up mapping files.

Files live in the top-level ``mappings/`` folder (shipped inside the wheel as
``ckptbridge/_data/mappings``). A file may ``include`` another family's
``config`` or ``tensors`` section and override single fields, so a variant is
a few lines of data rather than a copy.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from ..errors import MappingError, UnsupportedArchitectureError
from .. import expr
from ..mapping_folders import ENV_VAR, generation, set_user_folders, user_folders  # noqa: F401 - ENV_VAR, set_user_folders re-exported
from ..megatron_settings import check_config_keys
from .features import FEATURES_OFF
from .ignore import check_against_rules, check_carry, parse_carry, parse_fp8_keep, parse_ignores
from .parse import parse_extra_state, parse_mtp, parse_rule, validate_rules
from .schema import ArchMapping, ConfigCheck


def mappings_dir() -> Path:
    """The installed data folder, or the source tree's ``mappings/`` in a checkout."""
    packaged = Path(__file__).resolve().parents[1] / "_data" / "mappings"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "mappings"


def resolve_includes(raw: dict[str, Any], others: dict[str, dict[str, Any]], where: str,
                     done: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Expand ``include: family`` in the config, checks, warnings, tensors and extra_state sections.

    A dict section (config) merges the included one with the fields given beside ``include``.
    A list section takes the included list, drops the entries whose ``mcore``/``module`` name is
    listed under ``exclude`` and appends the entries under ``add``.
    ``done`` holds the families already resolved (by name), so that loading every mapping resolves each
    included family once rather than once per includer and per section (that was most of start-up).
    """
    done = {} if done is None else done
    out = copy.deepcopy(raw)
    for section in ("config", "hf_config", "hf_defaults", "tensors", "checks", "warnings", "extra_state", "ignore"):
        value = out.get(section)
        if isinstance(value, dict) and "include" in value:
            base_name = value.pop("include")
            if base_name not in others:
                raise MappingError(f"{where}: {section} includes unknown family {base_name!r}")
            if base_name not in done:
                done[base_name] = resolve_includes(others[base_name], others, base_name, done)
            base = done[base_name].get(section) or []
            if isinstance(base, dict):
                out[section] = copy.deepcopy({**base, **value})
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


def with_hf_prefix(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """``hf_prefix: P``: every HF name the tensor rules, their alternatives and the ``ignore``/``fp8_keep``
    sections give is read and written as ``P + name`` -- a VLM whose language model's tensors sit under a
    prefix (Llama 4's ``language_model.``) includes the text family's rules unchanged. (``carry`` patterns are
    the checkpoint's own names.)"""
    prefix = raw.get("hf_prefix")
    if prefix is None:
        return raw
    if not isinstance(prefix, str) or not prefix:
        raise MappingError(f"{where}: hf_prefix must be a non-empty string")

    def names(value: Any) -> Any:
        return prefix + value if isinstance(value, str) else [prefix + v for v in value]

    def rule(r: dict[str, Any]) -> dict[str, Any]:
        out = {k: names(v) if k in ("hf", "hf_alt", "hf_fused", "mtp_copies") else v for k, v in r.items()}
        if "alternatives" in r:
            out["alternatives"] = [{**a, "hf": names(a["hf"])} if "hf" in a else a for a in r["alternatives"]]
        return out

    out = copy.deepcopy(raw)
    out["tensors"] = [rule(r) for r in raw["tensors"]]
    out["ignore"] = [{k: names(v) if k in ("hf", "of") else v for k, v in r.items()} for r in raw.get("ignore") or []]
    out["fp8_keep"] = names(raw.get("fp8_keep") or [])
    return out


def build_mapping(raw: dict[str, Any], where: str) -> ArchMapping:
    """Validate a resolved mapping dict; raises `MappingError` on anything it cannot prove sound."""
    for key in ("family", "architectures", "config", "tensors"):
        if key not in raw:
            raise MappingError(f"{where}: missing top-level {key!r}")
    raw = with_hf_prefix(raw, where)
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
    ignore, fp8_keep = parse_ignores(raw.get("ignore"), where, set(config)), parse_fp8_keep(raw.get("fp8_keep"), where)
    check_against_rules(ignore, fp8_keep, {n for r in rules for n in r.hf}, where)
    carry = parse_carry(raw.get("carry"), where)
    check_carry(carry, {n for r in rules for n in (*r.hf, *(n for a in r.alternatives for n in a.hf))}, where)
    hf_config = dict(raw.get("hf_config") or {})
    detect = raw.get("detect")
    known = set(config) | set(FEATURES_OFF) | {"padded_vocab_size"}
    nest = raw.get("hf_config_nest")
    if nest is not None and (not isinstance(nest, dict) or set(nest) != {"under", "top"} or not isinstance(nest["under"], str)
                             or not isinstance(nest["top"], dict)):
        raise MappingError(f"{where}: hf_config_nest needs under (the key hf_config's fields go under) and top "
                           "(fields beside it, as expressions)")
    for key, source in [*hf_config.items(), *(nest["top"].items() if nest else ()), ("detect", detect)]:
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
        ignore=ignore,
        fp8_keep=fp8_keep,
        carry=carry,
        hf_config_nest=nest,
        hf_defaults=dict(raw.get("hf_defaults") or {}),
    )


@dataclass(frozen=True)
class BrokenMapping:
    """A mapping file that could not be loaded: where, why, and what it claimed (when readable)."""

    path: Path
    error: str
    family: str | None = None
    architectures: tuple[str, ...] = ()


@dataclass(frozen=True)
class RefusedFamily:
    """A file that names architectures megatron-core cannot express (``refused: reason`` and nothing to
    convert): using one raises `UnsupportedArchitectureError` with that reason instead of 'unsupported'."""

    path: Path
    family: str
    architectures: tuple[str, ...]
    reason: str


_REFUSED_KEYS = {"family", "architectures", "description", "refused"}


def refused_family(data: Mapping[str, Any], path: Path) -> RefusedFamily | None:
    """The refusal a file declares (None for a mapping); such a file holds nothing else."""
    if "refused" not in data:
        return None
    extra = sorted(set(data) - _REFUSED_KEYS)
    archs = data.get("architectures")
    if extra or not isinstance(data["refused"], str) or not isinstance(archs, list) or not archs:
        raise MappingError(f"{path}: a refused family has family, architectures (a list), description and refused "
                           f"(the reason) only" + (f"; remove {extra}" if extra else ""))
    return RefusedFamily(path, data["family"], tuple(str(a) for a in archs), data["refused"])


def _read_file(path: Path) -> dict[str, Any]:
    try:
        # libyaml's loader when PyYAML has it: the same safe subset, parsed ~10x faster (start-up)
        data = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise MappingError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MappingError(f"{path}: cannot be read ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("family"), str):
        raise MappingError(f"{path}: not a mapping file (needs a 'family')")
    return data


def _claims(path: Path) -> tuple[str | None, tuple[str, ...]]:
    """The family and architectures a broken file names, read leniently, so that using one of
    them reports the file's problem instead of 'unsupported architecture'."""
    family = re.search(r"^family:\s*([\w.-]+)", path.read_text(errors="replace"), re.M)
    archs = re.search(r"^architectures:\s*\[([^\]]*)\]", path.read_text(errors="replace"), re.M)
    names = tuple(a.strip().strip("'\"") for a in archs.group(1).split(",") if a.strip()) if archs else ()
    return (family.group(1) if family else None), names


class MappingRegistry:
    """All known mappings, indexed by family and by HF architecture name.

    Folders are read in order (the shipped one first, then user folders); a later file with the
    same ``family`` replaces the earlier one. A file that cannot be loaded (bad YAML, unknown
    operation, a non-invertible pipeline, an include of a broken family...) is kept aside as a
    `BrokenMapping`: every other family still works, ``list-architectures`` names it, and using
    its family or architecture raises its error.
    """

    def __init__(self, folder: Path | Sequence[Path]):
        folders = [Path(folder)] if isinstance(folder, (str, Path)) else [Path(f) for f in folder]
        raws: dict[str, dict[str, Any]] = {}
        self._files: dict[str, Path] = {}
        self.broken: list[BrokenMapping] = []
        self.refused: dict[str, RefusedFamily] = {}  # family -> its refusal (a later file of the family replaces it)
        for path in (p for f in folders for p in sorted(f.glob("*.yaml"))):
            try:
                data = _read_file(path)
                refusal = refused_family(data, path)
            except MappingError as exc:
                self.broken.append(BrokenMapping(path, str(exc), *_claims(path)))
                continue
            if refusal is not None:
                self.refused[refusal.family] = refusal
                raws.pop(refusal.family, None)
                continue
            self.refused.pop(data["family"], None)
            raws[data["family"]] = data
            self._files[data["family"]] = path
        self._raws = raws
        self._resolved: dict[str, dict[str, Any]] = {}
        self._by_family: dict[str, ArchMapping] = {}
        failed: dict[str, str] = {}
        done: dict[str, dict[str, Any]] = {}
        for family, raw in raws.items():
            where = str(self._files[family])
            try:
                self._resolved[family] = resolve_includes(raw, raws, where, done)
                self._by_family[family] = build_mapping(self._resolved[family], where)
            except MappingError as exc:
                failed[family] = str(exc)
        for family, error in failed.items():  # the fault of an included family is reported as that
            bad = sorted(_included(raws[family]) & set(failed))
            if bad:
                error = f"{self._files[family]}: includes {bad[0]!r}, which is broken ({self._files[bad[0]]})"
            self.broken.append(BrokenMapping(self._files[family], error, family, _archs(raws[family])))
        for b in list(self.broken):  # a broken file in a later folder shadows the family it would replace
            if b.family in self._by_family and self._files[b.family] != b.path and \
                    _folder_index(b.path, folders) > self._order(b.family, folders):
                del self._by_family[b.family]
        for b in list(self.broken):  # a family that includes a broken one is broken too
            self._drop_includers(b.family, raws)
        self._by_arch: dict[str, ArchMapping] = {}
        for m in sorted(self._by_family.values(), key=lambda m: self._order(m.family, folders)):
            for arch in m.architectures:
                if arch in self._by_arch and self._by_arch[arch].family != m.family:
                    self.broken.append(BrokenMapping(self._files[m.family], f"{self._files[m.family]}: architecture "
                                                     f"{arch} is claimed by both {self._by_arch[arch].family} and {m.family}",
                                                     m.family, m.architectures))
                    continue
                self._by_arch[arch] = m

    def _order(self, family: str, folders: Sequence[Path]) -> int:
        return _folder_index(self._files[family], folders)

    def _drop_includers(self, family: str | None, raws: Mapping[str, dict[str, Any]]) -> None:
        if family is None:
            return
        for other, raw in raws.items():
            if other in self._by_family and family in _included(raw) and other != family:
                del self._by_family[other]
                self.broken.append(BrokenMapping(self._files[other], f"{self._files[other]}: includes {family!r}, "
                                                 f"which is broken ({self._files.get(family, '?')})", other, _archs(raw)))
                self._drop_includers(other, raws)

    def _broken_for(self, family: str | None = None, arch: str | None = None) -> BrokenMapping | None:
        return next((b for b in reversed(self.broken) if (family and b.family == family)
                     or (arch and arch in b.architectures)), None)

    @property
    def architectures(self) -> list[str]:
        return sorted(self._by_arch)

    @property
    def families(self) -> list[str]:
        return sorted(self._by_family)

    def file(self, family: str) -> Path:
        return self._files[family]

    def for_architecture(self, arch: str | None) -> ArchMapping:
        if arch not in self._by_arch:
            broken = self._broken_for(arch=arch)
            if broken is not None:
                raise MappingError(f"the mapping for {arch} is broken: {broken.error}")
            refusal = next((r for r in self.refused.values() if arch in r.architectures), None)
            if refusal is not None:
                raise UnsupportedArchitectureError(f"{arch} is refused ({refusal.path.name}): {refusal.reason}")
            raise UnsupportedArchitectureError(
                f"unsupported architecture {arch!r}; supported: {', '.join(self.architectures)}"
            )
        return self._by_arch[arch]

    def family(self, name: str) -> ArchMapping:
        if name not in self._by_family:
            broken = self._broken_for(family=name)
            if broken is not None:
                raise MappingError(f"the mapping family {name!r} is broken: {broken.error}")
            raise UnsupportedArchitectureError(f"unknown mapping family {name!r}; known: {', '.join(self.families)}")
        return self._by_family[name]

    def resolved_dict(self, family: str) -> dict[str, Any]:
        """The include-free mapping as plain data, to store inside an MCore checkpoint."""
        return copy.deepcopy(self._resolved[family])

    def raw_families(self) -> dict[str, dict[str, Any]]:
        """Every readable file's data by family (what ``include`` resolves against)."""
        return copy.deepcopy(self._raws)


def _folder_index(path: Path, folders: Sequence[Path]) -> int:
    """Which of ``folders`` holds ``path`` (later folders override earlier ones)."""
    return next((i for i, f in enumerate(folders) if f.resolve() == path.parent.resolve()), len(folders))


def _archs(raw: Mapping[str, Any]) -> tuple[str, ...]:
    archs = raw.get("architectures")
    return tuple(str(a) for a in archs) if isinstance(archs, list) else ()


def _included(raw: Mapping[str, Any]) -> set[str]:
    return {v["include"] for v in raw.values() if isinstance(v, dict) and isinstance(v.get("include"), str)}


def default_registry() -> MappingRegistry:
    """The shipped mappings, then the user folders; rebuilt when those change or are set again."""
    return _registry((mappings_dir(), *user_folders()), generation())


@lru_cache(maxsize=4)
def _registry(folders: tuple[Path, ...], _generation: int) -> MappingRegistry:
    return MappingRegistry(list(folders))


default_registry.cache_clear = _registry.cache_clear  # type: ignore[attr-defined]
