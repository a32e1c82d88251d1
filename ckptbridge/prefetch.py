"""Overlap reading with writing.

Conversion alternates between reading a canonical tensor (file reads and the
transform, both of which release the GIL) and writing it. A one-deep
prefetch on a worker thread computes the next planned tensor while the
current one is written, at the cost of holding at most two canonical tensors.
The worker thread reads in the caller's context (``contextvars``), so settings scoped to a conversion,
such as `transform_values.rounding_allowed`, hold there as they do in the caller.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .errors import PlanError
from .spec import PlannedTensor


class Prefetcher:
    """``read(pt)`` that has usually computed ``pt`` already: requests must follow ``order`` (the write
    plan's `reads`, a tensor read twice listed twice); one that does not is a planning bug, refused."""

    def __init__(self, order: Sequence[PlannedTensor], read: Callable[[PlannedTensor], torch.Tensor]):
        self._order = list(order)
        self._next = 0
        self._read = read
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptbridge-prefetch")
        self._pending: tuple[int, Future[torch.Tensor]] | None = None

    def __call__(self, pt: PlannedTensor) -> torch.Tensor:
        index = self._next
        if index >= len(self._order) or self._order[index].mcore_name != pt.mcore_name:
            planned = self._order[index].mcore_name if index < len(self._order) else "nothing more"
            raise PlanError(f"the writer read {pt.mcore_name!r} where the write plan reads {planned!r}")
        self._next += 1
        if self._pending is not None and self._pending[0] == index:
            result = self._pending[1].result()
        else:
            if self._pending is not None:
                self._pending[1].result()  # let a stale prefetch finish before reading again
            result = self._read(pt)
        self._pending = None
        if index is not None and index + 1 < len(self._order):
            nxt = self._order[index + 1]
            self._pending = (index + 1, self._pool.submit(contextvars.copy_context().run, self._read, nxt))
        return result

    def close(self) -> None:
        if self._pending is not None:
            self._pending[1].cancel()
        self._pool.shutdown(wait=True)
