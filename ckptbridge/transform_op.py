"""The protocol every step of a transform pipeline implements, and the helpers steps share.

An operation maps a list of tensors (HF side) to a list of tensors (MCore side) and declares its
reverse and the shapes it produces, so the loader can run a pipeline both ways and prove it
bit-exact (:mod:`ckptbridge.transforms`). The steps themselves live by kind:
:mod:`ckptbridge.transform_layout` (move elements) and :mod:`ckptbridge.transform_values` (change values).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from . import expr
from .errors import MappingError

Shape = tuple[int, ...]
Tensors = list[torch.Tensor]


class Op:
    """One step: a list of tensors (HF side) -> a list of tensors (MCore side), and back."""

    name: ClassVar[str]
    #: tensors the step consumes, or None for "any number"
    arity: ClassVar[int | None] = None
    #: config fields (MCore argument names) the step reads besides its parameters
    needs: ClassVar[tuple[str, ...]] = ()

    def forward(self, xs: Tensors, cfg: Mapping[str, Any]) -> Tensors:
        raise NotImplementedError

    def reverse(self, ys: Tensors, cfg: Mapping[str, Any], in_shapes: Sequence[Shape]) -> Tensors:
        raise NotImplementedError

    def out_shapes(self, in_shapes: Sequence[Shape], cfg: Mapping[str, Any]) -> list[Shape]:
        raise NotImplementedError

    def names(self) -> set[str]:
        """Config names the step's parameters read (validated when the file loads)."""
        return set(self.needs)

    def describe(self) -> str:
        return self.name


class Transform(Op):
    """A many-to-one step given as ``to_mcore``/``to_hf``/``mcore_shape`` (the original interface)."""

    def to_mcore(self, hf: Sequence[torch.Tensor], cfg: Mapping[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, mcore: torch.Tensor, cfg: Mapping[str, Any], hf_shapes: Sequence[Shape]) -> Tensors:
        raise NotImplementedError

    def mcore_shape(self, hf_shapes: Sequence[Shape], cfg: Mapping[str, Any]) -> Shape:
        raise NotImplementedError

    def forward(self, xs, cfg):
        return [self.to_mcore(xs, cfg)]

    def reverse(self, ys, cfg, in_shapes):
        return list(self.to_hf(_one(ys, self.name), cfg, in_shapes))

    def out_shapes(self, in_shapes, cfg):
        return [tuple(self.mcore_shape(in_shapes, cfg))]


def _one(ys: Sequence[torch.Tensor], name: str) -> torch.Tensor:
    if len(ys) != 1:
        raise MappingError(f"operation {name!r} takes one tensor, gets {len(ys)}")
    return ys[0]


def _int(source: Any, cfg: Mapping[str, Any], what: str) -> int:
    value = expr.evaluate(source, cfg)
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
        raise MappingError(f"{what} {source!r} is {value!r}, not a whole number")
    return int(value)


def _single_shape(in_shapes: Sequence[Shape], name: str) -> Shape:
    if len(in_shapes) != 1:
        raise MappingError(f"operation {name!r} takes one tensor, gets {len(in_shapes)}")
    return tuple(in_shapes[0])
