"""One target format as the conversion drives it: its write plan (from shapes), the data files
written by share, the rest (index, config, tracker, assets) once every data file is there.

A single process writes all data files and then finishes; several (see `team`) each write their
share of whole files, and rank 0 finishes with what every rank reports (torch_dist: where each of
its items went, for the ``.metadata`` index).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .fileio import copy_file
from .formats.carried import CARRIED_FILE, Carried
from .formats.hf import FP8Export, finish_hf, hf_plan, write_hf_data
from .formats.legacy import legacy_plan, write_legacy
from .formats.mcore_common import ASSETS_DIR, iteration_name, write_tracker
from .formats.torch_dist_writer import dist_plan, finish_torch_dist, write_dist_data
from .layout import ParallelLayout
from .spec import ModelSpec, PlannedTensor
from .write_plan import Fast, Progress, Read, WriteJob, WritePlan


def plan_output(spec: ModelSpec, planned: Sequence[PlannedTensor], fmt: str, dtype: torch.dtype,
                layout: ParallelLayout, margs: dict[str, Any] | None, layer_spec: str, iteration: int | None,
                max_shard_bytes: int, fp8: FP8Export | None, workers: int = 1, carried: Carried | None = None) -> WritePlan:
    """The write plan of a ``fmt`` ("hf", "torch_dist", "torch") output, for ``workers`` writers (``fp8``:
    an HF output's FP8 export, `formats.hf.fp8_export`).
    ``carried``: the tensors the mapping carries unchanged (see `formats.carried`), written when finishing."""
    if fmt == "hf":
        return hf_plan(spec, planned, dtype, max_shard_bytes, fp8, carried)
    assert margs is not None
    if fmt == "torch_dist":
        plan = dist_plan(spec, planned, layout, margs, dtype, layer_spec, iteration, workers)
    else:
        plan = legacy_plan(spec, planned, layout, margs, dtype, layer_spec, iteration)
    return plan if carried is None else replace(plan, carried=carried)


@dataclass(frozen=True)
class Output:
    """A write plan bound to the folder it fills (the staging folder)."""

    plan: WritePlan
    folder: Path
    assets: list[Path]
    kernel_copy: bool = True

    @property
    def data_folder(self) -> Path:
        """Where the plan's data files go: the folder (HF) or its iteration folder (MCore)."""
        return self.folder if self.plan.format == "hf" else self.folder / iteration_name(self.plan.iteration)

    def write(self, read: Read, fast: Fast, progress: Progress, share: frozenset[str] | None) -> Any:
        """This process's data files (``share``; None: all) -> its report for `finish`."""
        job = WriteJob(self.data_folder, read, fast, progress, self.kernel_copy, share)
        if self.plan.format == "hf":
            return write_hf_data(self.plan, job)
        if self.plan.format == "torch_dist":
            return write_dist_data(self.plan, job)
        return write_legacy(self.plan, job)

    def finish(self, reports: list[Any]) -> None:
        """Every rank's report -> the rest of the output (index files last)."""
        if self.plan.format == "hf":
            finish_hf(self.plan, self.folder, self.assets, self.kernel_copy)
            return
        if self.plan.format == "torch_dist":
            storage = {k: v for report in reports for k, v in report.items()}
            finish_torch_dist(self.plan, self.data_folder, storage)
        if self.plan.carried is not None:  # beside the model's files: megatron's loaders read only those their metadata names
            self.data_folder.mkdir(parents=True, exist_ok=True)
            self.plan.carried.write_file(self.data_folder / CARRIED_FILE, self.kernel_copy)
        if self.assets:
            (self.folder / ASSETS_DIR).mkdir()
            for a in self.assets:
                copy_file(a, self.folder / ASSETS_DIR / a.name)
        write_tracker(self.folder, self.plan.iteration)  # last: the tracker makes the folder a checkpoint for Megatron-LM
