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

This module is the pipeline: the registry of step names, parsing a rule's ``transform`` into steps,
running them both ways and the load-time proofs. The steps are in :mod:`ckptbridge.transform_layout`
and :mod:`ckptbridge.transform_values`, their protocol in :mod:`ckptbridge.transform_op`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import MappingError
from .transform_layout import (Concat, Deinterleave, Identity, Interleave, QKVInterleave, Reshape, Split, TakeExpert,
                               Transpose)
from .transform_op import Op, Shape, Transform, _one
from .transform_values import Offset, Scale


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
