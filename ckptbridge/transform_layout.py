"""Transform steps that only move elements: join, split, (de)interleave, transpose, reshape, pick an expert.

Every step here is exact by construction (no value changes), and declares its reverse so a rule's
pipeline is proven invertible when its mapping file loads. ``deinterleave`` is `Interleave` run the
other way as a forward step: a checkpoint that stores a fused projection group by group (Qwen3-Next's
``in_proj_qkvz``: per key head ``[q; k; v; z]``) becomes each part whole (``[q_all], [k_all], ...``),
which MCore concatenates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from . import expr
from .errors import MappingError
from .transform_op import Op, Shape, Tensors, Transform, _int, _one, _single_shape


class Identity(Transform):
    """One HF tensor is the MCore tensor."""

    name = "identity"
    arity = 1

    def to_mcore(self, hf, cfg):
        return hf[0]

    def to_hf(self, mcore, cfg, hf_shapes):
        return [mcore]

    def mcore_shape(self, hf_shapes, cfg):
        return tuple(hf_shapes[0])


class Concat(Op):
    """Join on ``dim`` (gate, up -> linear_fc1 = [gate; up]); back: split at the input sizes."""

    name = "concat"

    def __init__(self, dim: int = 0):
        self.dim = dim

    def forward(self, xs, cfg):
        return [torch.cat(list(xs), dim=self.dim)]

    def reverse(self, ys, cfg, in_shapes):
        return [p.contiguous() for p in torch.split(_one(ys, self.name), [s[self.dim] for s in in_shapes], dim=self.dim)]

    def out_shapes(self, in_shapes, cfg):
        first = list(in_shapes[0])
        if any(len(s) != len(first) or [d for i, d in enumerate(s) if i != self.dim % len(s)]
               != [d for i, d in enumerate(first) if i != self.dim % len(first)] for s in in_shapes):
            raise MappingError(f"concat on dim {self.dim}: shapes {list(in_shapes)} differ off that dim")
        first[self.dim] = sum(s[self.dim] for s in in_shapes)
        return [tuple(first)]

    def describe(self):
        return "concat" if self.dim == 0 else f"concat(dim={self.dim})"


class Split(Op):
    """One tensor -> parts of the given sizes on ``dim`` (a fused ``qkv_proj`` -> q, k, v); back: concat.
    ``chunk: N`` is the same with N equal parts."""

    name = "split"
    arity = 1

    def __init__(self, sizes: Sequence[Any] | None = None, dim: int = 0, chunks: Any = None):
        self.sizes, self.dim, self.chunks = tuple(sizes or ()), dim, chunks

    def _sizes(self, total: int, cfg: Mapping[str, Any]) -> list[int]:
        if self.chunks is not None:
            n = _int(self.chunks, cfg, "chunk count")
            if n <= 0 or total % n:
                raise MappingError(f"chunk: {total} rows do not split into {n} equal parts")
            return [total // n] * n
        sizes = [_int(s, cfg, "split size") for s in self.sizes]
        if sum(sizes) != total or any(s < 0 for s in sizes):
            raise MappingError(f"split sizes {sizes} (from {list(self.sizes)}) do not add up to {total}")
        return sizes

    def forward(self, xs, cfg):
        x = _one(xs, self.name)
        return [p.contiguous() for p in torch.split(x, self._sizes(x.shape[self.dim], cfg), dim=self.dim)]

    def reverse(self, ys, cfg, in_shapes):
        return [torch.cat(list(ys), dim=self.dim)]

    def out_shapes(self, in_shapes, cfg):
        shape = list(_single_shape(in_shapes, self.name))
        out = []
        for size in self._sizes(shape[self.dim], cfg):
            part = list(shape)
            part[self.dim] = size
            out.append(tuple(part))
        return out

    def names(self):
        return set().union(*(expr.names_in(s) for s in self.sizes), expr.names_in(self.chunks))

    def describe(self):
        return f"chunk({self.chunks})" if self.chunks is not None else f"split({', '.join(map(str, self.sizes))})"


class Interleave(Op):
    """Tensors -> per group, each tensor's share of that group in turn: with ``groups = G``, tensor i of
    ``n_i`` rows contributes ``n_i / G`` rows to every group. ``qkv_interleave`` is this with
    ``groups: num_query_groups`` over q, k, v: MCore fuses attention projections group by group so
    a TP shard is a contiguous run of whole groups. Back: un-interleave at the input sizes."""

    name = "interleave"

    def __init__(self, groups: Any):
        self.groups = groups

    def _g(self, cfg: Mapping[str, Any], rows: Sequence[int]) -> int:
        g = _int(self.groups, cfg, "interleave groups")
        if g <= 0 or any(r % g for r in rows):
            raise MappingError(f"interleave: rows {list(rows)} are not multiples of groups={g}")
        return g

    def forward(self, xs, cfg):
        g = self._g(cfg, [x.shape[0] for x in xs])
        rest = xs[0].shape[1:]
        fused = torch.cat([x.reshape(g, x.shape[0] // g, *rest) for x in xs], dim=1)
        return [fused.reshape(-1, *rest)]

    def reverse(self, ys, cfg, in_shapes):
        y = _one(ys, self.name)
        rows = [s[0] for s in in_shapes]
        g = self._g(cfg, rows)
        rest = y.shape[1:]
        parts = torch.split(y.reshape(g, sum(rows) // g, *rest), [r // g for r in rows], dim=1)
        return [p.reshape(-1, *rest).contiguous() for p in parts]

    def out_shapes(self, in_shapes, cfg):
        self._g(cfg, [s[0] for s in in_shapes])
        if any(tuple(s[1:]) != tuple(in_shapes[0][1:]) for s in in_shapes):
            raise MappingError(f"interleave: shapes {list(in_shapes)} differ beyond the first dim")
        return [(sum(s[0] for s in in_shapes), *in_shapes[0][1:])]

    def names(self):
        return expr.names_in(self.groups)

    def describe(self):
        return f"interleave({self.groups})"


class QKVInterleave(Interleave):
    """q, k, v -> per query group ``[q heads of g; k_g; v_g]`` (weights and biases); ``kv_channels``
    is the head dim, which is not ``hidden/heads`` for models with an explicit ``head_dim``."""

    name = "qkv_interleave"
    arity = 3
    needs = ("num_attention_heads", "num_query_groups", "kv_channels")

    def __init__(self) -> None:
        super().__init__("num_query_groups")

    def _g(self, cfg, rows):
        heads, groups = int(cfg["num_attention_heads"]), int(cfg["num_query_groups"])
        if heads % groups:
            raise MappingError(f"num_attention_heads={heads} is not a multiple of num_query_groups={groups}")
        return super()._g(cfg, rows)

    def names(self):
        return set(self.needs)

    def describe(self):
        return self.name


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


class Transpose(Op):
    """Swap two dims of every tensor (a checkpoint that stores ``[in, out]``); its own reverse."""

    name = "transpose"

    def __init__(self, a: int = 0, b: int = 1):
        self.a, self.b = a, b

    def forward(self, xs, cfg):
        return [x.transpose(self.a, self.b).contiguous() for x in xs]

    def reverse(self, ys, cfg, in_shapes):
        return [y.transpose(self.a, self.b).contiguous() for y in ys]

    def out_shapes(self, in_shapes, cfg):
        out = []
        for s in in_shapes:
            s = list(s)
            s[self.a], s[self.b] = s[self.b], s[self.a]
            out.append(tuple(s))
        return out

    def describe(self):
        return f"transpose({self.a}, {self.b})"


class Reshape(Op):
    """One tensor -> the given shape (expressions; one may be -1); back: the input's shape."""

    name = "reshape"
    arity = 1

    def __init__(self, shape: Sequence[Any]):
        self.shape = tuple(shape)

    def _target(self, n: int, cfg: Mapping[str, Any]) -> Shape:
        dims = [_int(d, cfg, "reshape dim") for d in self.shape]
        if dims.count(-1) == 1:
            known = math.prod(d for d in dims if d != -1)
            dims[dims.index(-1)] = n // known if known and n % known == 0 else -2
        if math.prod(dims) != n or any(d < 0 for d in dims):
            raise MappingError(f"reshape to {list(self.shape)} cannot hold {n} elements")
        return tuple(dims)

    def forward(self, xs, cfg):
        x = _one(xs, self.name)
        return [x.reshape(self._target(x.numel(), cfg))]

    def reverse(self, ys, cfg, in_shapes):
        return [_one(ys, self.name).reshape(_single_shape(in_shapes, self.name))]

    def out_shapes(self, in_shapes, cfg):
        return [self._target(math.prod(_single_shape(in_shapes, self.name)), cfg)]

    def names(self):
        return set().union(*(expr.names_in(d) for d in self.shape))

    def describe(self):
        return f"reshape({', '.join(map(str, self.shape))})"


class TakeExpert(Op):
    """The first step of a per-expert rule's alternative layout in which one HF tensor holds every
    expert's tensor on a leading axis (transformers 5's fused experts): expert ``E``'s slot. Its
    reverse is over all experts at once (stack), which the loader proves with `check_expert_stack`."""

    name = "take_expert"
    arity = 1

    def forward(self, xs, cfg):
        return [_one(xs, self.name)[int(cfg["E"])]]

    def reverse(self, ys, cfg, in_shapes):
        raise MappingError("take_expert is undone over all experts together (read-only alternative layouts)")

    def out_shapes(self, in_shapes, cfg):
        return [tuple(_single_shape(in_shapes, self.name)[1:])]
