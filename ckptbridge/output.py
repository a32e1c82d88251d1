"""One target format as the conversion drives it: planned from shapes, data files written by share,
the rest (index, config, tracker, assets) once every data file is there.

A single process writes all data files and then finishes; several (see `team`) each write their
share of whole files, and rank 0 finishes with what every rank reports (torch_dist: where each of
its items went, for the ``.metadata`` index).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .fastcopy import Spans
from .fileio import copy_file
from .formats.carried import CARRIED_FILE, Carried
from .formats.fp8_block import BlockFP8
from .formats.hf import hf_file_plan, write_hf
from .formats.legacy import legacy_file_plan, write_legacy
from .formats.mcore_common import ASSETS_DIR, iteration_name, write_tracker
from .formats.torch_dist_writer import dist_file_plan, finish_torch_dist, write_dist_data
from .spec import ModelSpec, PlannedTensor
from .workshare import FilePlan

Read = Callable[[PlannedTensor], torch.Tensor]
Fast = Callable[[PlannedTensor], Spans | None]
Progress = Callable[[int], None]


@dataclass(frozen=True)
class Output:
    plan: FilePlan  # data files relative to ``folder`` (HF) or its iteration folder (MCore)
    write: Callable[[Read, Fast, Progress, Collection[str] | None], Any]  # data files (None: all) -> a report
    finish: Callable[[list[Any]], None]  # every rank's report -> the rest of the output


def output_for(spec: ModelSpec, folder: Path, kind: str, ckpt_format: str, layout, margs: dict[str, Any] | None,  # noqa: ANN001
               dtype: torch.dtype, spec_name: str, iteration: int | None, assets: list[Path],
               max_shard_bytes: int, fp8: BlockFP8 | None, kernel_copy: bool, carried: Carried | None = None) -> Output:
    """How the output in ``folder`` (the staging folder) is written. ``carried``: the tensors the mapping
    carries unchanged (see `formats.carried`), written when the output is finished."""
    if kind == "hf":
        def write_hf_data(read: Read, fast: Fast, progress: Progress, files: Collection[str] | None) -> None:
            write_hf(spec, read, folder, dtype, assets, progress, max_shard_bytes, fp8=fp8, fast=fast,
                     kernel_copy=kernel_copy, files=files, finish=False, carried=carried)

        def finish_hf(_: list[Any]) -> None:
            write_hf(spec, _unread, folder, dtype, assets, _no_progress, max_shard_bytes, fp8=fp8, files=(), finish=True,
                     kernel_copy=kernel_copy, carried=carried)

        return Output(hf_file_plan(spec, dtype, max_shard_bytes, fp8, carried), write_hf_data, finish_hf)

    assert margs is not None
    iter_dir = folder / iteration_name(iteration)

    def finish_mcore(reports: list[Any]) -> None:
        if ckpt_format == "torch_dist":
            storage = {k: v for report in reports for k, v in report.items()}
            finish_torch_dist(spec, iter_dir, layout, margs, dtype, spec_name, storage, iteration or 0)
        if carried is not None:  # beside the model's files: megatron's loaders read only those their metadata names
            iter_dir.mkdir(parents=True, exist_ok=True)
            carried.write_file(iter_dir / CARRIED_FILE, kernel_copy)
        if assets:
            (folder / ASSETS_DIR).mkdir()
            for a in assets:
                copy_file(a, folder / ASSETS_DIR / a.name)
        write_tracker(folder, iteration)  # last: the tracker makes the folder a checkpoint for Megatron-LM

    if ckpt_format == "torch_dist":
        def write_dist(read: Read, fast: Fast, progress: Progress, files: Collection[str] | None) -> Any:
            return write_dist_data(spec, read, iter_dir, layout, margs, dtype, spec_name, progress, fast, kernel_copy, files)

        return Output(dist_file_plan(spec, layout, margs, dtype, spec_name), write_dist, finish_mcore)

    grouped = bool(margs.get("moe_grouped_gemm"))

    def write_torch(read: Read, fast: Fast, progress: Progress, files: Collection[str] | None) -> None:
        iter_dir.mkdir(parents=True, exist_ok=True)
        write_legacy(spec, read, iter_dir, layout, margs, dtype, spec_name, progress, iteration=iteration or 0,
                     fast=fast, kernel_copy=kernel_copy, files=files)

    return Output(legacy_file_plan(spec, layout, margs, dtype, spec_name, grouped), write_torch, finish_mcore)


def _unread(pt: PlannedTensor) -> torch.Tensor:
    raise AssertionError(f"{pt.mcore}: finishing an output reads no tensor")


def _no_progress(n: int) -> None:
    return None
