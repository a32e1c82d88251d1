"""One gate run: resolve the source, run the enabled steps in order, collect their checks.

Failures of the thing under test become failed checks (exit 1); only a config or input problem
found before any step runs (a missing folder, a preset not in the HF cache) is an error (exit 2).
A step that crashes outside ckptbridge's own checks (megatron or torch failing on a damaged
checkpoint) is also a failed check, with its traceback on stderr: CI still gets its JUnit XML and
summary, and a crash is never mistaken for a pass.
The source is only ever read; everything made goes to the work folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import CkptBridgeError
from .config import ConfigError, GateConfig, SourceConfig
from .context import Candidate, GateContext
from .results import FAIL, Check, GateResult
from .steps import STEPS


@contextlib.contextmanager
def workspace(work_dir: Path | None) -> Iterator[Path]:
    """``work_dir`` (kept afterwards, for debugging a failure) or a temporary folder (deleted)."""
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
        yield work_dir
        return
    with tempfile.TemporaryDirectory(prefix="ckptbridge-gate-") as tmp:
        yield Path(tmp)


def _existing_dir(path: Path, key: str) -> Path:
    if not path.is_dir():
        raise ConfigError(f"{key}: {path} is not a folder")
    return path


def resolve_hf(source: SourceConfig, work: Path) -> Path:
    """The HF folder under test: given, random-init weights of the preset (made in ``work``), or the
    preset's hub id from the local HF cache (never downloaded)."""
    from ..harness.weights import build_random_hf, cached_snapshot
    from ..presets import load_preset

    if source.hf is not None:
        return _existing_dir(source.hf, "source.hf")
    assert source.preset is not None  # config.parse_source guarantees hf or preset
    if source.random_init:
        return build_random_hf(source.preset, work / "hf-random", source.layers, source.seed, torch.float32, source.shrink)
    hub_id = load_preset(source.preset)["hub_id"]
    snap = cached_snapshot(hub_id)
    if snap is None:
        raise ConfigError(f"source.preset: {hub_id} is not in the local HF cache (nothing is downloaded); "
                          f"give source.hf, or random_init: true")
    return snap


def run_gate(config: GateConfig, work_dir: Path | None = None) -> GateResult:
    """Run every enabled step.  An input problem found before the steps raises ``ConfigError``
    (exit 2); an exception that escapes a step becomes that step's failed check."""
    start = time.perf_counter()
    result = GateResult(config.path)
    if config.source.mcore is not None:
        _existing_dir(config.source.mcore, "source.mcore")
    config.report_dir.mkdir(parents=True, exist_ok=True)
    with workspace(work_dir) as work:
        ctx = GateContext(config, resolve_hf(config.source, work), work, config.report_dir)
        if config.source.mcore is not None:  # the checkpoint under test is given: `convert` is off
            ctx.candidates.append(Candidate("mcore", config.source.mcore))
        for name, options in config.steps.items():
            t0 = time.perf_counter()
            try:
                checks = STEPS[name].run(ctx, options)
            except CkptBridgeError as exc:
                checks = [Check(name, "run", FAIL, f"{name} failed: {exc}")]
            except Exception as exc:  # noqa: BLE001 -- a library crash (megatron on a damaged file) is still a verdict
                traceback.print_exc()  # the bug, if it is one, keeps its traceback
                first = (str(exc).strip().splitlines() or [""])[0]
                checks = [Check(name, "run", FAIL, f"{name} crashed: {type(exc).__name__}: {first} (traceback on stderr)")]
            result.step_seconds[name] = time.perf_counter() - t0
            result.checks += checks
        result.files.update(ctx.files)
    result.seconds = time.perf_counter() - start
    return result


def jsonable_options(options: Any) -> Any:
    """Step options (dataclasses, lists of them) as plain data for summary.json."""
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        return dataclasses.asdict(options)
    if isinstance(options, list):
        return [jsonable_options(o) for o in options]
    return options
