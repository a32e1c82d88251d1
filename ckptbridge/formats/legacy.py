"""Megatron's legacy ``torch`` format: one ``model_optim_rng.pt`` per (TP, PP, EP) rank.

Layer numbers are local to each stage and virtual chunk, expert numbers local
to each expert-parallel rank; every EP rank holds a replica of the dense
weights. Writing streams: each
rank file is first laid out with ``torch.serialization.skip_data`` (shapes
only), then every tensor's bytes are written at the offset torch reports, one
canonical tensor at a time. Reading loads each file onto the ``meta`` device
(structure only) and reads bytes on demand, so neither direction holds a
stage in memory.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

import torch

from ..errors import FormatError, LayoutError, PlanError
from ..fileio import CheckedFile, check_size, pwrite_all
from ..layout import ParallelLayout, StageChunk
from ..fastcopy import Columns, Spans, write_spans
from ..sharding import ShardKind, merge, split
from ..config_source import ConfigOptions
from ..spec import ModelSpec, PlannedTensor
from ..write_plan import Step, WriteJob, WritePlan, file_plan
from .held_file import HeldFile
from .carried import open_sidecar
from .safe_globals import save_with_megatron_names
from .mcore_common import (
    CHECKPOINT_VERSION,
    args_namespace,
    bridge_record,
    is_extra_state,
    read_storage,
    stored_run,
    safe_load,
    CommonState,
    SkippedState,
)

RANK_DIR = re.compile(r"^mp_rank_\d{2}(?:_\d{3}){0,2}$")
FILE = "model_optim_rng.pt"
Rank = tuple[int, int, int]  # (tp, pp, ep)


def rank_dir_name(tp: int, pp: int, layout: ParallelLayout, ep: int = 0) -> str:
    """``mp_rank_TT``, then ``_PPP`` when PP > 1, then ``_EEE`` when EP > 1 (Megatron's naming)."""
    name = f"mp_rank_{tp:02d}"
    if layout.pp > 1:
        name += f"_{pp:03d}"
    if layout.ep > 1:
        name += f"_{ep:03d}"
    return name


def rank_file(tp: int, pp: int, layout: ParallelLayout, ep: int = 0) -> str:
    """A rank's file, relative to the iteration folder."""
    return f"{rank_dir_name(tp, pp, layout, ep)}/{FILE}"


def legacy_plan(spec: ModelSpec, planned: Sequence[PlannedTensor], layout: ParallelLayout, margs: dict[str, Any],
                dtype: torch.dtype, layer_spec: str, iteration: int | None = None) -> WritePlan:
    """The rank files a legacy output of ``layout`` has, and every tensor's slot (a step's ``where``) in
    writing order: stage by stage, as the writer fills a stage's files together (a tied embedding's
    replica on the last stage is a second step, read again there)."""
    if layout.expert_tp not in (1, layout.tp):
        raise LayoutError(f"the legacy format supports --etp 1 or --etp {layout.tp} (= --tp), not {layout.expert_tp}")
    placement = slots(spec, layout, layer_spec, bool(margs.get("moe_grouped_gemm")), planned)
    steps = []
    for pp in range(layout.pp):
        for entries in placement.values():
            for pt, slot in entries:
                if slot.pp != pp:
                    continue
                nbytes = math.prod(local_shape(pt, margs, layout, layer_spec)) * pt.dtype(dtype).itemsize
                steps.append(Step(pt, slot, tuple((rank_file(t, pp, layout, e), nbytes) for t, p, e in all_ranks(layout)
                                                  if p == pp and slot.ep in (None, e))))
    names = [rank_file(t, p, layout, e) for t, p, e in all_ranks(layout)]
    return WritePlan("torch", spec, dtype, tuple(steps), file_plan(steps, names), layout, margs, layer_spec, iteration)


def all_ranks(layout: ParallelLayout) -> list[Rank]:
    return [(t, p, e) for p in range(layout.pp) for e in range(layout.ep) for t in range(layout.tp)]


def shard_index(tp_rank: int, pt: PlannedTensor, layout: ParallelLayout) -> int:
    """Which of the rule's shards a TP rank holds (routed experts split by ETP, which is 1 or TP)."""
    return tp_rank if layout.tp_for(pt.rule.parallel) == layout.tp else 0


def model_key(chunk: StageChunk) -> str:
    return "model" if chunk.vchunk is None else f"model{chunk.vchunk}"


@dataclass(frozen=True)
class Slot:
    """Where one canonical tensor lives in a legacy checkpoint of a given layout."""

    pp: int
    ep: int | None  # None: replicated on every expert-parallel rank
    model_key: str
    key: str


def slots(spec: ModelSpec, layout: ParallelLayout, layer_spec: str, grouped: bool = False,
          planned: Sequence[PlannedTensor] | None = None) -> dict[str, list[tuple[PlannedTensor, Slot]]]:
    """Per canonical name, every (stage, chunk, key) it is written to (the tied output replica adds one);
    ``planned``: the spec's planned tensors, when the caller has them."""
    chunks = layout.chunks(spec.num_layers)
    first, last = chunks[0], chunks[-1]
    by_layer = {layer: c for c in chunks for layer in c.layers}
    local_experts = int(spec.args.get("num_moe_experts") or 1) // layout.ep
    out: dict[str, list[tuple[PlannedTensor, Slot]]] = {}
    for pt in spec.planned() if planned is None else planned:
        ep = expert = None
        if pt.expert is not None:
            ep, expert = divmod(pt.expert, local_experts)
        if pt.mtp is not None:  # MTP blocks live on the last stage (its last virtual chunk), numbered from 0
            chunk = last
            key = pt.rule.mcore_name(None, layer_spec, expert, grouped, mtp=pt.mtp)
        elif pt.layer is None:
            chunk = first if pt.rule.place == "first" else last
            key = pt.rule.mcore_name(None, layer_spec)
        else:
            chunk = by_layer[pt.layer]
            key = pt.rule.mcore_name(pt.layer - chunk.first_layer, layer_spec, expert, grouped)
        out[pt.mcore_name] = [(pt, Slot(chunk.pp_rank, ep, model_key(chunk), key))]
        embedding = pt.rule.place == "first" and pt.rule.shard.padded
        if embedding and layout.pp > 1:
            # MCore keeps replicas of the embedding on the last stage: as output_layer.weight when tied,
            # and as the embedding the MTP blocks use (gpt_model.py:149, sharded as the same tensor :834)
            if not spec.args["untie_embeddings_and_output_weights"]:
                out[pt.mcore_name].append((pt, Slot(last.pp_rank, None, model_key(last), "output_layer.weight")))
            if spec.mtp_depth:
                out[pt.mcore_name].append((pt, Slot(last.pp_rank, None, model_key(last), key)))
    return out


def extra_state_keys(spec: ModelSpec, layout: ParallelLayout, pp: int, ep: int, grouped: bool) -> list[tuple[str, str]]:
    """(model key, state-dict key) of every ``_extra_state`` entry in the files of stage ``pp``, EP rank ``ep``.

    Grouped experts (TEGroupedMLP) keep theirs under other names, which are not written.
    """
    chunks = layout.chunks(spec.num_layers)
    by_layer = {layer: c for c in chunks for layer in c.layers}
    local_experts = int(spec.args.get("num_moe_experts") or 1) // layout.ep
    out = []
    for extra, layer, expert, mtp in spec.extra_states():
        chunk = chunks[-1] if layer is None else by_layer[layer]
        if chunk.pp_rank != pp:
            continue
        name = extra.module
        if layer is not None:
            name = name.replace("{L}", str(layer - chunk.first_layer))
        if mtp is not None:
            name = name.replace("{M}", str(mtp))
        if expert is not None:
            expert_rank, local = divmod(expert, local_experts)
            if expert_rank != ep or grouped:
                continue
            name = name.replace("{E}", str(local))
        out.append((model_key(chunk), f"{name}._extra_state"))
    return out


def write_legacy(plan: WritePlan, job: WriteJob) -> None:
    """Write the rank files of ``job.share`` (relative to ``job.folder``, the iteration folder), stage by
    stage: every (TP, EP) file of a stage at once, so each canonical tensor is read once, however many
    EP ranks hold a replica of it."""
    spec, layout, margs = plan.spec, plan.layout, plan.margs
    assert margs is not None
    job.folder.mkdir(parents=True, exist_ok=True)
    grouped = bool(margs.get("moe_grouped_gemm"))
    iteration = plan.iteration or 0
    ns = args_namespace(margs, iteration)
    record = bridge_record(spec)
    mine = {id(step) for step in plan.mine(job.share)}
    for pp, stage in groupby(plan.steps, key=lambda step: step.where.pp):
        stage = list(stage)
        laid_out: dict[tuple[int, int], _Laid] = {}
        try:
            for rank in [(t, e) for e in range(layout.ep) for t in range(layout.tp)]:
                name = rank_file(rank[0], pp, layout, rank[1])
                if job.share is not None and name not in job.share:
                    continue
                entries = [(s.pt, s.where) for s in stage if s.where.ep in (None, rank[1])]
                laid_out[rank] = _lay_out(job.folder / name, spec, layout, margs, plan.dtype, pp, rank[1], grouped,
                                          entries, {"args": ns, "checkpoint_version": CHECKPOINT_VERSION,
                                                    "iteration": iteration, "ckptbridge": record}, plan.layer_spec)
            for step in stage:
                if id(step) not in mine:
                    continue  # held only by other workers' files
                pt, slot = step.pt, step.where
                kind = pt.rule.shard_kind(plan.layer_spec)
                spans = job.fast(pt)
                if spans is not None:  # bytes that move unchanged: each rank's rows copied from the source
                    parts = shard_spans(spans, kind, layout.tp_for(pt.rule.parallel), pt.mcore_name)
                    for (t, e), laid in laid_out.items():
                        if slot.ep in (None, e):
                            laid.write_spans(slot, parts[shard_index(t, pt, layout)], job.kernel_copy)
                    job.progress(spans.nbytes)
                    continue
                canonical = pt.to_stored(job.read(pt), margs)
                shards = split(canonical, kind, layout.tp_for(pt.rule.parallel), pt.mcore_name)
                for (t, e), laid in laid_out.items():
                    if slot.ep in (None, e):
                        laid.write(slot, shards[shard_index(t, pt, layout)])
                job.progress(canonical.numel() * canonical.element_size())
            for laid in laid_out.values():
                laid.check()
        finally:
            for laid in laid_out.values():
                laid.file.close()


@dataclass
class _Laid:
    """One rank file laid out by `_lay_out`: where each tensor's bytes go, and how many were written."""

    file: CheckedFile
    size: int  # the file's size once laid out; filling in tensor bytes must not change it
    regions: dict[tuple[str, str], tuple[int, int]]  # (model key, key) -> (offset, nbytes)
    written: set[tuple[str, str]] = field(default_factory=set)

    def write(self, slot: Slot, shard: torch.Tensor) -> None:
        offset, nbytes = self.regions[(slot.model_key, slot.key)]
        data = memoryview(shard.contiguous().view(torch.uint8).numpy()).cast("B")
        if len(data) != nbytes:
            raise PlanError(f"{self.file.path}: {slot.key!r} has {len(data)} bytes, the layout reserved {nbytes}")
        pwrite_all(self.file.fd, data, offset, self.file.path)
        self.written.add((slot.model_key, slot.key))

    def write_spans(self, slot: Slot, spans: Spans, kernel_copy: bool) -> None:
        offset, nbytes = self.regions[(slot.model_key, slot.key)]
        if spans.nbytes != nbytes:
            raise PlanError(f"{self.file.path}: {slot.key!r} has {spans.nbytes} bytes, the layout reserved {nbytes}")
        write_spans(spans, self.file.fd, offset, self.file.path, kernel_copy)
        self.written.add((slot.model_key, slot.key))

    def check(self) -> None:
        """Every reserved region written, and the file still the size its layout gave it."""
        missing = sorted(set(self.regions) - self.written)
        if missing:
            raise PlanError(f"{self.file.path}: {len(missing)} tensors never written (first {missing[0][1]!r})")
        check_size(self.file.path, self.size)


def shard_spans(spans: Spans, kind: ShardKind, tp: int, what: str) -> list[Spans]:
    """`sharding.split` for a tensor given as byte runs: each rank's regions (row ranges) back to back."""
    if kind.axis is None or tp == 1:
        return [spans] * tp
    return [spans.regions(kind.axis, regions) for regions in kind.regions(spans.shape, tp, what)]


def _lay_out(path: Path, spec: ModelSpec, layout: ParallelLayout, margs: dict[str, Any], dtype: torch.dtype,
             pp: int, ep: int, grouped: bool, entries: list[tuple[PlannedTensor, Slot]],
             extra: dict[str, Any], layer_spec: str = "te") -> _Laid:
    """Write one rank file's structure (no tensor bytes); return it open, with each tensor's byte region."""
    models: dict[str, dict[str, torch.Tensor | None]] = {model_key(c): {} for c in layout.stage_chunks(spec.num_layers, pp)}
    for pt, slot in entries:
        shape = local_shape(pt, margs, layout, layer_spec)
        models[slot.model_key][slot.key] = torch.empty(shape, dtype=pt.dtype(dtype))  # never touched: skip_data
    for mk, key in extra_state_keys(spec, layout, pp, ep, grouped):
        models[mk][key] = None
    path.parent.mkdir(parents=True, exist_ok=True)
    f = CheckedFile(path)
    try:
        with torch.serialization.skip_data():
            f.saving({**models, **extra}, save_with_megatron_names)
        size = f.tell()
        meta = safe_load(path, map_location="meta")
    except BaseException:
        f.close()
        raise
    regions = {(mk, k): (v.untyped_storage()._checkpoint_offset, v.untyped_storage().nbytes())
               for mk, sd in meta.items() if mk.startswith("model") for k, v in sd.items() if isinstance(v, torch.Tensor)}
    return _Laid(f, size, regions)


def local_shape(pt: PlannedTensor, margs: dict[str, Any], layout: ParallelLayout, layer_spec: str) -> tuple[int, ...]:
    shape = list(pt.stored_shape(margs))
    kind = pt.rule.shard_kind(layer_spec)
    if kind.axis is not None:
        shape[kind.axis] //= layout.tp_for(pt.rule.parallel)
    return tuple(shape)


def _tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor inside a nested state (dicts, lists) loaded on the meta device."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors_in(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v)]
    return []


class LegacySource:
    """Canonical tensors read from a legacy checkpoint (strictly inventoried first)."""

    format = "torch"
    _carried_file = None  # the held CARRIED_FILE, once opened

    def __init__(self, iter_dir: Path, options: ConfigOptions | None = None):
        self.iter_dir = Path(iter_dir)
        dirs = sorted(p.name for p in self.iter_dir.iterdir() if p.is_dir() and RANK_DIR.match(p.name))
        if not dirs:
            raise FormatError(f"{self.iter_dir}: no mp_rank_* folders")
        first_path = self.iter_dir / dirs[0] / FILE
        head = safe_load(first_path, map_location="meta")  # structure only: no tensor (model or optimizer) is read
        self.common = CommonState.from_dict(head, first_path, options)
        self.spec, self.margs = self.common.spec, self.common.margs
        self.layout = ParallelLayout.from_args(self.margs)
        self.layer_spec = "local" if self.margs.get("transformer_impl") == "local" else "te"
        expected = {rank_dir_name(t, p, self.layout, e): (t, p, e) for t, p, e in all_ranks(self.layout)}
        if set(dirs) != set(expected):
            raise FormatError(
                f"{self.iter_dir}: rank folders do not match the layout in args ({self.layout.describe()}): "
                f"missing {sorted(set(expected) - set(dirs))}, unexpected {sorted(set(dirs) - set(expected))}"
            )
        self.paths: dict[Rank, Path] = {rank: self.iter_dir / name / FILE for name, rank in expected.items()}
        # held open before their structure is read: offsets parsed now are read from these very files
        self._files: dict[Rank, HeldFile] = {}
        try:
            for rank, path in self.paths.items():
                self._files[rank] = HeldFile(path)
        except FormatError:
            self.close()
            raise
        self.meta = {rank: (head if path == first_path else safe_load(path, map_location="meta"))
                     for rank, path in self.paths.items()}
        self.dtype = self._dtype()
        # the conversion's planned tensors, computed once: verification, the write plan and `read` use them
        self.planned: tuple[PlannedTensor, ...] = tuple(self.spec.planned())
        self._slots = slots(self.spec, self.layout, self.layer_spec, bool(self.margs.get("moe_grouped_gemm")), self.planned)
        # tensors the mapping carries unchanged (a vision tower; see `carried`), None when the folder has none
        self.carried, self._carried_file = open_sidecar(self.iter_dir, self.spec.mapping.carry)

    def training_state(self) -> SkippedState:
        """Optimizer and RNG state in the rank files and the distributed optimizer's files beside them
        (``distrib_optim.pt``): never read, only counted."""
        entries, size, kinds = 0, 0, set()
        for sd in self.meta.values():
            for key, value in sd.items():
                if key.startswith("model") or key in ("args", "ckptbridge"):
                    continue
                tensors = [t for t in _tensors_in(value)]
                if key in ("optimizer", "rng_state", "opt_param_scheduler") or tensors:
                    kinds.add("optimizer state" if key == "optimizer" else key)
                    entries += max(1, len(tensors))
                    size += sum(t.numel() * t.element_size() for t in tensors)
        for path in sorted(self.iter_dir.glob("mp_rank_*/distrib_optim.pt")):
            kinds.add("distributed optimizer (distrib_optim.pt)")
            entries += 1
            size += path.stat().st_size
        return SkippedState(entries, size, tuple(sorted(kinds)))

    def _dtype(self) -> torch.dtype:
        for sd in self.meta.values():
            for mk, models in sd.items():
                if mk.startswith("model") and models:
                    return next(v.dtype for k, v in models.items() if isinstance(v, torch.Tensor) and not is_extra_state(k))
        raise FormatError(f"{self.iter_dir}: checkpoint holds no tensors")

    def verify(self) -> None:
        """Every key mapped, none missing, every shard shape as the config predicts."""
        expected: dict[tuple[Rank, str, str], tuple[int, ...]] = {}
        for entries in self._slots.values():
            for pt, slot in entries:
                for t, p, e in all_ranks(self.layout):
                    if p == slot.pp and slot.ep in (None, e):
                        expected[((t, p, e), slot.model_key, slot.key)] = local_shape(pt, self.margs, self.layout, self.layer_spec)
        seen = set()
        for rank, sd in self.meta.items():
            for mk, models in sd.items():
                if not mk.startswith("model"):
                    continue
                for key, value in models.items():
                    if is_extra_state(key):
                        continue
                    where = f"{key!r} in {self.paths[rank]} [{mk}]"
                    if (rank, mk, key) not in expected:
                        raise PlanError(f"unmapped source tensor {where}")
                    want = expected[(rank, mk, key)]
                    if tuple(value.shape) != want:
                        raise PlanError(f"tensor {where} has shape {list(value.shape)}, the config implies {list(want)}")
                    seen.add((rank, mk, key))
        missing = sorted(set(expected) - seen)
        if missing:
            rank, mk, key = missing[0]
            raise PlanError(f"missing tensor {key!r} [{mk}] in {self.paths[rank]} ({len(missing)} missing in all)")
        self.check_replicas()

    def _fd(self, rank: Rank) -> int:
        return self._files[rank].fd

    def check_unchanged(self) -> None:
        for f in self._files.values():
            f.check_unchanged()
        if self._carried_file is not None:
            self._carried_file.check_unchanged()

    def _read_slot(self, pt: PlannedTensor, slot: Slot) -> torch.Tensor:
        """The global tensor from one EP rank's TP shards; a dense weight must be identical on every EP rank."""
        eps = [slot.ep] if slot.ep is not None else list(range(self.layout.ep))
        copies = [self._read_ep(pt, slot, ep) for ep in eps]
        for ep, copy in zip(eps[1:], copies[1:]):
            if not torch.equal(copy, copies[0]):
                raise PlanError(f"{slot.key!r} differs between EP rank 0 and EP rank {ep} (stage {slot.pp})")
        return copies[0]

    def _read_ep(self, pt: PlannedTensor, slot: Slot, ep: int) -> torch.Tensor:
        ranks = [(t, slot.pp, ep) for t in range(self.layout.tp)]
        shards = [read_storage(self._fd(r), self.meta[r][slot.model_key][slot.key], f"{self.paths[r]}: {slot.key}")
                  for r in ranks]
        parts = self.layout.tp_for(pt.rule.parallel)
        kind = pt.rule.shard_kind(self.layer_spec)
        if kind.axis is None or parts == 1:
            for rank, shard in zip(ranks[1:], shards[1:]):
                if not torch.equal(shard, shards[0]):
                    raise PlanError(f"replicated tensor {slot.key!r} differs between TP rank 0 and {self.paths[rank]}")
            shards = shards[:1]
        full = merge(shards, kind, pt.mcore_name)
        return pt.from_stored(full)

    def read(self, pt: PlannedTensor) -> torch.Tensor:
        return self._read_slot(pt, self._slots[pt.mcore_name][0][1])

    def spans(self, pt: PlannedTensor, dtype: torch.dtype) -> Spans | None:
        """The canonical tensor as runs of the held rank files, when no replica needs comparing (`read`
        compares a dense weight across EP ranks and a replicated one across TP ranks) and its TP shards are
        row ranges, or single column blocks (row-parallel: one `fastcopy.Columns`), already in ``dtype``;
        None otherwise. The tied replica on the last stage is compared by `verify`."""
        slot = self._slots[pt.mcore_name][0][1]
        parts, kind = self.layout.tp_for(pt.rule.parallel), pt.rule.shard_kind(self.layer_spec)
        sharded = kind.axis is not None and parts > 1
        if (slot.ep is None and self.layout.ep > 1) or (self.layout.tp > 1 and not (sharded and parts == self.layout.tp)) \
                or (sharded and kind.axis not in (0, 1)):
            return None
        shards = []
        for t in range(self.layout.tp):
            rank = (t, slot.pp, slot.ep or 0)
            meta = self.meta[rank][slot.model_key][slot.key]
            run = stored_run(self._fd(rank), 0, meta)
            if run is None or meta.dtype != dtype:
                return None
            shards.append(Spans((run,), dtype, tuple(meta.shape)))
        full = shards[0]
        if sharded and kind.axis == 1:  # each rank's one column block, side by side
            shape = (shards[0].shape[0], shards[0].shape[1] * parts, *shards[0].shape[2:])
            blocks = [(regions, shard) for shard, regions in zip(shards, kind.regions(shape, parts, pt.mcore_name))]
            if any(len(regions) != 1 for regions, _ in blocks):
                return None
            blocks.sort(key=lambda b: b[0][0][0])
            full = Spans((Columns(tuple(shard.runs[0] for _, shard in blocks), shape[0]),), dtype, shape)
        elif sharded:  # `sharding.merge` on byte runs: each rank's regions put back at their global rows
            shape = (shards[0].shape[0] * parts, *shards[0].shape[1:])
            pieces = []
            for shard, regions in zip(shards, kind.regions(shape, parts, pt.mcore_name)):
                at = 0
                for start, length in regions:
                    pieces.append((start, shard.rows(at, length).runs))
                    at += length
            full = Spans(tuple(r for _, runs in sorted(pieces, key=lambda p: p[0]) for r in runs), dtype, shape)
        return full.rows(0, pt.shape[0]) if pt.rule.shard.padded else full

    def check_replicas(self) -> None:
        """The tied output-layer replica on the last stage must equal the embedding."""
        for entries in self._slots.values():
            if len(entries) > 1:
                pt = entries[0][0]
                base = self._read_slot(pt, entries[0][1])
                for _, slot in entries[1:]:
                    if not torch.equal(self._read_slot(pt, slot), base):
                        raise PlanError(f"{slot.key!r} on stage {slot.pp} is not an exact replica of {pt.mcore_name}")

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        if self._carried_file is not None:
            self._carried_file.close()
        self._files.clear()
