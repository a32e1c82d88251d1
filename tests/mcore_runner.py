"""Test-side name for the package's worker launcher (forkserver, gloo, timeouts, tracebacks)."""

from __future__ import annotations

from typing import Any
from collections.abc import Callable

from ckptbridge.mcore.launch import DEFAULT_PRELOAD, WorkerError, free_port, run_workers

__all__ = ["run_distributed", "WorkerError", "free_port"]


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; ``fn`` must be module-level."""
    return run_workers(fn, world_size, *args, timeout=timeout, preload=(*DEFAULT_PRELOAD, "mcore_runner"))
