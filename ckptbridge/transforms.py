"""Invertible operations between a rule's HF tensors and its one canonical MCore tensor.

A rule's ``transform`` is a pipeline of operations, read left to right from the HF side to
the MCore side. Every operation declares its reverse (how to go back given the shapes it was
applied to) and the shapes it produces, so the loader can run the pipeline both ways on random
tensors and refuse a file whose pipeline does not round-trip bit-exactly: a mapping cannot
silently lose information in either direction. Operations are parametrised by expressions over
the model's Megatron arguments (``split: [num_attention_heads * kv_channels, ...]``).

The design follows transformers 5's weight converters (``core_model_loading.py``: each
``ConversionOps`` has a ``reverse_op``), kept as data: a closed set of operations with
parameters, composed per rule, instead of Python per architecture.
"""

from __future__ import annotations

import math
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


def _single_shape(in_shapes: Sequence[Shape], name: str) -> Shape:
    if len(in_shapes) != 1:
        raise MappingError(f"operation {name!r} takes one tensor, gets {len(in_shapes)}")
    return tuple(in_shapes[0])


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


class Scale(Op):
    """Multiply every tensor by a factor (an expression); back: divide. Only exact factors (powers
    of two) survive the load-time round trip, so a lossy scale is refused, not applied."""

    name = "scale"

    def __init__(self, factor: Any):
        self.factor = factor

    def _f(self, cfg: Mapping[str, Any]) -> float:
        value = expr.evaluate(self.factor, cfg)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value == 0:
            raise MappingError(f"scale factor {self.factor!r} is {value!r}, not a non-zero number")
        return float(value)

    def forward(self, xs, cfg):
        f = self._f(cfg)
        return [x * f for x in xs]

    def reverse(self, ys, cfg, in_shapes):
        f = self._f(cfg)
        return [y / f for y in ys]

    def out_shapes(self, in_shapes, cfg):
        return [tuple(s) for s in in_shapes]

    def names(self):
        return expr.names_in(self.factor)

    def describe(self):
        return f"scale({self.factor})"


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


#: steps without parameters, by name (tests may register more)
TRANSFORMS: dict[str, Op] = {t.name: t for t in (Identity(), Concat(), QKVInterleave(), TakeExpert())}


def _build(name: str, params: Any, where: str) -> Op:
    """One step from its YAML form: ``name`` (no parameters) or ``{name: parameters}``."""
    try:
        if name == "concat" and params is not None:
            return Concat(**_kw(params, ("dim",), "dim"))
        if name == "split":
            return Split(**_kw(params, ("sizes", "dim"), "sizes"))
        if name == "chunk":
            kw = _kw(params, ("chunks", "dim"), "chunks")
            return Split(chunks=kw["chunks"], dim=kw.get("dim", 0))
        if name == "interleave":
            return Interleave(**_kw(params, ("groups",), "groups"))
        if name == "transpose":
            a, b = params if isinstance(params, (list, tuple)) else (0, 1)
            return Transpose(int(a), int(b))
        if name == "reshape":
            return Reshape(**_kw(params, ("shape",), "shape"))
        if name == "scale":
            return Scale(**_kw(params, ("factor",), "factor"))
        if name in ("deinterleave", "offset"):
            from .transforms_more import Deinterleave, Offset
            if name == "offset":
                return Offset(**_kw(params, ("value",), "value"))
            if not isinstance(params, Mapping) or set(params) != {"groups", "parts"}:
                raise TypeError("expects {groups: G, parts: [sizes] or [[sizes of input 0], ...]}")
            return Deinterleave(params["groups"], params["parts"])
    except (TypeError, ValueError) as exc:
        raise MappingError(f"{where}: operation {name!r} with parameters {params!r}: {exc}") from None
    if name in TRANSFORMS and params is None:
        return TRANSFORMS[name]
    known = sorted({*TRANSFORMS, "split", "chunk", "interleave", "deinterleave", "transpose", "reshape", "scale",
                    "offset"})
    if name in TRANSFORMS:
        raise MappingError(f"{where}: operation {name!r} takes no parameters")
    raise MappingError(f"{where}: unknown operation {name!r}; known: {', '.join(known)}")


def _kw(params: Any, allowed: tuple[str, ...], main: str) -> dict[str, Any]:
    """Parameters as keywords: a mapping of allowed keys, or the main parameter alone."""
    if isinstance(params, Mapping):
        if set(params) - set(allowed) or main not in params and main != "dim":
            raise TypeError(f"expects {main!r} (and optionally {', '.join(a for a in allowed if a != main) or 'nothing else'})")
        return dict(params)
    if params is None:
        raise TypeError(f"needs {main!r}")
    return {main: params}


class Pipeline(Transform):
    """The steps of one rule, HF side first; ends in exactly one MCore tensor."""

    def __init__(self, steps: Sequence[Op]):
        self.steps = tuple(steps)
        self.name = " -> ".join(s.describe() for s in self.steps)  # type: ignore[misc]
        first = self.steps[0].arity if self.steps else 1
        self.arity = first if all(s.arity == 1 for s in self.steps[1:]) else None  # type: ignore[misc]

    def names(self) -> set[str]:
        return set().union(*(s.names() for s in self.steps))

    def stage_shapes(self, hf_shapes: Sequence[Shape], cfg: Mapping[str, Any]) -> list[list[Shape]]:
        """The shapes entering each step, then the final ones."""
        stages = [[tuple(s) for s in hf_shapes]]
        for step in self.steps:
            if step.arity is not None and step.arity != len(stages[-1]):
                raise MappingError(f"operation {step.describe()!r} takes {step.arity} tensor(s), gets {len(stages[-1])}")
            stages.append([tuple(s) for s in step.out_shapes(stages[-1], cfg)])
        if len(stages[-1]) != 1:
            raise MappingError(f"the steps {self.name!r} end in {len(stages[-1])} tensors; a rule makes one MCore tensor")
        return stages

    def to_mcore(self, hf, cfg):
        xs = list(hf)
        for step in self.steps:
            xs = step.forward(xs, cfg)
        return _one(xs, self.name)

    def to_hf(self, mcore, cfg, hf_shapes):
        stages = self.stage_shapes(hf_shapes, cfg)
        ys = [mcore]
        for step, shapes in zip(reversed(self.steps), reversed(stages[:-1])):
            ys = step.reverse(ys, cfg, shapes)
        return ys

    def mcore_shape(self, hf_shapes, cfg):
        return self.stage_shapes(hf_shapes, cfg)[-1][0]


def parse_transform(raw: Any, where: str) -> Pipeline:
    """A rule's ``transform``: a step name, ``{name: parameters}``, or a list of those (a pipeline)."""
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise MappingError(f"{where}: transform lists no operation")
    steps = []
    for item in items:
        if isinstance(item, str):
            steps.append(_build(item, None, where))
        elif isinstance(item, Mapping) and len(item) == 1:
            (name, params), = item.items()
            steps.append(_build(str(name), params, where))
        else:
            raise MappingError(f"{where}: a transform step is a name or {{name: parameters}}, not {item!r}")
    if any(isinstance(s, TakeExpert) for s in steps[1:]):
        raise MappingError(f"{where}: take_expert can only be the first operation")
    return Pipeline(steps)


def get_transform(name: str) -> Transform:
    """A one-step pipeline by name (kept for callers of the original interface)."""
    return parse_transform(name, "transform")


def check_round_trip(transform: Transform, hf_shapes: Sequence[Shape], cfg: Mapping[str, Any], where: str) -> None:
    """Prove ``transform`` invertible on random tensors of the given shapes.

    Both directions are checked bit-exactly: HF -> MCore -> HF and MCore -> HF -> MCore. Random
    values (not zeros) make a dropped or swapped slice visible.
    """
    gen = torch.Generator().manual_seed(0)
    grid = any(getattr(s, "grid_probe", False) for s in getattr(transform, "steps", ()))
    randn = (lambda s, generator: torch.randint(-8, 9, s, generator=generator) / 8.0) if grid else torch.randn
    hf = [randn(s, generator=gen) for s in hf_shapes]
    try:
        expected_shape = transform.mcore_shape(hf_shapes, cfg)
        mcore = transform.to_mcore(hf, cfg)
        back = transform.to_hf(mcore, cfg, hf_shapes)
    except (RuntimeError, ValueError, IndexError, MappingError) as exc:
        raise MappingError(f"{where}: transform {transform.name!r} fails on shapes {list(hf_shapes)}: {exc}") from None
    if tuple(mcore.shape) != tuple(expected_shape):
        raise MappingError(f"{where}: transform {transform.name!r} declares shape {expected_shape}, produces {tuple(mcore.shape)}")
    if len(back) != len(hf) or not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(hf, back)):
        raise MappingError(f"{where}: transform {transform.name!r} is not invertible (HF -> MCore -> HF changes the tensors)")
    y = randn(expected_shape, generator=gen)
    if not torch.equal(transform.to_mcore(transform.to_hf(y, cfg, hf_shapes), cfg), y):
        raise MappingError(f"{where}: transform {transform.name!r} is not invertible (MCore -> HF -> MCore changes the tensor)")


def check_expert_stack(pipeline: Pipeline, hf_shape: Shape, experts: int, cfg: Mapping[str, Any], where: str) -> Shape:
    """Prove a ``take_expert`` pipeline invertible over all experts: the steps after ``take_expert``
    round-trip on one slot, and the leading axis has one slot per expert. Returns the MCore shape."""
    if not hf_shape or hf_shape[0] != experts:
        raise MappingError(f"{where}: a take_expert layout has one slot per expert on its first axis "
                           f"({experts}), its shape is {list(hf_shape)}")
    rest = Pipeline(pipeline.steps[1:]) if len(pipeline.steps) > 1 else Pipeline([TRANSFORMS["identity"]])
    check_round_trip(rest, [tuple(hf_shape[1:])], cfg, where)
    return tuple(rest.mcore_shape([tuple(hf_shape[1:])], cfg))
