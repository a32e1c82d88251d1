"""Writing Megatron-Core's ``torch_dist`` format: data files item by item, then the index.

The plan (`dist_plan`: every tensor's chunks and the data file of the rank megatron-core would
save each from, cut into parts when several workers share the writing) is computed from shapes alone,
so several workers can each write whole data files (`write_dist_data` with a share) whose bytes equal
those one process writes for the same plan, and one of them writes the index (`finish_torch_dist`),
checking that every rank put each item where the plan says. Every item's place is in the plan: the
``torch.save`` framing of a shape and dtype is computed once (`_framing`, data skipped) and does not
depend on where in the file the item sits, so items are laid end to end. No more than one canonical
tensor is in memory: the writer puts each item's framing and then its tensor bytes at the planned
offsets.
"""

from __future__ import annotations

import io
import json
import math
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
from ..write_plan import Region, Step, WriteJob, WritePlan, file_plan
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
from .torch_dist import METADATA_JSON, lead_index, part_keys, storage_key


@dataclass(frozen=True)
class _Framing:
    """The bytes torch.save writes around one tensor's data (a zip record of pickle + data): they depend
    on the tensor's shape and dtype only, not on where in the data file the item sits."""

    head: bytes  # up to the tensor's first byte
    tail: bytes  # after its last

    @property
    def size(self) -> int:
        """Its bytes (the item's, less its tensor's)."""
        return len(self.head) + len(self.tail)


def _framing(shape: tuple[int, ...], dtype: torch.dtype) -> _Framing:
    """``torch.save`` of an empty tensor of ``shape`` (data skipped, no CRC, as megatron-core's items are
    read without one), cut around its data region: what torch writes is kept, the data it skips (a seek
    over it) never takes memory, however large the tensor."""
    out = _Recorder()
    with _no_crc(), torch.serialization.skip_data():
        torch.save(torch.empty(shape, dtype=dtype), out)  # never touched: only the framing is written
    nbytes = math.prod(shape) * dtype.itemsize
    if out.skipped != ([nbytes] if nbytes else []):
        raise PlanError(f"torch.save of a {list(shape)} {dtype} tensor skipped {out.skipped} bytes, not its {nbytes}")
    return _Framing(bytes(out.parts[0]), bytes(out.parts[1]) if len(out.parts) > 1 else b"")


class _Recorder(io.RawIOBase):
    """A write-only stream that keeps what is written before and after the one region skipped by a seek."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[bytearray] = [bytearray()]
        self.skipped: list[int] = []
        self.pos = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.parts[-1] += view
        self.pos += len(view)
        return len(view)

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        target = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos}[whence] + pos
        if target != self.pos:  # torch skipping a tensor's data
            if target < self.pos:
                raise PlanError("torch.save went back in the stream while laying out an item")
            self.skipped.append(target - self.pos)
            self.parts.append(bytearray())
            self.pos = target
        return self.pos

    def tell(self) -> int:
        return self.pos


@dataclass(frozen=True, slots=True)  # slots: a 671B model at TP 8 plans ~370k items
class _Item:
    """One chunk of a planned tensor as megatron-core saves it: its data file and place there, its place
    in the global tensor, and the rows/columns (``start``, ``length`` along the shard axis; None: all) it
    holds."""

    file: str
    index: tuple[int, ...]  # lead + offsets
    shape: tuple[int, ...]  # item shape (leading 1s on the lead axes)
    region: tuple[int, int] | None
    key: str  # the torch_dist key it belongs to (one of a ``dist_parts`` tensor's, else the tensor's)
    global_shape: tuple[int, ...]  # that key's global shape
    offset: int  # where the item starts in its data file: framing.head, its tensor bytes, framing.tail
    nbytes: int
    framing: _Framing

    @property
    def length(self) -> int:
        return self.framing.size + self.nbytes

    @property
    def data(self) -> int:
        """Where its tensor bytes start in the data file."""
        return self.offset + len(self.framing.head)


def data_file_name(rank: int, part: int = 0) -> str:
    """``__{rank}_{part}.distcp``: part ``part`` of the data of the rank that would own an item in
    megatron-core (torch DCP's own naming: a saving rank writes ``__{rank}_{k}`` with ``thread_count``
    writers; readers follow the ``.metadata`` index, which names each item's file)."""
    return f"__{rank}_{part}.distcp"


def dist_plan(spec: ModelSpec, planned: Sequence[PlannedTensor], layout: ParallelLayout, margs: dict[str, Any],
              dtype: torch.dtype, layer_spec: str, iteration: int | None = None, workers: int = 1) -> WritePlan:
    """Per planned tensor (in writing order): its storage key and chunks, each in the data of the rank
    megatron-core would use (stage x TP rank); the step's ``where`` is (key, chunks). Shapes only.

    No more workers than ranks (one writer included): one file per rank, ``__R_0.distcp``, as
    megatron-core writes. More workers than ranks: each rank's items are cut, in order, into parts of
    about ``total / workers`` bytes (`_parts`), each its own ``__R_K.distcp``, so that every worker has
    whole files to write (the files then depend on the number of workers; the tensors do not).

    Items follow each other in their file in plan order, each torch.save's framing (`_framing`, one per
    shape and dtype) around its tensor bytes, so every item's offset and its data region (the step's
    ``at``) are known here; the ``_extra_state`` items (``detail``: key, file, offset, bytes) close
    their rank's first part."""
    stage_of = {layer: c.pp_rank for c in layout.chunks(spec.num_layers) for layer in c.layers}
    stacked = spec.stacked  # derived from the rules each time it is asked
    cut = _Cut(planned, margs, dtype, workers if workers > layout.pp * layout.tp else 1)
    steps = []
    frames: dict[tuple[tuple[int, ...], torch.dtype], _Framing] = {}
    end: dict[str, int] = {}  # data file -> bytes planned so far
    for pt in planned:
        stored_shape = tuple(pt.stored_shape(margs))
        itemsize = pt.dtype(dtype).itemsize
        stage = stage_of[pt.layer] if pt.layer is not None else (0 if pt.rule.place == "first" else layout.pp - 1)
        kind = pt.rule.shard_kind(layer_spec)  # chunked as that spec's model saves it
        lead = lead_index(pt, stacked)
        keys = part_keys(pt, margs, stacked)  # several for megatron's per-part keys, each from its first row
        items, sizes, at = [], [], []
        dt = pt.dtype(dtype)
        for rank, regions in enumerate(kind.regions(stored_shape, layout.tp_for(pt.rule.parallel), pt.mcore_name)):
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
                item_shape = tuple([1] * len(lead) + shape)
                framing = frames.get((item_shape, dt))
                if framing is None:
                    framing = frames[(item_shape, dt)] = _framing(item_shape, dt)
                begin = end.get(name, 0)
                end[name] = begin + framing.size + nbytes
                data = begin + len(framing.head)
                items.append(_Item(name, tuple(lead + offsets), item_shape, None if whole else (start, length),
                                   key, tuple(key_shape), begin, nbytes, framing))
                sizes.append((name, nbytes))
                at.append(Region(name, data, nbytes))
        steps.append(Step(pt, (storage_key(pt, stacked), items), tuple(sizes), tuple(at)))
    extras = []
    for key, name in _extra_items(spec, layout):
        extras.append((key, name, end.get(name, 0), len(EMPTY_EXTRA_STATE)))
        end[name] = extras[-1][2] + extras[-1][3]
    return WritePlan("torch_dist", spec, dtype, tuple(steps), file_plan(steps, [e[1] for e in extras]),
                     layout, margs, layer_spec, iteration, detail=tuple(extras))


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

    def put(f: CheckedFile, item: _Item, fill: Callable[[int, int], int]) -> None:
        """Write ``item`` where the plan put it (the end of ``f`` so far): torch.save's framing around its
        tensor bytes, filled by ``fill(fd, offset)`` (-> bytes written). The bytes equal a plain torch.save's."""
        if f.tell() != item.offset:
            raise PlanError(f"{f.path}: an item of {item.index} would start at byte {f.tell()}, the plan has {item.offset}")
        f.write(item.framing.head)
        if fill(f.fd, item.data) != item.nbytes:
            raise PlanError(f"{f.path}: the item at {item.index} got other than its planned {item.nbytes} bytes")
        f.seek(item.data + item.nbytes)
        f.write(item.framing.tail)

    try:
        for step in plan.mine(job.share):
            pt, (key, chunks) = step.pt, step.where
            items = [item for item in chunks if mine(item.file)]
            spans = job.fast(pt)
            canonical = None if spans is not None else pt.to_stored(job.read(pt), margs)
            stored_shape = tuple(spans.shape) if spans is not None else tuple(canonical.shape)
            out_dtype = spans.dtype if spans is not None else canonical.dtype
            if stored_shape != tuple(pt.stored_shape(margs)) or out_dtype != pt.dtype(plan.dtype):
                raise PlanError(f"{pt.mcore_name}: {list(stored_shape)} {out_dtype} reached the writer, the plan has "
                                f"{list(pt.stored_shape(margs))} {pt.dtype(plan.dtype)}")
            kind = pt.rule.shard_kind(plan.layer_spec)
            written = 0
            for item in items:
                f = data_file(item.file)
                if spans is not None:
                    # a row range, or (row-parallel) a column block: one short run a row, gathered by write_spans
                    part = spans if item.region is None else spans.regions(kind.axis, [item.region])
                    fill = (lambda fd, at, part=part, f=f: write_spans(part, fd, at, f.path, job.kernel_copy))
                else:
                    piece = canonical if item.region is None else canonical.narrow(kind.axis, *item.region)
                    data = memoryview(piece.contiguous().view(torch.uint8).numpy()).cast("B") if piece.numel() else b""
                    fill = (lambda fd, at, data=data, f=f: pwrite_all(fd, data, at, f.path))
                put(f, item, fill)
                storage[MetadataIndex(item.key, torch.Size(item.index))] = StorageInfo(f.path.name, item.offset, f.tell() - item.offset)
                written += math.prod(item.shape) * out_dtype.itemsize
            job.progress(written)
        for key, name, offset, length in plan.detail:
            if mine(name):
                f = data_file(name)
                if f.tell() != offset:
                    raise PlanError(f"{f.path}: {key!r} would start at byte {f.tell()}, the plan has {offset}")
                f.write(EMPTY_EXTRA_STATE)
                storage[MetadataIndex(key)] = StorageInfo(f.path.name, offset, length)
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
    for key, *_ in plan.detail:
        state[key] = BytesStorageMetadata()
    planned = planned_storage(plan)
    odd = sorted({i.fqn for i in set(planned).symmetric_difference(storage)})
    if odd:  # a worker's files missing (or an item twice): never index a checkpoint that lacks bytes
        raise PlanError(f"{iter_dir}: item {odd[0]!r} was not written, or written but not planned ({len(odd)} in all)")
    moved = sorted(i.fqn for i, info in storage.items() if info != planned[i])
    if moved:
        raise PlanError(f"{iter_dir}: item {moved[0]!r} was written elsewhere than its plan says ({len(moved)} in all)")
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


def planned_storage(plan: WritePlan) -> dict[MetadataIndex, StorageInfo]:
    """Where every item of a torch_dist plan goes (the index's storage part), from the plan alone."""
    out = {MetadataIndex(item.key, torch.Size(item.index)): StorageInfo(item.file, item.offset, item.length)
           for step in plan.steps for _, items in [step.where] for item in items}
    out.update({MetadataIndex(key): StorageInfo(name, offset, length) for key, name, offset, length in plan.detail})
    return out


def _check_items(iter_dir: Path, storage: dict[MetadataIndex, StorageInfo]) -> None:
    """Each data file holds exactly its items, back to back, as the index will say."""
    sizes: dict[str, int] = {}
    for info in storage.values():
        sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sizes.items():
        check_size(iter_dir / name, size)


def _saved(obj: Any, megatron_names: bool = False) -> bytes:
    """``torch.save`` bytes, as megatron-core stores a ShardedObject; ``megatron_names``: enum stand-ins
    pickled as megatron's enums (``args``)."""
    buf = io.BytesIO()
    (save_with_megatron_names if megatron_names else torch.save)(obj, buf)
    return buf.getvalue()


EMPTY_EXTRA_STATE = _saved([None])  # what megatron-core stores for an empty extra state


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
