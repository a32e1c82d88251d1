"""One conversion: plan and verify everything, then write into a temporary
folder beside the destination and move it into place only when complete."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import OptionError
from .config_source import ConfigOptions, refuse_unused
from .formats.carried import resolve_carried
from .formats.detect import Source, open_source, source_assets, source_notes
from .formats.hf import DEFAULT_MAX_SHARD_BYTES, INDEX, HFSource, fp8_export
from .layout import DEFAULT_VOCAB_DIVISIBLE_BY, ParallelLayout
from .fastcopy import Spans, hf_spans
from .prefetch import Prefetcher
from .spec import PlannedTensor
from .values import SpanChecks, ValueChecks
from .errors import WorkerError
from .fileio import write_text
from .output import Output, plan_output
from .staging import MARKER, Leftover, Staging, check_destination, staged
from .team import STAGING_ENV, Team, given_staging
from .workshare import assign

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
    leftovers: list[Leftover] = field(default_factory=list)  # of interrupted conversions to DST, still there
    cleaned: list[Leftover] = field(default_factory=list)  # removed by --clean
    restored: Path | None = None  # old DST put back: a two-step --force had died between its renames


@dataclass(frozen=True)
class Target:
    kind: str  # "hf" or "mcore"
    layout: ParallelLayout = ParallelLayout()
    ckpt_format: str = "torch_dist"  # or "torch"
    layer_spec: str = "te"  # or "local"
    dtype: torch.dtype | None = None  # None: keep the source dtype
    vocab_divisible_by: int = DEFAULT_VOCAB_DIVISIBLE_BY
    grouped_gemm: bool = False  # legacy MoE: TEGroupedMLP names (experts.linear_fc1.weight{e})
    iteration: int | None = None  # MCore: iter_{N:07d}/ and tracker N (None: release/)
    hf_fp8: bool = False  # HF: linear weights as block-scaled FP8 (--hf-dtype fp8-block)
    max_shard_bytes: int | None = None  # HF: shard size limit (None: the source's, else 5 GB; see shard_limit)
    check_megatron: bool = False  # MCore: check the plan against megatron-core's meta model before writing
    fast_copy: bool = True  # tensors whose bytes move unchanged copied inside the kernel (--no-fast-copy: off)

    @property
    def format_name(self) -> str:
        return "hf" if self.kind == "hf" else self.ckpt_format


def shard_limit(source: Source, target: Target, dtype: torch.dtype) -> int:
    """The HF output's shard size limit: the one asked for; else, for an HF source with an index, its
    largest shard (counted in the output dtype, so a cast keeps the layout); else 5 GB (transformers')."""
    if target.max_shard_bytes is not None:
        return target.max_shard_bytes
    if isinstance(source, HFSource) and (source.folder / INDEX).exists():
        return max(sum(math.prod(e.shape) for e in f.entries.values()) * dtype.itemsize for f in source.files.values())
    return DEFAULT_MAX_SHARD_BYTES


def fast_plan(source: Source, target: Target, planned: list[PlannedTensor], dtype: torch.dtype,
              margs: dict | None) -> dict[str, Spans]:
    """Per planned tensor that the target's writer can take as bytes, its stored bytes as source runs.

    Such a tensor is in the output dtype already and only moves rows (see `fastcopy`); the MCore writers take
    it whole, as row ranges or as column blocks (a row-parallel shard: a short run a row; an MCore source's
    row-parallel tensor is its shards side by side, `fastcopy.Columns`, whose parts a writer at the same TP
    split takes whole). An FP8 export and what a source cannot give as byte runs (see each source's ``spans``:
    replicas to compare, other splits) go through memory."""
    spans_of = getattr(source, "spans", None)
    if spans_of is None or (target.kind == "hf" and target.hf_fp8):
        return {}
    out: dict[str, Spans] = {}
    for pt in planned:
        spans = spans_of(pt, pt.dtype(dtype))
        if spans is None or (target.kind == "hf" and hf_spans(pt, spans, source.spec.args) is None):
            continue
        out[pt.mcore_name] = spans.padded(pt.stored_shape(margs)[0]) if target.kind == "mcore" and pt.rule.shard.padded else spans
    return out


def convert(src: Path, dst: Path, src_kind: str | None, target: Target, force: bool = False,
            progress_factory: Callable[[int, str], Progress] | None = None, config: ConfigOptions | None = None,
            iteration: int | None = None, clean: bool = False, allow_nonfinite: bool = False,
            allow_rounding: bool = False, team: Team | None = None, launch: Callable[[Path], None] | None = None) -> ConversionResult:
    """Convert ``src`` into ``dst``; every check runs before the first byte is written. ``config`` and
    ``iteration`` say how to read an MCore source that ckptbridge did not write (see `config_source`).

    Output is staged beside DST under a lock and replaces it only when complete (see `staging`);
    ``clean`` removes what interrupted conversions to the same DST left behind. ``team``: this process's
    rank among several converting together (each writes its share of whole files, see `team`);
    ``launch(folder)``: run the workers that write into the staging folder instead of writing here.
    """
    start = time.perf_counter()
    team = team or Team()
    src, dst = Path(src), Path(dst)
    check_destination(src, dst, force)
    source = open_source(src, src_kind, config, iteration)
    held: list = []  # files held for carried tensors taken from the --hf-config folder
    try:
        refuse_unused(config, iteration, {src: source})
        source.verify()
        carried, held = resolve_carried(src, source, target.kind == "hf", config.asset_folder() if config else None)
        spec = source.spec
        if not spec.args.get("num_moe_experts"):  # expert options on a dense model would do nothing
            for flag, given in (("--moe-grouped-gemm", target.grouped_gemm), ("--etp", target.layout.etp is not None)):
                if given:
                    raise OptionError(f"{flag} applies to mixture-of-experts models; {src} has no experts")
        dtype = target.dtype or source.dtype
        margs = None
        if target.kind == "mcore":
            margs = spec.megatron_args(target.layout, dtype, target.layer_spec, target.ckpt_format,
                                       target.vocab_divisible_by, target.grouped_gemm)
        if margs is not None and target.check_megatron and team.rank == 0:
            from .mcore.plan_check import check_plan_isolated  # imports megatron-core: only when asked

            check_plan_isolated(spec, margs, target.ckpt_format, target.layer_spec)
        planned = source.planned  # planned once, by the source: its checks, readers and the write plan share it
        fp8, full_precision = fp8_export(spec, planned) if target.kind == "hf" and target.hf_fp8 else (None, set())
        total = sum(math.prod(pt.shape) * pt.dtype(dtype).itemsize for pt in planned)
        assets = source_assets(src, source, config)
        notes = source_notes(source)
        if carried is not None and carried.tensors:
            notes = (*notes, f"carried: {carried.describe()}; from {carried.origin}")
        plan = None
        if launch is None:  # the one plan this process's writer, prefetcher and share follow
            plan = plan_output(spec, planned, target.format_name, dtype, target.layout, margs, target.layer_spec,
                               target.iteration, shard_limit(source, target, dtype), fp8, team.size, carried)
        with _staging(team, src, dst, force, clean, total + (carried.nbytes if carried else 0)) as stage:
            if plan is None:  # the workers write; this process holds the lock and moves the result
                launch(stage.folder)
                source.check_unchanged()
                notes = _merged(notes, _take_notes(stage.folder))
            else:
                output = Output(plan, stage.folder, assets, target.fast_copy)
                share = None if team.size == 1 else assign(plan.files.sizes, team.size)[team.rank]
                size = total if share is None else sum(plan.files.sizes[f] for f in share)
                progress = progress_factory(size, f"{source.format} -> {target.format_name}") if progress_factory else (lambda n: None)
                values = ValueChecks(dtype, explicit=target.dtype is not None, allow_nonfinite=allow_nonfinite,
                                     allow_rounding=allow_rounding)
                reports, worker_notes = _write_share(team, source, target, output, share, values, full_precision,
                                                     stage.progress(progress, size))
                notes = _merged(notes, worker_notes)
                if team.rank == 0:
                    output.finish(reports)
                    for f in ([source] + held) if carried is not None else []:  # carried bytes copied while finishing
                        f.check_unchanged()
                    if given_staging() is not None:  # the --workers launcher reports them
                        write_text(stage.folder / NOTES, json.dumps(notes))
    finally:
        source.close()
        for f in held:
            f.close()
    return ConversionResult(
        src=src, dst=dst, src_format=source.format, dst_format=target.format_name, family=spec.mapping.family,
        layout=target.layout.describe() if target.kind == "mcore" else "-", dtype=dtype, tensors=len(planned),
        bytes=total, seconds=time.perf_counter() - start, notes=notes,
        leftovers=stage.leftovers, cleaned=stage.cleaned, restored=stage.restored,
    )


def _write_share(team: Team, source: Source, target: Target, output: Output, share: frozenset[str] | None,
                 values: ValueChecks, full_precision: set[str], progress: Progress) -> tuple[list[Any], tuple[str, ...]]:
    """Write this rank's data files (all of them: a team of one), then hear from every rank: what each
    reports for the finishing step, and the notes its value checks made (in rank order); a rank's
    failure stops all of them (nothing is installed)."""
    plan = output.plan

    def read_cast(pt: PlannedTensor) -> torch.Tensor:
        # a tensor to quantize is read in fp32: rounding it to --dtype first would lose the exact values
        return values.cast(pt, source.read(pt), torch.float32 if pt.mcore_name in full_precision else None)

    failure: Exception | None = None
    report = None
    try:
        # tensors whose bytes move unchanged: copied from the held source files, never read into memory
        mine = list({s.pt.mcore_name: s.pt for s in plan.mine(share)}.values())
        spans_of = fast_plan(source, target, mine, plan.dtype, plan.margs) if target.fast_copy and not full_precision else {}

        with SpanChecks(values) as checks:
            def fast(pt: PlannedTensor) -> Spans | None:
                spans = spans_of.get(pt.mcore_name)
                if spans is not None:
                    checks.submit(pt, spans)  # the checks a cast would make, on the mapped source bytes
                return spans

            with values.rounding(), closing(Prefetcher(plan.reads(share, spans_of), read_cast)) as read:  # in order
                report = output.write(read, fast, progress, share)
            checks.finish()  # every tensor checked (while the kernel copied it) before anything is installed
        source.check_unchanged()  # a source modified or replaced while it was read: nothing is installed
    except Exception as exc:  # told to the other ranks first, then raised here
        if team.size == 1:
            raise
        failure = exc
    outcomes = team.gather((f"{type(failure).__name__}: {failure}" if failure else None, report, values.notes()))
    if failure is not None:
        raise failure
    failed = [(rank, error) for rank, (error, _, _) in enumerate(outcomes) if error]
    if failed:
        raise WorkerError(f"worker {failed[0][0]} failed: {failed[0][1]} ({len(failed)} of {team.size} failed); "
                          "nothing was installed")
    return [r for _, r, _ in outcomes], tuple(n for _, _, notes in outcomes for n in notes)


NOTES = ".ckptbridge-notes.json"  # in the staging folder: worker 0's notes, for the --workers launcher


def _take_notes(folder: Path) -> tuple[str, ...]:
    """The notes the workers left in ``folder`` (removed: they are not part of the output)."""
    path = folder / NOTES
    if not path.is_file():
        raise WorkerError(f"{path}: the workers finished without reporting their notes; nothing was installed")
    notes = json.loads(path.read_text())
    path.unlink()
    return tuple(notes)


def _merged(*groups: tuple[str, ...]) -> tuple[str, ...]:
    """The notes of every group, each once, in order (every worker reports the source's own)."""
    return tuple(dict.fromkeys(n for group in groups for n in group))


@contextmanager
def _staging(team: Team, src: Path, dst: Path, force: bool, clean: bool, need: int) -> Iterator[Staging]:
    """The folder this rank writes into: the one a --workers launcher prepared, else rank 0's `staged`
    folder (its path shared with the other ranks; None tells them rank 0 could not prepare one)."""
    given = given_staging()
    if given is not None:
        if not (given / MARKER).is_file():
            raise WorkerError(f"{given}: not a staging folder ({STAGING_ENV} names where a launcher stages the output)")
        yield Staging(given, [], [], None)
        return
    if team.rank:
        folder = team.share(None)
        if folder is None:
            raise WorkerError("worker 0 could not prepare the destination (its error is above)")
        yield Staging(Path(folder), [], [], None)
        return
    shared = team.size == 1
    try:
        with staged(src, dst, force, clean, need) as stage:
            shared = True
            team.share(str(stage.folder))
            yield stage
    finally:
        if not shared:
            team.share(None)
