"""Writing Megatron-Core's ``torch_dist`` format: data files item by item, then the index.

The plan (`dist_plan`: every tensor's chunks and the data file of the rank megatron-core would
save each from, cut into parts when several workers share the writing) is computed from shapes alone,
so several workers can each write whole data files (`write_dist_data` with a share) whose bytes equal
those one process writes for the same plan, and one of them writes the index from everyone's item
offsets (`finish_torch_dist`). No more than one canonical tensor is in
memory: each is laid out with ``torch.serialization.skip_data`` and its bytes written at the offset
torch reports.
"""

from __future__ import annotations

import io
import json
import math
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.serialization import config as serialization_config

from ..errors import PlanError
from ..fastcopy import write_spans
from ..fileio import CheckedFile, check_size, pwrite_all, write_bytes, write_text
from ..layout import ParallelLayout
from ..mapping.schema import layer_key
from ..spec import ModelSpec, PlannedTensor
from ..write_plan import Step, WriteJob, WritePlan, file_plan
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


def data_file_name(rank: int, part: int = 0) -> str:
    """``__{rank}_{part}.distcp``: part ``part`` of the data of the rank that would own an item in
    megatron-core (torch DCP's own naming: a saving rank writes ``__{rank}_{k}`` with ``thread_count``
    writers; readers follow the ``.metadata`` index, which names each item's file)."""
    return f"__{rank}_{part}.distcp"


def dist_plan(spec: ModelSpec, planned: Sequence[PlannedTensor], layout: ParallelLayout, margs: dict[str, Any],
              dtype: torch.dtype, spec_name: str, iteration: int | None = None, workers: int = 1) -> WritePlan:
    """Per planned tensor (in writing order): its storage key and chunks, each in the data of the rank
    megatron-core would use (stage x TP rank); the step's ``where`` is (key, chunks). Shapes only.

    No more workers than ranks (one writer included): one file per rank, ``__R_0.distcp``, as
    megatron-core writes. More workers than ranks: each rank's items are cut, in order, into parts of
    about ``total / workers`` bytes (`_parts`), each its own ``__R_K.distcp``, so that every worker has
    whole files to write (the files then depend on the number of workers; the tensors do not)."""
    stage_of = {layer: c.pp_rank for c in layout.chunks(spec.num_layers) for layer in c.layers}
    stacked = spec.stacked  # derived from the rules each time it is asked
    cut = _Cut(planned, margs, dtype, workers if workers > layout.pp * layout.tp else 1)
    steps = []
    for pt in planned:
        stored_shape = tuple(pt.stored_shape(margs))
        itemsize = pt.dtype(dtype).itemsize
        stage = stage_of[pt.layer] if pt.layer is not None else (0 if pt.rule.place == "first" else layout.pp - 1)
        kind = pt.rule.shard_kind(spec_name)  # chunked as that spec's model saves it
        lead = lead_index(pt, stacked)
        keys = part_keys(pt, margs, stacked)  # several for megatron's per-part keys, each from its first row
        items, sizes = [], []
        for rank, regions in enumerate(kind.regions(stored_shape, layout.tp_for(pt.rule.parallel), pt.mcore)):
            if kind.axis is None and rank:
                break  # replicated: stored once
            for start, length in regions:
                key, first, key_shape = next(k for k in reversed(keys) if k[1] <= start)
                offsets, shape = [0] * len(stored_shape), list(stored_shape)
                if kind.axis is not None:
                    offsets[kind.axis], shape[kind.axis] = start - first, length
                whole = kind.axis is None or length == stored_shape[kind.axis]
                nbytes = math.prod(shape) * itemsize
                name = data_file_name(stage * layout.tp + rank, cut.part(stage * layout.tp + rank, nbytes))
                items.append(_Item(name, tuple(lead + offsets), tuple([1] * len(lead) + shape),
                                   None if whole else (start, length), key, tuple(key_shape)))
                sizes.append((name, nbytes))
        steps.append(Step(pt, (storage_key(pt, stacked), items), tuple(sizes)))
    extras = _extra_items(spec, layout)
    return WritePlan("torch_dist", spec, dtype, tuple(steps), file_plan(steps, [name for _, name in extras]),
                     layout, margs, spec_name, iteration, detail=extras)


class _Cut:
    """Which part of its rank's data each item goes to, items taken in writing order: a rank's data is
    cut whenever a part would pass ``total / workers`` bytes (a part holds at least one item; one
    worker: never cut)."""

    def __init__(self, planned: Sequence[PlannedTensor], margs: dict[str, Any], dtype: torch.dtype, workers: int):
        total = sum(math.prod(pt.stored_shape(margs)) * pt.dtype(dtype).itemsize for pt in planned) if workers > 1 else 0
        self.target = -(-total // workers) if workers > 1 else None
        self.filled: dict[int, tuple[int, int]] = {}  # rank -> (current part, its bytes)

    def part(self, rank: int, nbytes: int) -> int:
        if self.target is None:
            return 0
        part, size = self.filled.get(rank, (0, 0))
        if size and size + nbytes > self.target:
            part, size = part + 1, 0
        self.filled[rank] = (part, size + nbytes)
        return part


def _extra_items(spec: ModelSpec, layout: ParallelLayout) -> list[tuple[str, str]]:
    """(storage key, data file) of every ``_extra_state`` entry megatron-core saves (an empty one each),
    in the rank's first part."""
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


def write_dist_data(plan: WritePlan, job: WriteJob) -> dict[MetadataIndex, StorageInfo]:
    """Write the data files of ``job.share``, item by item in plan order, so each file's bytes are the
    same whichever worker writes it; returns where each item went (what the index needs)."""
    margs = plan.margs
    assert margs is not None
    job.folder.mkdir(parents=True, exist_ok=True)
    storage: dict[MetadataIndex, StorageInfo] = {}
    opened: dict[str, CheckedFile] = {}
    mine = (lambda name: True) if job.share is None else (lambda name: name in job.share)

    def data_file(name: str) -> CheckedFile:
        if name not in opened:
            opened[name] = CheckedFile(job.folder / name)
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
        for step in plan.mine(job.share):
            pt, (key, chunks) = step.pt, step.where
            items = [item for item in chunks if mine(item.file)]
            spans = job.fast(pt)
            canonical = None if spans is not None else pt.to_stored(job.read(pt), margs)
            stored_shape = tuple(spans.shape) if spans is not None else tuple(canonical.shape)
            out_dtype = spans.dtype if spans is not None else canonical.dtype
            if stored_shape != tuple(pt.stored_shape(margs)) or out_dtype != pt.dtype(plan.dtype):
                raise PlanError(f"{pt.mcore}: {list(stored_shape)} {out_dtype} reached the writer, the plan has "
                                f"{list(pt.stored_shape(margs))} {pt.dtype(plan.dtype)}")
            kind = pt.rule.shard_kind(plan.spec_name)
            written = 0
            for item in items:
                f = data_file(item.file)
                if spans is not None:
                    part = spans if item.region is None else spans.rows(*item.region)  # only dim-0 splits reach here
                    fill = (lambda fd, at, part=part, f=f: write_spans(part, fd, at, f.path, job.kernel_copy))
                else:
                    piece = canonical if item.region is None else canonical.narrow(kind.axis, *item.region)
                    data = memoryview(piece.contiguous().view(torch.uint8).numpy()).cast("B") if piece.numel() else b""
                    fill = (lambda fd, at, data=data, f=f: pwrite_all(fd, data, at, f.path))
                begin = put(f, item.shape, out_dtype, fill)
                storage[MetadataIndex(item.key, torch.Size(item.index))] = StorageInfo(f.path.name, begin, f.tell() - begin)
                written += math.prod(item.shape) * out_dtype.itemsize
            job.progress(written)
        none_bytes = _saved([None])  # what megatron-core stores for an empty extra state
        for key, name in plan.detail:
            if mine(name):
                f = data_file(name)
                begin = f.tell()
                f.write(none_bytes)
                storage[MetadataIndex(key)] = StorageInfo(f.path.name, begin, len(none_bytes))
    finally:
        for f in opened.values():
            f.close()
    return storage


def finish_torch_dist(plan: WritePlan, iter_dir: Path, storage: dict[MetadataIndex, StorageInfo]) -> None:
    """Once every data file is written (``storage``: where every item went): common.pt, run_config.yaml,
    metadata.json and, last, the .metadata index."""
    spec, margs, iteration = plan.spec, plan.margs, plan.iteration or 0
    assert margs is not None
    state: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    for step in plan.steps:
        pt, (_, items) = step.pt, step.where
        for item in items:
            meta = state.setdefault(item.key, TensorStorageMetadata(
                TensorProperties(dtype=pt.dtype(plan.dtype)), torch.Size(item.global_shape), []))
            meta.chunks.append(ChunkStorageMetadata(torch.Size(item.index), torch.Size(item.shape)))
    for key, _ in plan.detail:
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
