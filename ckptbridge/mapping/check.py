"""``ckptbridge check-mapping``: everything ckptbridge can prove about one mapping file, before use.

A mapping file is loaded as at conversion time (schema, names, every rule's pipeline and every
alternative layout proven invertible on random tensors), then its config translation is run on a
real HF config (``--hf``, else the shipped preset of the same architecture): HF config -> Megatron
arguments (the ``checks`` pass, every field exists), the tensor plan (every shape evaluates),
and, when the file has an ``hf_config`` section, Megatron arguments -> HF config -> Megatron
arguments again, which must reproduce every argument and every architectural HF field the
``config`` section reads; a ``detect`` expression must recognise the arguments its own file
produces. The first failure is raised naming the section and field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import expr
from ..errors import CkptBridgeError, MappingError
from ..hf_config import architecture, normalise, read_config
from .features import with_features
from .registry import MappingRegistry, _read_file, build_mapping, refused_family, resolve_includes
from .schema import ArchMapping

#: Megatron arguments no HF field decides (the padded vocabulary is the layout's)
_LAYOUT_ARGS = {"padded_vocab_size"}


@dataclass
class CheckReport:
    family: str
    lines: list[str] = field(default_factory=list)
    spec: Any = None  # the ModelSpec planned from the checked config (None: no config to check on)

    def ok(self, what: str) -> None:
        self.lines.append(f"ok: {what}")

    def note(self, what: str) -> None:
        self.lines.append(f"note: {what}")


def load_file(path: Path, registry: MappingRegistry) -> tuple[ArchMapping, dict[str, Any]]:
    """The file's mapping, its includes resolved against the registry's readable files."""
    raw = _read_file(Path(path))
    others = {**registry.raw_families(), raw["family"]: raw}
    resolved = resolve_includes(raw, others, str(path))
    return build_mapping(resolved, str(path)), resolved


def check_mapping(path: Path, registry: MappingRegistry, hf: Path | None = None,
                  presets: dict[str, dict[str, Any]] | None = None) -> CheckReport:
    """Check one file; raises `MappingError` (or another `CkptBridgeError`) naming the first problem."""
    refusal = refused_family(_read_file(Path(path)), Path(path))
    if refusal is not None:  # nothing to convert: the file states why
        report = CheckReport(refusal.family)
        report.ok(f"refusal of {', '.join(refusal.architectures)}: {refusal.reason}")
        return report
    mapping, _ = load_file(path, registry)
    report = CheckReport(mapping.family)
    rules = len(mapping.tensors)
    alternatives = sum(len(r.alternatives) for r in mapping.tensors)
    report.ok(f"schema; {rules} rules and {alternatives} alternative layouts invertible (bit-exact both ways)")
    config, origin = _hf_config(mapping, hf, presets or {})
    if config is None:
        report.note("config translation not checked: no --hf given and no shipped preset of "
                    f"{', '.join(mapping.architectures)}")
        return report
    if architecture(config) not in mapping.architectures:
        raise MappingError(f"{path}: {origin} is a {architecture(config)}, the file maps {list(mapping.architectures)}")
    args = _translate(mapping, config, f"{path}: config (HF -> Megatron) on {origin}")
    from ..spec import ModelSpec  # the plan evaluates every rule's shapes on these args

    try:
        planned = ModelSpec(mapping, config, args).planned()
    except (MappingError, KeyError, TypeError, ValueError) as exc:
        raise MappingError(f"{path}: tensor plan on {origin}: {exc}") from None
    report.ok(f"config (HF -> Megatron) on {origin}: {len(args)} arguments, {len(planned)} tensors planned")
    report.spec = ModelSpec(mapping, config, args)
    if not mapping.hf_config:
        report.note("no hf_config section: a Megatron-LM checkpoint without an HF config cannot be exported")
        return report
    env = with_features({**args, "padded_vocab_size": args.get("vocab_size")})
    synth = mapping.synthesize_hf_config(env)
    back = _translate(mapping, synth, f"{path}: config applied to the hf_config section's output")
    for key, want in args.items():
        if key in _LAYOUT_ARGS:
            continue
        if key not in back or not _same(back[key], want):
            raise MappingError(f"{path}: hf_config does not invert config: {key} is {want!r} from {origin}, "
                               f"{back.get(key, '<missing>')!r} after hf_config and back (config: {key}: {mapping.config.get(key)!r})")
    norm, norm_back = normalise(config, mapping.hf_defaults), normalise(synth, mapping.hf_defaults)
    read = set().union(*(expr.names_in(v) for v in mapping.config.values()))
    for name in sorted(read):
        if name in norm and not _same(norm_back.get(name), norm[name]):
            raise MappingError(f"{path}: hf_config writes HF field {name} as {norm_back.get(name)!r}, "
                               f"{origin} has {norm[name]!r}")
    report.ok(f"hf_config (Megatron -> HF) reproduces all {len(args)} arguments and the {len(read)} HF fields config reads")
    if mapping.detect is not None:
        if not mapping.describes(env):
            raise MappingError(f"{path}: detect {mapping.detect!r} does not recognise the arguments this file's own config produces")
        report.ok("detect recognises the file's own arguments")
    else:
        report.note("no detect: a Megatron-LM checkpoint picks this family only with --arch")
    return report


def _hf_config(mapping: ArchMapping, hf: Path | None, presets: dict[str, dict[str, Any]]) -> tuple[dict | None, str]:
    if hf is not None:
        return read_config(Path(hf)), str(hf)
    from ..presets import convertible_config

    for name, preset in sorted(presets.items()):
        if architecture(preset["hf_config"]) in mapping.architectures:
            changed = ", ".join(f"{k}={v!r}" for k, v in preset.get("overrides", {}).items())
            return convertible_config(preset), f"preset {name}" + (f" (with {changed})" if changed else "")
    return None, ""


def _translate(mapping: ArchMapping, config: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        return mapping.translate_config(normalise(config, mapping.hf_defaults))
    except CkptBridgeError as exc:
        raise MappingError(f"{where}: {exc}") from None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b
