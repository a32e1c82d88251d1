"""How one global MCore tensor is split across tensor-parallel ranks.

Every kind is described by the same primitive: for each TP rank, the list of
global *regions* (start, length along one axis) whose concatenation is that
rank's local shard. Splitting, merging and the chunk list of a torch_dist
checkpoint all derive from it, so a new kind is one small function.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from . import expr
from .errors import LayoutError, MappingError

Region = tuple[int, int]  # (start, length) along the shard axis


@dataclass(frozen=True)
class ShardKind:
    name: str
    axis: int | None  # None: replicated on every rank
    halves: int = 1  # >1: the axis holds that many equal parts, each split separately (GLU)
    padded: bool = False  # vocab: pad dim 0 to the padded vocab size before splitting
    #: ``parts``: the axis holds parts of these sizes (expressions over the Megatron args), each split
    #: separately (``glu`` with unequal parts: Qwen3-Next's in_proj [q; k; v; z; beta; alpha])
    part_sizes: tuple[Any, ...] = ()
    sizes: tuple[int, ...] | None = None  # part_sizes evaluated for one model (`resolved`)

    def resolved(self, args: Mapping[str, Any]) -> "ShardKind":
        """This kind with its part sizes evaluated for a model (itself when it has none)."""
        if not self.part_sizes:
            return self
        sizes = tuple(expr.evaluate(p, args) for p in self.part_sizes)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in sizes):
            raise MappingError(f"shard parts {list(self.part_sizes)} are {list(sizes)}, not sizes")
        return replace(self, sizes=sizes)

    def regions(self, shape: Sequence[int], tp: int, what: str = "tensor") -> list[list[Region]]:
        """Per rank, the global regions that make up its shard."""
        if self.axis is None:
            return [[(0, shape[0] if shape else 1)] for _ in range(tp)]
        size = shape[self.axis]
        if self.part_sizes:
            if self.sizes is None:
                raise LayoutError(f"{what}: shard parts {list(self.part_sizes)} were not evaluated for the model")
            if sum(self.sizes) != size or any(p % tp for p in self.sizes):
                raise LayoutError(f"{what}: dimension {self.axis} of size {size} cannot be split as parts "
                                  f"{list(self.sizes)}, each {tp} ways")
            starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
            return [[(s + r * (p // tp), p // tp) for s, p in zip(starts, self.sizes)] for r in range(tp)]
        part = size // self.halves
        if size % self.halves or part % tp:
            raise LayoutError(
                f"{what}: dimension {self.axis} of size {size} cannot be split {self.halves}x{tp} ways ({self.name} parallel)"
            )
        step = part // tp
        return [[(h * part + r * step, step) for h in range(self.halves)] for r in range(tp)]


KINDS: dict[str, ShardKind] = {
    k.name: k
    for k in (
        ShardKind("replicated", None),
        ShardKind("column", 0),
        ShardKind("row", 1),
        ShardKind("vocab", 0, padded=True),
        ShardKind("qkv", 0),  # whole query groups per rank; the group check lives in the layout
        ShardKind("glu", 0, halves=2),
    )
}


def get_kind(name: Any) -> ShardKind:
    """A kind by name, or ``{parts: [sizes]}``: each rank takes its 1/TP of every part."""
    if isinstance(name, Mapping):
        if set(name) != {"parts"} or not isinstance(name["parts"], (list, tuple)) or len(name["parts"]) < 2:
            raise KeyError(name)
        return ShardKind("parts", 0, part_sizes=tuple(name["parts"]))
    if name not in KINDS:
        raise KeyError(name)
    return KINDS[name]


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Pad dim 0 with zeros to ``rows`` (vocab padding); a no-op when already that size."""
    if tensor.shape[0] == rows:
        return tensor
    if tensor.shape[0] > rows:
        raise LayoutError(f"cannot pad {tensor.shape[0]} rows down to {rows}")
    out = tensor.new_zeros((rows, *tensor.shape[1:]))
    out[: tensor.shape[0]] = tensor
    return out


def split(tensor: torch.Tensor, kind: ShardKind, tp: int, what: str = "tensor") -> list[torch.Tensor]:
    """Global tensor -> one contiguous shard per TP rank (replicated: the same tensor for every rank)."""
    if kind.axis is None:
        return [tensor] * tp
    shards = []
    for regions in kind.regions(tensor.shape, tp, what):
        pieces = [tensor.narrow(kind.axis, start, length) for start, length in regions]
        shards.append(torch.cat(pieces, dim=kind.axis) if len(pieces) > 1 else pieces[0].contiguous())
    return shards


def merge(shards: Sequence[torch.Tensor], kind: ShardKind, what: str = "tensor") -> torch.Tensor:
    """TP shards -> global tensor; the exact inverse of `split`."""
    if kind.axis is None or len(shards) == 1:  # one shard is the global tensor: no copy (compare's memory bound)
        return shards[0]
    tp = len(shards)
    shape = list(shards[0].shape)
    shape[kind.axis] *= tp
    out = shards[0].new_empty(shape)
    for shard, regions in zip(shards, kind.regions(shape, tp, what)):
        offset = 0
        for start, length in regions:
            out.narrow(kind.axis, start, length).copy_(shard.narrow(kind.axis, offset, length))
            offset += length
    return out
