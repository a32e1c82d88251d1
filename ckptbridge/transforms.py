"""Invertible tensor transforms between HF tensors and one canonical MCore tensor.

Each transform turns the list of HF tensors a mapping rule names into the
single, *global* (unsharded, unpadded) MCore tensor, and declares its reverse.
The mapping loader probes every rule with random tensors and refuses a file
whose transform does not round-trip bit-exactly, so a mapping cannot silently
lose information in either direction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from .errors import MappingError

Shape = tuple[int, ...]


class Transform:
    """Base class: HF tensors (in rule order) <-> one MCore tensor."""

    name: ClassVar[str]
    #: number of HF tensors the transform consumes, or None for "one or more"
    arity: ClassVar[int | None] = None
    #: config fields (MCore argument names) the transform reads
    needs: ClassVar[tuple[str, ...]] = ()

    def to_mcore(self, hf: Sequence[torch.Tensor], cfg: Mapping[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, mcore: torch.Tensor, cfg: Mapping[str, Any], hf_shapes: Sequence[Shape]) -> list[torch.Tensor]:
        raise NotImplementedError

    def mcore_shape(self, hf_shapes: Sequence[Shape], cfg: Mapping[str, Any]) -> Shape:
        raise NotImplementedError


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


class Concat(Transform):
    """Concatenate on dim 0 (gate/up -> linear_fc1 = [gate; up])."""

    name = "concat"

    def to_mcore(self, hf, cfg):
        return torch.cat(list(hf), dim=0)

    def to_hf(self, mcore, cfg, hf_shapes):
        return [p.contiguous() for p in torch.split(mcore, [s[0] for s in hf_shapes], dim=0)]

    def mcore_shape(self, hf_shapes, cfg):
        return (sum(s[0] for s in hf_shapes), *hf_shapes[0][1:])


class QKVInterleave(Transform):
    """q, k, v -> per query group ``[q heads of g; k_g; v_g]`` (weights and biases).

    MCore fuses attention projections group by group so that a TP shard is a
    contiguous run of whole groups; ``kv_channels`` is the head dim, which is
    not ``hidden/heads`` for models with an explicit ``head_dim`` (Qwen3).
    """

    name = "qkv_interleave"
    arity = 3
    needs = ("num_attention_heads", "num_query_groups", "kv_channels")

    @staticmethod
    def _dims(cfg: Mapping[str, Any]) -> tuple[int, int, int]:
        heads, groups, d = int(cfg["num_attention_heads"]), int(cfg["num_query_groups"]), int(cfg["kv_channels"])
        if heads % groups:
            raise MappingError(f"num_attention_heads={heads} is not a multiple of num_query_groups={groups}")
        return groups, heads // groups, d

    def to_mcore(self, hf, cfg):
        groups, per_group, d = self._dims(cfg)
        q, k, v = hf
        rest = q.shape[1:]
        fused = torch.cat(
            [q.reshape(groups, per_group, d, *rest), k.reshape(groups, 1, d, *rest), v.reshape(groups, 1, d, *rest)],
            dim=1,
        )
        return fused.reshape(groups * (per_group + 2) * d, *rest)

    def to_hf(self, mcore, cfg, hf_shapes):
        groups, per_group, d = self._dims(cfg)
        rest = mcore.shape[1:]
        grouped = mcore.reshape(groups, per_group + 2, d, *rest)
        q, k, v = torch.split(grouped, [per_group, 1, 1], dim=1)
        return [t.reshape(-1, *rest).contiguous() for t in (q, k, v)]

    def mcore_shape(self, hf_shapes, cfg):
        return (sum(s[0] for s in hf_shapes), *hf_shapes[0][1:])


TRANSFORMS: dict[str, Transform] = {t.name: t for t in (Identity(), Concat(), QKVInterleave())}


def get_transform(name: str) -> Transform:
    try:
        return TRANSFORMS[name]
    except KeyError:
        raise MappingError(f"unknown transform {name!r}; known: {', '.join(sorted(TRANSFORMS))}") from None


def check_round_trip(transform: Transform, hf_shapes: Sequence[Shape], cfg: Mapping[str, Any], where: str) -> None:
    """Prove ``transform`` invertible on random tensors of the given shapes.

    Both directions are checked bit-exactly: HF -> MCore -> HF and
    MCore -> HF -> MCore. Random values (not zeros) make a dropped or swapped
    slice visible.
    """
    gen = torch.Generator().manual_seed(0)
    hf = [torch.randn(s, generator=gen) for s in hf_shapes]
    try:
        mcore = transform.to_mcore(hf, cfg)
        back = transform.to_hf(mcore, cfg, hf_shapes)
        expected_shape = transform.mcore_shape(hf_shapes, cfg)
    except (RuntimeError, ValueError, IndexError) as exc:
        raise MappingError(f"{where}: transform {transform.name!r} fails on shapes {list(hf_shapes)}: {exc}") from None
    if tuple(mcore.shape) != tuple(expected_shape):
        raise MappingError(f"{where}: transform {transform.name!r} declares shape {expected_shape}, produces {tuple(mcore.shape)}")
    if len(back) != len(hf) or not all(torch.equal(a, b) for a, b in zip(hf, back)):
        raise MappingError(f"{where}: transform {transform.name!r} is not invertible (HF -> MCore -> HF changes the tensors)")
    y = torch.randn(expected_shape, generator=gen)
    if not torch.equal(transform.to_mcore(transform.to_hf(y, cfg, hf_shapes), cfg), y):
        raise MappingError(f"{where}: transform {transform.name!r} is not invertible (MCore -> HF -> MCore changes the tensor)")
