"""The gate's steps, in the order they run.

A step is one module with two functions, registered with :func:`step`:

* ``parse(raw, source, enabled) -> options | None`` -- validate the step's config section
  (``raw`` is :data:`ckptbridge.gate.config.MISSING` when the file leaves it out; ``enabled`` holds
  the options of the steps before it) and return its options, or ``None`` when the step is off.
  Raise :class:`ckptbridge.gate.config.ConfigError` for a bad section: that is exit 2, before any work.
* ``run(ctx, options) -> list[Check]`` -- do the work and return one check per verdict.  A
  :class:`ckptbridge.errors.CkptBridgeError` that escapes ``run`` becomes one failed check of the
  step with the error as its reason (exit 1), never a crash.

Adding a step is adding such a module and importing it below; the top-level key of the config is
the step's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..context import GateContext
from ..results import Check

Parse = Callable[[Any, Any, dict[str, Any]], Any]
Run = Callable[[GateContext, Any], list[Check]]


@dataclass(frozen=True)
class Step:
    name: str
    parse: Parse
    run: Run


STEPS: dict[str, Step] = {}


def step(name: str, parse: Parse) -> Callable[[Run], Run]:
    """Register ``run`` (the decorated function) as step ``name`` with its config parser."""

    def register(run: Run) -> Run:
        if name in STEPS:
            raise ValueError(f"step {name!r} registered twice")
        STEPS[name] = Step(name, parse, run)
        return run

    return register


# registration order is run order
from . import convert, roundtrip, align, converge, export  # noqa: E402,F401
