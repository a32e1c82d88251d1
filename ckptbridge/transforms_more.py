"""Two more invertible steps for `transforms` pipelines (kept apart to keep that module small).

``deinterleave`` is `transforms.Interleave` run the other way as a forward step: a checkpoint that
stores a fused projection group by group (Qwen3-Next's ``in_proj_qkvz``: per key head ``[q; k; v; z]``)
becomes each part whole (``[q_all], [k_all], ...``), which MCore concatenates. ``offset`` adds a
constant (a norm weight stored as ``w`` on one side and ``w - 1`` on the other, megatron's zero-centred
gamma); it is exact only for some values, so it checks every tensor it changes and refuses, naming the
count, rather than round a weight -- unless the conversion allows it (``--allow-rounding``: inside
:func:`rounding_allowed`, which counts what was rounded for the conversion's notes).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from . import expr
from .errors import MappingError
from .transforms import Interleave, Op, Shape, Tensors, _int


class Deinterleave(Op):
    """Each input -> its parts: input ``i`` holds ``groups`` groups of rows, each group its share of every
    part of ``parts[i]`` (total sizes) in turn; the outputs are every input's parts whole, in order. An
    input with one part passes through. Back: interleave each input's parts again."""

    name = "deinterleave"

    def __init__(self, groups: Any, parts: Sequence[Any]):
        self.groups = groups
        nested = bool(parts) and all(isinstance(p, (list, tuple)) for p in parts)
        self.parts = tuple(tuple(p) for p in parts) if nested else (tuple(parts),)
        if not all(self.parts):
            raise ValueError("every input needs at least one part")

    def _sizes(self, cfg: Mapping[str, Any]) -> list[list[int]]:
        return [[_int(s, cfg, "deinterleave part size") for s in p] for p in self.parts]

    def _check(self, in_shapes: Sequence[Shape], cfg: Mapping[str, Any]) -> list[list[int]]:
        sizes = self._sizes(cfg)
        if len(in_shapes) != len(sizes):
            raise MappingError(f"deinterleave: {len(in_shapes)} input(s), parts for {len(sizes)}")
        for shape, part in zip(in_shapes, sizes):
            if sum(part) != shape[0]:
                raise MappingError(f"deinterleave: parts {part} do not add up to {shape[0]} rows")
        return sizes

    def forward(self, xs, cfg):
        out: Tensors = []
        for x, part in zip(xs, self._check([tuple(x.shape) for x in xs], cfg)):
            if len(part) == 1:
                out.append(x)
            else:
                out += Interleave(self.groups).reverse([x], cfg, [(s, *x.shape[1:]) for s in part])
        return out

    def reverse(self, ys, cfg, in_shapes):
        sizes, ys, out = self._check(in_shapes, cfg), list(ys), []
        for part in sizes:
            mine, ys = ys[:len(part)], ys[len(part):]
            out += mine if len(part) == 1 else Interleave(self.groups).forward(mine, cfg)
        return out

    def out_shapes(self, in_shapes, cfg):
        out: list[Shape] = []
        for shape, part in zip(in_shapes, self._check(in_shapes, cfg)):
            if len(part) > 1:
                Interleave(self.groups)._g(cfg, part)
            out += [(s, *shape[1:]) for s in part]
        return out

    def names(self):
        return set().union(expr.names_in(self.groups), *(expr.names_in(s) for p in self.parts for s in p))

    def describe(self):
        return f"deinterleave({self.groups}, {[list(p) for p in self.parts]})"


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


_ALLOWED: list[Rounded] = []  # module-wide, not a context variable: the prefetcher's threads must see it


@contextmanager
def rounding_allowed(record: Rounded) -> Iterator[Rounded]:
    """Inside: an inexact `Offset` rounds (to its input's dtype, as ``x + v`` does) and counts it in ``record``."""
    _ALLOWED.append(record)
    try:
        yield record
    finally:
        _ALLOWED.remove(record)


class Offset(Op):
    """Add a constant to every tensor (HF's ``x * w`` norm weight -> megatron's zero-centred ``x * (1 + w')``:
    ``offset: -1``); back: subtract it. Floating-point addition is exact only for some values (``w - 1``
    for ``w`` in [0.5, 2]), so each direction checks that the other gives back every bit and raises
    naming how many values would change: a weight is never silently rounded (inside `rounding_allowed`
    it rounds and counts). A float32 conversion (``--dtype float32``) is exact for any bf16 weight."""

    name = "offset"
    #: the load-time proof draws values on a coarse dyadic grid, where an exact offset is exact
    grid_probe = True

    def __init__(self, value: Any):
        self.value = value

    def _v(self, cfg: Mapping[str, Any]) -> float:
        value = expr.evaluate(self.value, cfg)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MappingError(f"offset {self.value!r} is {value!r}, not a number")
        return float(value)

    def _add(self, xs: Tensors, v: float) -> Tensors:
        out = []
        for x in xs:
            y = x + v
            if y.dtype != x.dtype or not torch.equal(y - v, x):
                bad = int((y - v != x).sum())
                if y.dtype == x.dtype and _ALLOWED:
                    _ALLOWED[-1].add(bad, float(((y.double() - v) - x.double()).abs().max()))
                else:
                    raise MappingError(f"offset by {v:g} is not exact in {x.dtype} for {bad} of {x.numel()} values "
                                       f"(|values| far from {abs(v):g}); refusing to round the weights: convert "
                                       "with --dtype float32 (exact) or pass --allow-rounding to round them")
            out.append(y)
        return out

    def forward(self, xs, cfg):
        return self._add(list(xs), self._v(cfg))

    def reverse(self, ys, cfg, in_shapes):
        return self._add(list(ys), -self._v(cfg))

    def out_shapes(self, in_shapes, cfg):
        return [tuple(s) for s in in_shapes]

    def names(self):
        return expr.names_in(self.value)

    def describe(self):
        return f"offset({self.value})"
