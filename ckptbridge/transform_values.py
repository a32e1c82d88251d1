"""Transform steps that change values: ``scale`` and ``offset``, and the switch that lets ``offset`` round.

Floating-point arithmetic is exact only for some values, so these steps are where a mapping could lose
information. ``scale`` is proven at load time (only exact factors, powers of two, round-trip). ``offset``
adds a constant (a norm weight stored as ``w`` on one side and ``w - 1`` on the other, megatron's
zero-centred gamma); it checks every tensor it changes and refuses, naming the count, rather than round a
weight -- unless the conversion allows it (``--allow-rounding``: inside :func:`rounding_allowed`, which
counts what was rounded for the conversion's notes).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from . import expr
from .errors import MappingError
from .transform_op import Op, Tensors


class _PerElement(Op):
    """A step applying one number, an expression of the config, to every element: shapes unchanged, the
    expression's names validated when the file loads."""

    def __init__(self, number: Any):
        self.number = number

    def _number(self, cfg: Mapping[str, Any], what: str, zero: bool) -> float:
        value = expr.evaluate(self.number, cfg)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (value == 0 and not zero):
            raise MappingError(f"{what} {self.number!r} is {value!r}, not a {'' if zero else 'non-zero '}number")
        return float(value)

    def out_shapes(self, in_shapes, cfg):
        return [tuple(s) for s in in_shapes]

    def names(self):
        return expr.names_in(self.number)

    def describe(self):
        return f"{self.name}({self.number})"


class Scale(_PerElement):
    """Multiply every tensor by a factor (an expression); back: divide. Only exact factors (powers
    of two) survive the load-time round trip, so a lossy scale is refused, not applied."""

    name = "scale"

    def __init__(self, factor: Any):
        super().__init__(factor)

    def forward(self, xs, cfg):
        f = self._number(cfg, "scale factor", zero=False)
        return [x * f for x in xs]

    def reverse(self, ys, cfg, in_shapes):
        f = self._number(cfg, "scale factor", zero=False)
        return [y / f for y in ys]


@dataclass
class Rounded:
    """What allowed roundings changed: tensors, values and the largest absolute change."""

    tensors: int = 0
    values: int = 0
    max_error: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, values: int, error: float) -> None:
        with self._lock:  # the prefetcher's threads read (and transform) tensors concurrently
            self.tensors, self.values, self.max_error = self.tensors + 1, self.values + values, max(self.max_error, error)


#: where an inexact `Offset` may round, the conversion's count; a context variable, so the permission holds
#: for the conversion that gave it (and the threads that read for it: `prefetch` runs them in its context)
_ALLOWED: ContextVar[Rounded | None] = ContextVar("ckptbridge_rounding_allowed", default=None)


@contextmanager
def rounding_allowed(record: Rounded) -> Iterator[Rounded]:
    """Inside: an inexact `Offset` rounds (to its input's dtype, as ``x + v`` does) and counts it in ``record``."""
    token = _ALLOWED.set(record)
    try:
        yield record
    finally:
        _ALLOWED.reset(token)


class Offset(_PerElement):
    """Add a constant to every tensor (HF's ``x * w`` norm weight -> megatron's zero-centred ``x * (1 + w')``:
    ``offset: -1``); back: subtract it. Floating-point addition is exact only for some values (``w - 1``
    for ``w`` in [0.5, 2]), so each direction checks that the other gives back every bit and raises
    naming how many values would change: a weight is never silently rounded (inside `rounding_allowed`
    it rounds and counts). A float32 conversion (``--dtype float32``) is exact for any bf16 weight."""

    name = "offset"
    #: the load-time proof draws values on a coarse dyadic grid, where an exact offset is exact
    grid_probe = True

    def __init__(self, value: Any):
        super().__init__(value)

    def _add(self, xs: Tensors, v: float) -> Tensors:
        out = []
        for x in xs:
            y = x + v
            if y.dtype != x.dtype or not torch.equal(y - v, x):
                bad = int((y - v != x).sum())
                allowed = _ALLOWED.get()
                if y.dtype == x.dtype and allowed is not None:
                    allowed.add(bad, float(((y.double() - v) - x.double()).abs().max()))
                else:
                    raise MappingError(f"offset by {v:g} is not exact in {x.dtype} for {bad} of {x.numel()} values "
                                       f"(|values| far from {abs(v):g}); refusing to round the weights: convert "
                                       "with --dtype float32 (exact) or pass --allow-rounding to round them")
            out.append(y)
        return out

    def forward(self, xs, cfg):
        return self._add(list(xs), self._number(cfg, "offset", zero=True))

    def reverse(self, ys, cfg, in_shapes):
        return self._add(list(ys), -self._number(cfg, "offset", zero=True))
