"""Read and validate a ``ckptbridge gate`` config (YAML or TOML).

Validation is strict because a CI gate that silently ignores a misspelt threshold passes
things it should not: every key is known, typed and checked here, before any work starts, and
an error names the key by its full path (``align.thresholds.logits.max_ab``).  Step sections
are parsed by the step that owns them (``ckptbridge.gate.steps``), so a new step brings its own
keys; this module reads the file and the sections that are not steps (``source``, ``report``).

Relative paths in the file are relative to the file's own folder, so the same config works
whatever directory CI runs the command from.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import CkptBridgeError
from ..presets import preset_names

#: Stands for a section that the file leaves out (``None`` would be an explicit YAML ``null``).
MISSING: Any = object()


class ConfigError(CkptBridgeError):
    """The config file is unreadable, has an unknown key, or a value of the wrong type or range."""


class Section:
    """The keys of one mapping, read one by one with their types; :meth:`finish` refuses the rest."""

    def __init__(self, raw: Any, where: str) -> None:
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_kind(raw)}")
        self.raw, self.where, self.known = raw, where, []

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def has(self, name: str) -> bool:
        return name in self.raw

    def take(self, name: str, kind: type, default: Any = None, *, choices: tuple[Any, ...] | None = None,
             minimum: float | None = None, nullable: bool = False) -> Any:
        """The value of ``name`` (``default`` when absent), checked against ``kind``/``choices``/``minimum``.
        An explicit ``null`` is accepted only when ``nullable``."""
        self.known.append(name)
        if name not in self.raw:
            return default
        value = self.raw[name]
        if value is None:
            if nullable:
                return None
            raise ConfigError(f"{self.key(name)}: must not be null")
        return check_value(value, kind, self.key(name), choices, minimum)

    def take_raw(self, name: str, default: Any = MISSING) -> Any:
        """The value of ``name`` unchecked, for a nested section its owner validates."""
        self.known.append(name)
        return self.raw.get(name, default)

    def finish(self) -> None:
        unknown = [k for k in self.raw if k not in self.known]
        if unknown:
            raise ConfigError(f"{self.key(str(unknown[0]))}: unknown key (known keys{' of ' + self.where if self.where else ''}: {', '.join(self.known)})")


def check_value(value: Any, kind: type, where: str, choices: tuple[Any, ...] | None = None,
                minimum: float | None = None) -> Any:
    """``value`` as ``kind``: ints and numeric strings are accepted as floats (PyYAML reads ``1e-4``,
    without a dot, as a string), booleans are never numbers."""
    if kind is float and isinstance(value, (int, str)) and not isinstance(value, bool) and _numeric(value):
        value = float(value)
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is Path and isinstance(value, str):
        value, ok = Path(value), True
    if not ok:
        raise ConfigError(f"{where}: expected {'a path' if kind is Path else kind.__name__}, got {_kind(value)} {value!r}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}: must be at least {minimum:g}, got {value}")
    return value


def _numeric(value: int | str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class SourceConfig:
    """What is under test: an HF folder (given, a preset from the local HF cache, or random-init
    weights of a preset) and optionally an existing MCore checkpoint to check instead of converting."""

    hf: Path | None = None
    mcore: Path | None = None
    preset: str | None = None
    random_init: bool = False
    layers: int | None = None
    shrink: bool = False
    seed: int = 0


@dataclass(frozen=True)
class GateConfig:
    path: Path
    source: SourceConfig
    report_dir: Path
    steps: dict[str, Any] = field(default_factory=dict)  # enabled steps, in run order -> their parsed options


def _path(base: Path, p: Path | None) -> Path | None:
    return None if p is None else (p if p.is_absolute() else base / p)


def parse_source(raw: Any, base: Path) -> SourceConfig:
    if raw is MISSING:
        raise ConfigError("source: missing (give source.hf, source.preset, or source.preset with random_init: true)")
    s = Section(raw, "source")
    hf = _path(base, s.take("hf", Path))
    mcore = _path(base, s.take("mcore", Path))
    preset = s.take("preset", str, choices=tuple(preset_names()))
    random_init = s.take("random_init", bool, False)
    layers = s.take("layers", int, minimum=1)
    shrink = s.take("shrink", bool, False)
    seed = s.take("seed", int, 0)
    s.finish()
    if random_init and preset is None:
        raise ConfigError("source.random_init: needs source.preset (the architecture to fill with random weights)")
    if random_init and hf is not None:
        raise ConfigError("source: give source.hf or source.random_init, not both")
    if (layers is not None or shrink or s.has("seed")) and not random_init:
        raise ConfigError("source.layers/shrink/seed: only apply with source.random_init: true")
    if hf is None and preset is None:
        raise ConfigError("source: give source.hf (a local HF folder) or source.preset (with random_init: true, or from the local HF cache)")
    return SourceConfig(hf, mcore, preset, random_init, layers, shrink, seed)


def parse_report(raw: Any, base: Path) -> Path:
    if raw is MISSING:
        return base / "reports" / "gate"
    s = Section(raw, "report")
    out = _path(base, s.take("dir", Path, Path("reports/gate")))
    s.finish()
    assert out is not None
    return out


def read_file(path: Path) -> dict[str, Any]:
    """The raw mapping of a ``.yaml``/``.yml`` or ``.toml`` file."""
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml"):
        raise ConfigError(f"{path}: a gate config is a .yaml, .yml or .toml file")
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        raw = tomllib.loads(text) if suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not valid {'TOML' if suffix == '.toml' else 'YAML'}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {_kind(raw)}")
    return raw


def load_config(path: Path, report_dir: Path | None = None) -> GateConfig:
    """Parse and validate ``path``; ``report_dir`` (the CLI's ``--report-dir``) replaces ``report.dir``."""
    from .steps import STEPS

    path = Path(path)
    raw = read_file(path)
    base = path.resolve().parent
    top = Section(raw, "")
    source = parse_source(top.take_raw("source"), base)
    report = parse_report(top.take_raw("report"), base)
    steps: dict[str, Any] = {}
    for name, step in STEPS.items():
        options = step.parse(top.take_raw(name), source, steps)
        if options is not None:
            steps[name] = options
    top.finish()
    if not steps:
        raise ConfigError(f"{path}: every step is disabled; nothing to check")
    return GateConfig(path, source, report_dir or report, steps)
