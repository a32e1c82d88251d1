"""Writing Megatron-Core's ``torch_dist`` format: data files item by item, then the index.

The plan (`planned_items`: every tensor's chunks and the data file of the rank megatron-core would
save each from) is computed from shapes alone, so several workers can each write whole data files
(`write_dist_data` with ``files``) whose bytes equal those one process writes, and one of them writes
the index from everyone's item offsets (`finish_torch_dist`). No more than one canonical tensor is in
memory: each is laid out with ``torch.serialization.skip_data`` and its bytes written at the offset
torch reports.
"""

from __future__ import annotations

import io
import json
import math
import os
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.serialization import config as serialization_config

from ..errors import PlanError
from ..fastcopy import Spans, write_spans
from ..fileio import CheckedFile, check_size, pwrite_all, write_bytes, write_text
from ..layout import ParallelLayout
from ..mapping.schema import layer_key
from ..spec import ModelSpec, PlannedTensor
from ..workshare import FilePlan
from . import dcp_metadata
from .bridge_config import RUN_CONFIG, run_config_text
from .dcp_metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageInfo,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from .mcore_common import CHECKPOINT_VERSION, args_namespace, bridge_record
from .safe_globals import save_with_megatron_names
from .torch_dist import METADATA_JSON, Window, lead_index, part_keys, storage_key


@dataclass(frozen=True)
class _Item:
    """One chunk of a planned tensor as megatron-core saves it: its data file, its place in the global
    tensor, and the rows/columns (``start``, ``length`` along the shard axis; None: all) it holds."""

    file: str
    index: tuple[int, ...]  # lead + offsets
    shape: tuple[int, ...]  # item shape (leading 1s on the lead axes)
    region: tuple[int, int] | None
    key: str  # the torch_dist key it belongs to (one of a ``dist_parts`` tensor's, else the tensor's)
    global_shape: tuple[int, ...]  # that key's global shape


def data_file_name(rank: int) -> str:
    """The ``__{rank}_0.distcp`` file of the rank that would own an item in megatron-core."""
    return f"__{rank}_0.distcp"


def planned_items(spec: ModelSpec, layout: ParallelLayout, margs: dict[str, Any], spec_name: str
                  ) -> list[tuple[PlannedTensor, str, list[_Item]]]:
    """Per planned tensor (in writing order): its storage key and chunks, each in the data file of the rank
    megatron-core would use (stage x TP rank). Shapes only: the plan a writer follows and workers split."""
    stage_of = {layer: c.pp_rank for c in layout.chunks(spec.num_layers) for layer in c.layers}
    stacked = spec.stacked  # derived from the rules each time it is asked
    out = []
    for pt in spec.planned():
        stored_shape = tuple(pt.stored_shape(margs))
        stage = stage_of[pt.layer] if pt.layer is not None else (0 if pt.rule.place == "first" else layout.pp - 1)
        kind = pt.rule.shard_kind(spec_name)  # chunked as that spec's model saves it
        lead = lead_index(pt, stacked)
        keys = part_keys(pt, margs, stacked)  # several for megatron's per-part keys, each from its first row
        items = []
        for rank, regions in enumerate(kind.regions(stored_shape, layout.tp_for(pt.rule.parallel), pt.mcore)):
            if kind.axis is None and rank:
                break  # replicated: stored once
            for start, length in regions:
                key, first, key_shape = next(k for k in reversed(keys) if k[1] <= start)
                offsets, shape = [0] * len(stored_shape), list(stored_shape)
                if kind.axis is not None:
                    offsets[kind.axis], shape[kind.axis] = start - first, length
                whole = kind.axis is None or length == stored_shape[kind.axis]
                items.append(_Item(data_file_name(stage * layout.tp + rank), tuple(lead + offsets),
                                   tuple([1] * len(lead) + shape), None if whole else (start, length), key,
                                   tuple(key_shape)))
        out.append((pt, storage_key(pt, stacked), items))
    return out


def _extra_items(spec: ModelSpec, layout: ParallelLayout) -> list[tuple[str, str]]:
    """(storage key, data file) of every ``_extra_state`` entry megatron-core saves (an empty one each)."""
    stage_of = {layer: c.pp_rank for c in layout.chunks(spec.num_layers) for layer in c.layers}
    stacked, experts, out = spec.stacked, int(spec.args.get("num_moe_experts") or 0), []
    for extra, layer, expert, mtp in spec.extra_states():
        if extra.legacy_only or (layer is None and mtp is None):
            continue
        template = extra.dist or extra.module
        base = layer_key(template, layer, stacked) if mtp is None else template.replace("{M}", str(mtp))
        if stacked and mtp is None:
            shard = f"{layer}_{spec.num_layers}" if expert is None else f"{layer}.{expert}_{spec.num_layers}.{experts}"
        else:  # per-layer keys (non-homogeneous layers, MTP blocks): no layer axis
            shard = "0_1" if expert is None else f"{expert}_{experts}"
        stage = stage_of[layer] if mtp is None else layout.pp - 1
        out.append((f"{base}._extra_state/shard_{shard}", data_file_name(stage * layout.tp)))
    return out


def dist_file_plan(spec: ModelSpec, layout: ParallelLayout, margs: dict[str, Any], dtype: torch.dtype,
                   spec_name: str) -> FilePlan:
    """The data files a torch_dist output of ``layout`` has, their tensor bytes, and which hold each tensor."""
    sizes: dict[str, int] = {name: 0 for _, name in _extra_items(spec, layout)}
    files_of = {}
    for pt, _, items in planned_items(spec, layout, margs, spec_name):
        for item in items:
            sizes[item.file] = sizes.get(item.file, 0) + math.prod(item.shape) * pt.dtype(dtype).itemsize
        files_of[pt.mcore] = frozenset(item.file for item in items)
    return FilePlan(sizes, files_of)


def write_torch_dist(
    spec: ModelSpec,
    read: Callable[[PlannedTensor], torch.Tensor],
    iter_dir: Path,
    layout: ParallelLayout,
    margs: dict[str, Any],
    dtype: torch.dtype,
    spec_name: str,
    progress: Callable[[int], None],
    iteration: int = 0,
    fast: Callable[[PlannedTensor], Spans | None] | None = None,
    kernel_copy: bool = True,
) -> None:
    """Write the data files, common.pt and .metadata; ``fast(pt)`` gives a tensor's stored bytes as source runs
    (copied inside the kernel when ``kernel_copy``) or None (then ``read(pt)`` gives the tensor)."""
    storage = write_dist_data(spec, read, iter_dir, layout, margs, dtype, spec_name, progress, fast, kernel_copy)
    finish_torch_dist(spec, iter_dir, layout, margs, dtype, spec_name, storage, iteration)


def write_dist_data(
    spec: ModelSpec,
    read: Callable[[PlannedTensor], torch.Tensor],
    iter_dir: Path,
    layout: ParallelLayout,
    margs: dict[str, Any],
    dtype: torch.dtype,
    spec_name: str,
    progress: Callable[[int], None],
    fast: Callable[[PlannedTensor], Spans | None] | None = None,
    kernel_copy: bool = True,
    files: Collection[str] | None = None,
) -> dict[MetadataIndex, StorageInfo]:
    """Write the data files named in ``files`` (None: all), item by item in plan order, so each file's bytes
    are the same whichever worker writes it; returns where each item went (what the index needs)."""
    iter_dir.mkdir(parents=True, exist_ok=True)
    storage: dict[MetadataIndex, StorageInfo] = {}
    opened: dict[str, CheckedFile] = {}
    mine = (lambda name: True) if files is None else (lambda name: name in files)

    def data_file(name: str) -> CheckedFile:
        if name not in opened:
            opened[name] = CheckedFile(iter_dir / name)
        return opened[name]

    data_at: dict[tuple[tuple[int, ...], torch.dtype], int] = {}  # item framing -> where its tensor bytes start

    def put(f: CheckedFile, shape: tuple[int, ...], dt: torch.dtype, fill: Callable[[int, int], None]) -> int:
        """Lay out one item (torch.save framing, data skipped) at the end of ``f``, fill its tensor bytes
        with ``fill(fd, offset)``; returns the item's start. The bytes equal a plain torch.save's."""
        begin = f.tell()
        with _no_crc(), torch.serialization.skip_data():
            f.saving(torch.empty(shape, dtype=dt))  # never touched: only the framing is written
        end = f.tell()
        if (shape, dt) not in data_at:
            data_at[(shape, dt)] = _data_offset(f.path, begin, end - begin)
        fill(f.fd, begin + data_at[(shape, dt)])
        return begin

    try:
        for pt, _, items in planned_items(spec, layout, margs, spec_name):
            items = [item for item in items if mine(item.file)]
            if not items:
                continue
            spans = fast(pt) if fast is not None else None
            canonical = None if spans is not None else pt.to_stored(read(pt), margs)
            stored_shape = tuple(spans.shape) if spans is not None else tuple(canonical.shape)
            out_dtype = spans.dtype if spans is not None else canonical.dtype
            if stored_shape != tuple(pt.stored_shape(margs)) or out_dtype != pt.dtype(dtype):
                raise PlanError(f"{pt.mcore}: {list(stored_shape)} {out_dtype} reached the writer, the plan has "
                                f"{list(pt.stored_shape(margs))} {pt.dtype(dtype)}")
            kind = pt.rule.shard_kind(spec_name)
            written = 0
            for item in items:
                f = data_file(item.file)
                if spans is not None:
                    part = spans if item.region is None else spans.rows(*item.region)  # only dim-0 splits reach here
                    fill = (lambda fd, at, part=part, f=f: write_spans(part, fd, at, f.path, kernel_copy))
                else:
                    piece = canonical if item.region is None else canonical.narrow(kind.axis, *item.region)
                    data = memoryview(piece.contiguous().view(torch.uint8).numpy()).cast("B") if piece.numel() else b""
                    fill = (lambda fd, at, data=data, f=f: pwrite_all(fd, data, at, f.path))
                begin = put(f, item.shape, out_dtype, fill)
                storage[MetadataIndex(item.key, torch.Size(item.index))] = StorageInfo(f.path.name, begin, f.tell() - begin)
                written += math.prod(item.shape) * out_dtype.itemsize
            progress(written)
        none_bytes = _saved([None])  # what megatron-core stores for an empty extra state
        for key, name in _extra_items(spec, layout):
            if mine(name):
                f = data_file(name)
                begin = f.tell()
                f.write(none_bytes)
                storage[MetadataIndex(key)] = StorageInfo(f.path.name, begin, len(none_bytes))
    finally:
        for f in opened.values():
            f.close()
    return storage


def finish_torch_dist(spec: ModelSpec, iter_dir: Path, layout: ParallelLayout, margs: dict[str, Any],
                      dtype: torch.dtype, spec_name: str, storage: dict[MetadataIndex, StorageInfo],
                      iteration: int = 0) -> None:
    """Once every data file is written (``storage``: where every item went): common.pt, run_config.yaml,
    metadata.json and, last, the .metadata index."""
    state: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    for pt, _, items in planned_items(spec, layout, margs, spec_name):
        for item in items:
            meta = state.setdefault(item.key, TensorStorageMetadata(
                TensorProperties(dtype=pt.dtype(dtype)), torch.Size(item.global_shape), []))
            meta.chunks.append(ChunkStorageMetadata(torch.Size(item.index), torch.Size(item.shape)))
    for key, _ in _extra_items(spec, layout):
        state[key] = BytesStorageMetadata()
    planned = {MetadataIndex(k, c.offsets) for k, m in state.items() if isinstance(m, TensorStorageMetadata) for c in m.chunks}
    planned |= {MetadataIndex(k) for k, m in state.items() if isinstance(m, BytesStorageMetadata)}
    odd = sorted({i.fqn for i in planned.symmetric_difference(storage)})
    if odd:  # a worker's files missing (or an item twice): never index a checkpoint that lacks bytes
        raise PlanError(f"{iter_dir}: item {odd[0]!r} was not written, or written but not planned ({len(odd)} in all)")
    _check_items(iter_dir, storage)
    metadata = Metadata(
        state_dict_metadata=dict(state),
        planner_data={k: (k,) for k in state},
        storage_data=dict(storage),
        storage_meta=StorageMeta(checkpoint_id=None, save_id=uuid.uuid4().hex, load_id=None),
    )
    # .metadata last: without it the folder is not a torch_dist checkpoint (for megatron-core either)
    write_bytes(iter_dir / "common.pt", _saved(
        {"args": args_namespace(margs, iteration), "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
         "ckptbridge": bridge_record(spec)}, megatron_names=True))
    write_text(iter_dir / RUN_CONFIG, run_config_text(margs))  # what Megatron-Bridge's export_ckpt builds the model from
    write_text(iter_dir / "metadata.json", json.dumps(METADATA_JSON))
    write_bytes(iter_dir / ".metadata", dcp_metadata.dumps(metadata))


def _check_items(iter_dir: Path, storage: dict[MetadataIndex, StorageInfo]) -> None:
    """Each data file holds exactly its items, back to back, as the index will say."""
    sizes: dict[str, int] = {}
    for info in storage.values():
        sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sizes.items():
        check_size(iter_dir / name, size)


def _data_offset(path: Path, begin: int, length: int) -> int:
    """Where, in the item of ``length`` bytes at ``begin`` of ``path`` (laid out, data skipped), the tensor's
    bytes start (relative to ``begin``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        meta = torch.load(io.BufferedReader(Window(fd, begin, length)), weights_only=True, map_location="meta")
    finally:
        os.close(fd)
    return meta.untyped_storage()._checkpoint_offset


def _saved(obj: Any, megatron_names: bool = False) -> bytes:
    """``torch.save`` bytes, as megatron-core stores a ShardedObject; ``megatron_names``: enum stand-ins
    pickled as megatron's enums (``args``)."""
    buf = io.BytesIO()
    (save_with_megatron_names if megatron_names else torch.save)(obj, buf)
    return buf.getvalue()


@contextmanager
def _no_crc() -> Iterator[None]:
    """Skip the zip CRC32 of each chunk (torch.load never checks it; it halves save time)."""
    cfg = serialization_config.save
    old = cfg.compute_crc32
    cfg.compute_crc32 = False
    try:
        yield
    finally:
        cfg.compute_crc32 = old
