"""One conversion's write plan: which planned tensor goes into which data files, in which order.

Computed once, from shapes alone (no byte is read), by the target format's planner (see `output`),
and then used by everything that must agree on it: the split of the data files across workers
(`workshare.assign` on ``files.sizes``), the prefetcher (`reads`: the exact sequence of tensors the
writer will ask for), the writer (which walks ``steps``) and the finishing step (index files). A
writer is a storage back-end of this plan: it lays out and fills the files the plan names, and never
decides placement or order itself.

Byte placement (``Step.at``: each tensor byte region's data file, offset, length) is in the plan where
shapes decide it: HF (each shard's safetensors header is laid out from its entries,
`safetensors_io.lay_out`) and torch_dist (items follow each other in plan order, each framed by the
``torch.save`` record of its shape and dtype, which does not depend on where the item sits; the
``.metadata`` index is the plan's, `torch_dist_writer.planned_storage`, and the writers check they
put every item there). The legacy format's offsets are not in the plan: a rank file is one
``torch.save`` of the whole state (model chunks, the Megatron ``args`` namespace, extra states), so
each tensor's offset follows from pickling that file's whole structure; the writer does that, data
skipped, when it opens the file (`legacy._lay_out`), so each worker lays out only its own files.

The source side is not in this plan, which is computed from shapes alone so that every worker agrees
on it without opening the source: the planned tensors come from the source (``source.planned``,
planned once when it is opened, with the per-tensor resolution its readers use: HF entries,
torch_dist storage keys, legacy slots), and the source byte runs of tensors whose bytes move
unchanged (`fastcopy.Spans`, runs of this process's held descriptors) are worked out once per worker
for its share (`convert.fast_plan`) and reach the writer as ``WriteJob.fast``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .fastcopy import Spans
from .layout import ParallelLayout
from .spec import ModelSpec, PlannedTensor
from .workshare import FilePlan

Read = Callable[[PlannedTensor], torch.Tensor]
Fast = Callable[[PlannedTensor], Spans | None]
Progress = Callable[[int], None]


class Region(NamedTuple):
    """``length`` tensor bytes at ``offset`` of the data file ``file`` (relative to the writer's folder)."""

    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class Step:
    """One planned tensor as the writer takes it: the format's placement (``where``: HF entries, torch_dist
    chunks, a legacy slot), the tensor bytes it puts in each data file and, where the format's layout is
    known from shapes (HF, torch_dist), the byte regions they fill (``at``). A tensor written to two
    places that the writer fills at different times (a legacy replica on another stage) has two steps."""

    pt: PlannedTensor
    where: Any
    sizes: tuple[tuple[str, int], ...]  # (data file, tensor bytes this step puts there)
    at: tuple[Region, ...] = ()  # where those bytes go, in writing order (legacy: decided by torch, see WritePlan)

    @property
    def files(self) -> frozenset[str]:
        return frozenset(name for name, _ in self.sizes)


@dataclass(frozen=True)
class WritePlan:
    """What one output holds and in which order it is written (see the module docstring)."""

    format: str  # "hf", "torch_dist" or "torch" (legacy)
    spec: ModelSpec
    dtype: torch.dtype
    steps: tuple[Step, ...]  # in writing order
    files: FilePlan  # data files (relative to the folder the writer fills), their bytes, which hold each tensor
    layout: ParallelLayout = ParallelLayout()
    margs: dict[str, Any] | None = None  # MCore: the megatron arguments the output is written for
    layer_spec: str = "te"
    iteration: int | None = None
    detail: Any = None  # the format's own rest: HF BlockFP8 export layout, torch_dist extra-state items
    carried: Any = None  # formats.carried.Carried: tensors the mapping carries unchanged, written when finishing

    def mine(self, share: Collection[str] | None) -> list[Step]:
        """The steps a worker writing the data files ``share`` (None: all) takes, in order."""
        return list(self.steps) if share is None else [s for s in self.steps if not s.files.isdisjoint(share)]

    def reads(self, share: Collection[str] | None, fast: Collection[str]) -> list[PlannedTensor]:
        """The tensors the writer of ``share`` reads, in the order it reads them: every step's tensor but
        those copied as byte runs (``fast``: MCore names). What the prefetcher follows."""
        return [s.pt for s in self.mine(share) if s.pt.mcore_name not in fast]


def file_plan(steps: Iterable[Step], files: Iterable[str] = ()) -> FilePlan:
    """The data files of ``steps`` (and ``files``, which may hold no tensor bytes), bytes and holders."""
    sizes = {name: 0 for name in files}
    files_of: dict[str, frozenset[str]] = {}
    for step in steps:
        for name, nbytes in step.sizes:
            sizes[name] = sizes.get(name, 0) + nbytes
        files_of[step.pt.mcore_name] = files_of.get(step.pt.mcore_name, frozenset()) | step.files
    return FilePlan(sizes, files_of)


@dataclass(frozen=True)
class WriteJob:
    """One process's part of writing a plan: where, which data files, and how tensors arrive.

    ``fast(pt)`` gives a tensor's stored bytes as source runs (copied inside the kernel when
    ``kernel_copy``) or None, then ``read(pt)`` gives it, in the order `WritePlan.reads` says."""

    folder: Path  # HF: the output folder; MCore: its iteration folder
    read: Read
    fast: Fast
    progress: Progress
    kernel_copy: bool = True
    share: frozenset[str] | None = None  # the data files this process writes (None: all)
