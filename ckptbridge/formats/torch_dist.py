"""Reading Megatron-Core's ``torch_dist`` format (``torch.distributed.checkpoint`` underneath); writing
is `torch_dist_writer`.

Global tensors are layout-independent: homogeneous layers are stacked on a
leading layer axis and stored as chunks (one per layer and TP region, as
megatron-core itself writes them). We write the ``.distcp`` data files item by
item in layer order and the ``.metadata`` index at the end, so no more than
one canonical tensor is in memory; reading assembles any requested layer from
whatever chunks cover it.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import FormatError, PlanError
from ..fastcopy import Columns, Run, Spans
from ..layout import ParallelLayout
from ..config_source import ConfigOptions
from ..spec import ModelSpec, PlannedTensor
from ..layer_spec_names import LOCAL_TO_TE_LAYER_KEYS
from . import dcp_metadata
from .dcp_metadata import BytesStorageMetadata, Metadata, MetadataIndex, TensorStorageMetadata
from .held_file import HeldFile
from .carried import open_sidecar
from .mcore_common import (
    is_extra_state,
    is_training_state,
    read_storage_at,
    stored_run,
    CommonState,
    SkippedState,
)

METADATA_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch", "common_backend_version": 1}


def storage_key(pt: PlannedTensor, stacked: bool) -> str:
    return pt.rule.dist_key(pt.layer, stacked, pt.mtp)


def key_names(pt: PlannedTensor, stacked: bool) -> list[str]:
    """The torch_dist key(s) of ``pt``: its storage key, or one per ``dist_parts`` name."""
    key = storage_key(pt, stacked)
    return [f"{key}.{name}" for name in pt.rule.dist_parts] or [key]


def part_keys(pt: PlannedTensor, margs: dict[str, Any], stacked: bool) -> list[tuple[str, int, tuple[int, ...]]]:
    """(key, first row in the canonical tensor, global shape) of each tensor torch_dist stores for ``pt``: one,
    or one per part of a rule with ``dist_parts`` (megatron's GatedDeltaNet saves ``in_proj.weight.query`` ...)."""
    shape, keys = global_shape(pt, margs, stacked), key_names(pt, stacked)
    if not pt.rule.dist_parts:
        return [(keys[0], 0, shape)]
    lead, sizes = len(shape) - len(pt.shape), pt.rule.shard.sizes or ()
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(key, start, (*shape[:lead], size, *shape[lead + 1:])) for key, start, size in zip(keys, starts, sizes)]


def lead_index(pt: PlannedTensor, stacked: bool) -> list[int]:
    """Position of one canonical tensor on the leading axes: [layer] when stacked, then [expert]."""
    return [i for i in (pt.layer if stacked else None, pt.expert) if i is not None]


def global_shape(pt: PlannedTensor, margs: dict[str, Any], stacked: bool) -> tuple[int, ...]:
    lead = [int(margs["num_layers"])] if stacked and pt.layer is not None else []
    if pt.expert is not None:
        lead.append(int(margs["num_moe_experts"]))
    return (*lead, *pt.stored_shape(margs))


class Window(io.RawIOBase):
    """A read-only file object over ``length`` bytes at ``offset`` of an open file: one DCP item."""

    def __init__(self, fd: int, offset: int, length: int):
        self._fd, self._offset, self._length, self._pos = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buf) -> int:
        n = max(0, min(len(buf), self._length - self._pos))
        got = os.preadv(self._fd, [memoryview(buf)[:n]], self._offset + self._pos) if n else 0
        self._pos += got
        return got


def read_metadata(iter_dir: Path) -> Metadata:
    path = iter_dir / ".metadata"
    try:
        with open(path, "rb") as f:
            md = dcp_metadata.load(f)
    except FileNotFoundError:
        raise FormatError(f"{path}: missing; not a torch_dist checkpoint") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as exc:
        raise FormatError(f"{path}: corrupt or unsafe metadata ({exc})") from None
    if not isinstance(md, Metadata):
        raise FormatError(f"{path}: does not hold torch.distributed.checkpoint Metadata")
    return md


#: torch_dist keys the local spec saves under another name than the TE spec (megatron-core 0.16.1
#: gpt_layer_specs.py:417-420: the stock local MoE layer maps ``pre_mlp_layernorm.`` onto
#: ``mlp.linear_fc1.layer_norm_``, the TE MoE layer keeps it). Mapping files use the TE names.
LOCAL_DIST_NAMES = {"." + local + "weight": "." + LOCAL_TO_TE_LAYER_KEYS[local] + "weight"
                    for local in ("pre_mlp_layernorm.",)}  # TE suffix -> local suffix


def _with_layer_spec_names(md: Metadata, spec: ModelSpec, planned: Sequence[PlannedTensor]) -> Metadata:
    """``md`` with local-spec keys renamed to the TE names the mapping expects (the storage keys of
    ``planned``), where the TE name is expected, absent, and its local twin is not itself expected (in a
    dense layer it is the TE name)."""
    stacked = spec.stacked
    expected = {key for pt in planned for key in key_names(pt, stacked)}
    renames = {}
    for te in expected - set(md.state_dict_metadata):
        for te_suffix, local_suffix in LOCAL_DIST_NAMES.items():
            local = te.removesuffix(te_suffix) + local_suffix
            if te.endswith(te_suffix) and local in md.state_dict_metadata and local not in expected:
                renames[local] = te
    if not renames:
        return md
    md.state_dict_metadata = {renames.get(k, k): v for k, v in md.state_dict_metadata.items()}
    md.storage_data = {MetadataIndex(renames.get(i.fqn, i.fqn), i.offset, i.index) if i.fqn in renames else i: v
                       for i, v in md.storage_data.items()}
    return md


def _check_tiling(key: str, md: TensorStorageMetadata, where: Path) -> None:
    """Chunks inside the tensor and pairwise disjoint: with their sizes summing to the tensor's, they tile
    it exactly (a sum alone would pass two chunks over one half and none over the other)."""
    boxes = sorted((tuple(c.offsets), tuple(c.sizes)) for c in md.chunks)
    for offsets, sizes in boxes:
        if len(offsets) != len(md.size) or any(o < 0 or n < 0 or o + n > d for o, n, d in zip(offsets, sizes, md.size)):
            raise FormatError(f"{where}: a chunk of {key!r} at {list(offsets)} lies outside its shape {list(md.size)}")
    for i, (oa, sa) in enumerate(boxes):  # sorted by offset: a later box overlapping needs its first offset < a's end
        for ob, sb in boxes[i + 1:]:
            if ob[0] >= oa[0] + sa[0]:
                break
            if all(b < a + n and a < b + m for a, n, b, m in zip(oa, sa, ob, sb)):
                raise FormatError(f"{where}: chunks of {key!r} at {list(oa)} and {list(ob)} overlap")


@dataclass(frozen=True)
class _Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    info: StorageInfo


class TorchDistSource:
    """Canonical tensors read from a torch_dist checkpoint."""

    format = "torch_dist"
    _carried_file = None  # the held CARRIED_FILE, once opened

    def __init__(self, iter_dir: Path, options: ConfigOptions | None = None):
        self.iter_dir = Path(iter_dir)
        mjson = self.iter_dir / "metadata.json"
        try:
            backend = json.loads(mjson.read_text()).get("sharded_backend")
        except (FileNotFoundError, json.JSONDecodeError, AttributeError) as exc:
            raise FormatError(f"{mjson}: missing or corrupt ({exc})") from None
        if backend != "torch_dist":
            raise FormatError(f"{mjson}: sharded_backend is {backend!r}, only torch_dist is supported")
        self.common = CommonState.read(self.iter_dir / "common.pt", options)
        self.spec, self.margs = self.common.spec, self.common.margs
        self._stacked = self.spec.stacked  # derived from the rules each time it is asked: once per source
        # the conversion's planned tensors, computed once: verification, the write plan and `read` use them
        self.planned: tuple[PlannedTensor, ...] = tuple(self.spec.planned())
        self.layout = ParallelLayout.from_args(self.margs)
        self.layer_spec = "local" if self.margs.get("transformer_impl") == "local" else "te"
        self.metadata = _with_layer_spec_names(read_metadata(self.iter_dir), self.spec, self.planned)
        self.chunks: dict[str, list[_Chunk]] = {}
        for index, info in self.metadata.storage_data.items():
            self.chunks.setdefault(index.fqn, []).append(_Chunk(tuple(index.offset or ()), (), info))
        for key, md in self.metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                by_offset = {c.offsets: c for c in self.chunks.get(key, [])}
                self.chunks[key] = [
                    _Chunk(tuple(c.offsets), tuple(c.sizes), by_offset[tuple(c.offsets)].info)
                    for c in md.chunks if tuple(c.offsets) in by_offset
                ]
        dtypes = {md.properties.dtype for k, md in self.metadata.state_dict_metadata.items()
                  if isinstance(md, TensorStorageMetadata) and not is_training_state(k)}
        self.dtype = dtypes.pop() if len(dtypes) == 1 else self.margs.get("params_dtype", torch.float32)
        self._files: dict[str, HeldFile] = {}  # data files, held open from verify() to close()
        # tensors the mapping carries unchanged (a vision tower; see `carried`), None when the folder has none
        self.carried, self._carried_file = open_sidecar(self.iter_dir, self.spec.mapping.carry)

    def training_state(self) -> SkippedState:
        """The optimizer / RNG entries in the data files: never read, only counted."""
        keys = {k for k in self.metadata.state_dict_metadata if is_training_state(k)}
        size = sum(info.length for index, info in self.metadata.storage_data.items() if index.fqn in keys)
        kinds = tuple(sorted({"rng_state" if k.startswith("rng_state") else "optimizer state" for k in keys}))
        return SkippedState(len(keys), size, kinds)

    def verify(self) -> None:
        stacked = self._stacked
        expected = {key: shape for pt in self.planned for key, _, shape in part_keys(pt, self.margs, stacked)}
        where = self.iter_dir / ".metadata"
        for key, md in self.metadata.state_dict_metadata.items():
            if is_training_state(key) or is_extra_state(key):
                continue
            if key not in expected:
                raise PlanError(f"unmapped source tensor {key!r} in {where}")
            if isinstance(md, BytesStorageMetadata):
                raise PlanError(f"{key!r} in {where} is stored as bytes, expected a tensor")
            if tuple(md.size) != expected[key]:
                raise PlanError(f"tensor {key!r} in {where} has shape {list(md.size)}, the config implies {list(expected[key])}")
            covered = sum(math.prod(c.sizes) for c in md.chunks)
            if covered != math.prod(md.size) or len(self.chunks[key]) != len(md.chunks):
                raise FormatError(f"{where}: chunks of {key!r} do not cover the tensor (or lack storage entries)")
            _check_tiling(key, md, where)
        missing = sorted(set(expected) - set(self.metadata.state_dict_metadata))
        if missing:
            raise PlanError(f"missing tensor {missing[0]!r} in {where} ({len(missing)} missing in all)")
        ends: dict[str, int] = {}
        for key, cs in self.chunks.items():
            if is_training_state(key):
                continue
            for c in cs:
                ends[c.info.relative_path] = max(ends.get(c.info.relative_path, 0), c.info.offset + c.info.length)
        for name, end in sorted(ends.items()):
            if Path(name).name != name or name in ("", ".", ".."):
                raise FormatError(f"{where}: names data file {name!r}, which is not a file inside {self.iter_dir}")
            if name not in self._files:
                path = self.iter_dir / name
                if not path.exists():
                    raise FormatError(f"{path}: data file named by .metadata is missing")
                self._files[name] = HeldFile(path)
            if self._files[name].size < end:
                raise FormatError(f"{self._files[name].path}: truncated: .metadata needs {end} bytes, "
                                  f"file has {self._files[name].size}")

    def check_unchanged(self) -> None:
        for f in self._files.values():
            f.check_unchanged()
        if self._carried_file is not None:
            self._carried_file.check_unchanged()

    def _chunk_meta(self, chunk: _Chunk, key: str) -> tuple[int, torch.Tensor, str]:
        """The held descriptor of a chunk's data file, the chunk's tensor on the meta device (its bytes
        checked to lie inside the item) and how errors name it."""
        path = self.iter_dir / chunk.info.relative_path
        if chunk.info.relative_path not in self._files:  # read without verify(): open it now
            self._files[chunk.info.relative_path] = HeldFile(path)
        fd = self._files[chunk.info.relative_path].fd
        what = f"{path}: chunk {list(chunk.offsets)} of {key!r}"
        try:
            meta = torch.load(io.BufferedReader(Window(fd, chunk.info.offset, chunk.info.length)),
                              weights_only=True, map_location="meta")
        except Exception as exc:  # torch raises RuntimeError/UnpicklingError for a damaged zip record
            raise FormatError(f"{what}: cannot be read ({str(exc).splitlines()[0]})") from None
        if not isinstance(meta, torch.Tensor):
            raise FormatError(f"{what}: does not hold a tensor")
        storage = meta.untyped_storage()
        if storage._checkpoint_offset + storage.nbytes() > chunk.info.length:
            raise FormatError(f"{what}: tensor bytes run past the item's end")
        return fd, meta, what

    def _load_chunk(self, chunk: _Chunk, key: str) -> torch.Tensor:
        fd, meta, what = self._chunk_meta(chunk, key)
        return read_storage_at(fd, chunk.info.offset, meta, what)

    def spans(self, pt: PlannedTensor, dtype: torch.dtype) -> Spans | None:
        """The canonical tensor as runs of the held data files, when its chunks (already in ``dtype``) are
        row ranges (every chunk of the layer spans all but the first dimension: TP 1, column-parallel) or
        column blocks (each spans all rows and all but the second dimension: row-parallel; one
        `fastcopy.Columns`); None otherwise (a cast, strided storage, another split): then `read` assembles it."""
        if pt.rule.dist_parts:
            return None  # several keys: `read` joins them
        key = storage_key(pt, self._stacked)
        md = self.metadata.state_dict_metadata[key]
        lead = lead_index(pt, self._stacked)
        n, full = len(lead), tuple(md.size)[len(lead):]
        if md.properties.dtype != dtype or not full:
            return None
        mine = [c for c in self.chunks[key] if all(o <= i < o + s for i, o, s in zip(lead, c.offsets, c.sizes))]
        axis = _split_axis([(c.offsets[n:], c.sizes[n:]) for c in mine], full)
        if axis is None:
            return None
        parts, at = [], 0
        for c in sorted(mine, key=lambda c: c.offsets[n + axis]):
            if c.offsets[n + axis] != at:
                return None
            fd, meta, _ = self._chunk_meta(c, key)
            run = stored_run(fd, c.info.offset, meta)
            if run is None or meta.dtype != dtype or tuple(meta.shape) != c.sizes:
                return None
            local = 0  # the layer's (and expert's) place inside the chunk: lead axes are outermost, so one block
            for i, o, s in zip(lead, c.offsets, c.sizes):
                local = local * s + (i - o)
            block = math.prod(c.sizes[n:]) * dtype.itemsize
            parts.append(Run(fd, run.offset + local * block, block))
            at += c.sizes[n + axis]
        if at != full[axis]:
            return None
        spans = Spans(tuple(parts), dtype, full) if axis == 0 else Spans((Columns(tuple(parts), full[0]),), dtype, full)
        return spans.rows(0, pt.shape[0]) if pt.rule.shard.padded else spans

    def read(self, pt: PlannedTensor) -> torch.Tensor:
        if pt.rule.dist_parts:  # megatron's parts, each its own key: joined on the split axis
            keys = part_keys(pt, self.margs, self._stacked)
            return pt.from_stored(torch.cat([self._read_key(pt, key) for key, _, _ in keys]))
        return pt.from_stored(self._read_key(pt, storage_key(pt, self._stacked)))

    def _read_key(self, pt: PlannedTensor, key: str) -> torch.Tensor:
        """One stored key's tensor for ``pt``'s layer (and expert)."""
        stacked = self._stacked
        md = self.metadata.state_dict_metadata[key]
        lead = lead_index(pt, stacked)
        start = lead + [0] * (len(md.size) - len(lead))
        size = [1] * len(lead) + list(md.size)[len(lead):]
        out = torch.empty(size, dtype=md.properties.dtype)
        filled = 0
        for chunk in self.chunks[key]:
            lo = [max(a, b) for a, b in zip(start, chunk.offsets)]
            hi = [min(a + s, b + t) for a, s, b, t in zip(start, size, chunk.offsets, chunk.sizes)]
            if any(h <= l for l, h in zip(lo, hi)):
                continue
            data = self._load_chunk(chunk, key)
            src, dst = data, out
            for dim, (l, h) in enumerate(zip(lo, hi)):
                src = src.narrow(dim, l - chunk.offsets[dim], h - l)
                dst = dst.narrow(dim, l - start[dim], h - l)
            dst.copy_(src)
            filled += math.prod(tuple(h - l for l, h in zip(lo, hi)))
        if filled != out.numel():
            raise FormatError(f"{self.iter_dir}: chunks of {key!r} cover {filled} of {out.numel()} values of layer {pt.layer}")
        return out.reshape(size[len(lead):])

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        if self._carried_file is not None:
            self._carried_file.close()
        self._files.clear()


def _split_axis(chunks: Sequence[tuple[Sequence[int], Sequence[int]]], full: Sequence[int]) -> int | None:
    """How ``chunks`` (offsets, sizes past the lead axes) split a tensor of shape ``full``: 0 when each spans
    all but the first dimension, 1 when each spans all rows and all but the second, else None."""
    def spans_all_but(c: tuple[Sequence[int], Sequence[int]], axis: int) -> bool:
        return all(d == axis or (c[0][d] == 0 and c[1][d] == full[d]) for d in range(len(full)))

    for axis in (0, 1)[:len(full)]:
        if all(spans_all_but(c, axis) for c in chunks):
            return axis
    return None
