"""One conversion: plan and verify everything, then write into a temporary
folder beside the destination and move it into place only when complete."""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import DestinationError
from .config_source import ConfigOptions
from .formats.detect import Source, open_source, source_assets, source_notes
from .formats.hf import write_hf
from .formats.legacy import write_legacy
from .formats.mcore_common import ASSETS_DIR, iteration_name, write_tracker
from .formats.torch_dist import write_torch_dist
from .layout import DEFAULT_VOCAB_DIVISIBLE_BY, ParallelLayout
from .prefetch import Prefetcher
from .spec import PlannedTensor

Progress = Callable[[int], None]


@dataclass
class ConversionResult:
    src: Path
    dst: Path
    src_format: str
    dst_format: str
    family: str
    layout: str
    dtype: torch.dtype
    tensors: int
    bytes: int
    seconds: float
    notes: tuple[str, ...] = ()  # what the user should know: config origin, skipped training state...


@dataclass(frozen=True)
class Target:
    kind: str  # "hf" or "mcore"
    layout: ParallelLayout = ParallelLayout()
    ckpt_format: str = "torch_dist"  # or "torch"
    spec_name: str = "te"  # or "local"
    dtype: torch.dtype | None = None  # None: keep the source dtype
    vocab_divisible_by: int = DEFAULT_VOCAB_DIVISIBLE_BY
    grouped_gemm: bool = False  # legacy MoE: TEGroupedMLP names (experts.linear_fc1.weight{e})
    iteration: int | None = None  # MCore: iter_{N:07d}/ and tracker N (None: release/)
    check_megatron: bool = False  # MCore: check the plan against megatron-core's meta model before writing

    @property
    def format_name(self) -> str:
        return "hf" if self.kind == "hf" else self.ckpt_format


def check_destination(src: Path, dst: Path, force: bool) -> None:
    s, d = src.resolve(), dst.resolve()
    if s == d or s in d.parents or d in s.parents:
        raise DestinationError(f"destination {dst} overlaps the source {src}; the source is never modified")
    if d.exists() and not force:
        raise DestinationError(f"destination {dst} exists; pass --force to replace it")


@contextmanager
def staging_dir(dst: Path, force: bool) -> Iterator[Path]:
    """A temp folder beside ``dst`` that replaces it only if the block completes."""
    dst = dst.resolve()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.ckptbridge-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        if not force:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DestinationError(f"destination {dst} appeared during conversion")
        old = dst.parent / f".{dst.name}.ckptbridge-old-{os.getpid()}"
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old)
    else:
        tmp.rename(dst)


def convert(src: Path, dst: Path, src_kind: str | None, target: Target, force: bool = False,
            progress_factory: Callable[[int, str], Progress] | None = None, config: ConfigOptions | None = None,
            iteration: int | None = None) -> ConversionResult:
    """Convert ``src`` into ``dst``; every check runs before the first byte is written. ``config`` and
    ``iteration`` say how to read an MCore source that ckptbridge did not write (see `config_source`)."""
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    check_destination(src, dst, force)
    source = open_source(src, src_kind, config, iteration)
    try:
        source.verify()
        spec = source.spec
        dtype = target.dtype or source.dtype
        margs = None
        if target.kind == "mcore":
            margs = spec.megatron_args(target.layout, dtype, target.spec_name, target.ckpt_format,
                                       target.vocab_divisible_by, target.grouped_gemm)
        if margs is not None and target.check_megatron:
            from .mcore.plan_check import check_plan_isolated  # imports megatron-core: only when asked

            check_plan_isolated(spec, margs, target.ckpt_format, target.spec_name)
        planned = spec.planned()
        total = sum(math.prod(pt.shape) * pt.dtype(dtype).itemsize for pt in planned)
        progress = progress_factory(total, f"{source.format} -> {target.format_name}") if progress_factory else (lambda n: None)

        def read_cast(pt: PlannedTensor) -> torch.Tensor:
            return source.read(pt).to(pt.dtype(dtype))

        assets = source_assets(src, source, config)
        notes = source_notes(source)
        with staging_dir(dst, force) as tmp, closing(Prefetcher(planned, read_cast)) as read:
            if target.kind == "hf":
                write_hf(spec, read, tmp, dtype, assets, progress)
            else:
                iter_dir = tmp / iteration_name(target.iteration)
                iter_dir.mkdir()
                writer = write_torch_dist if target.ckpt_format == "torch_dist" else write_legacy
                writer(spec, read, iter_dir, target.layout, margs, dtype, target.spec_name, progress,
                       iteration=target.iteration or 0)
                write_tracker(tmp, target.iteration)
                if assets:
                    (tmp / ASSETS_DIR).mkdir()
                    for a in assets:
                        shutil.copy2(a, tmp / ASSETS_DIR / a.name)
    finally:
        source.close()
    return ConversionResult(
        src=src, dst=dst, src_format=source.format, dst_format=target.format_name, family=spec.mapping.family,
        layout=target.layout.describe() if target.kind == "mcore" else "-", dtype=dtype, tensors=len(planned),
        bytes=total, seconds=time.perf_counter() - start, notes=notes,
    )

