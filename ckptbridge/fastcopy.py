"""Tensors that move unchanged: their bytes as runs of held source files, copied inside the kernel.

Most bytes of a conversion are not transformed: at TP 1 every tensor is a sequence of contiguous byte
ranges of the source (the QKV interleave moves row blocks per query group, ``[gate; up]`` is two row
blocks), and a column-parallel shard is a contiguous row range at any TP. Such a tensor is described
as `Spans` (runs of ``(held fd, offset, length)``, or zeros for vocabulary padding) and copied with
``copy_file_range`` from the held descriptor into the destination's data region
(`fileio.copy_range_all`, which falls back to pread/pwrite where the kernel refuses).

Which rows come from where is computed, not declared per operation: the rule's steps run on small
int64 tensors of row numbers (the last dimension shrunk to 1), which any step that only moves rows
(concat/split on dim 0, interleave, take_expert) permutes exactly as it would the real rows. A step
that touches values (scale), the last dimension or the layout of a row (transpose, reshape) is not
on the allow-list, and its tensor goes through user space as before.

A tensor whose TP shards split dimension 1 (a row-parallel weight read from an MCore checkpoint) is one
`Columns` element: each shard is contiguous in its file, and the tensor's rows take the next row of every
shard in turn. It is written by ``pwritev`` from read-only mappings of the shards, a window of rows at a
time, never as a `Run` per row (a Llama-3.1-8B-shaped model at TP 2 has 262,000 such rows: a Python object
and a check each cost what the copy saved).
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .errors import MappingError
from .fileio import WriteError, copy_range_all, pwrite_all, pwritev_all
from .transform_layout import Concat, Identity, Interleave, Split, TakeExpert
from .transform_op import Op

Shape = tuple[int, ...]
UnitRun = tuple[int, int, int]  # (input index, first unit, units)


@dataclass(frozen=True)
class Run:
    """``length`` bytes at ``offset`` of the held source ``fd``; ``fd`` None: that many zero bytes."""

    fd: int | None
    offset: int
    length: int


@dataclass(frozen=True)
class Columns:
    """``rows`` rows, each the next row of every part in turn: column blocks side by side (see the module
    docstring). Each part is ``rows`` rows of ``part.length // rows`` bytes, contiguous in its held file."""

    parts: tuple[Run, ...]
    rows: int

    @property
    def length(self) -> int:
        return sum(p.length for p in self.parts)

    @property
    def widths(self) -> list[int]:
        """Each part's bytes in a row."""
        return [p.length // self.rows for p in self.parts]

    def row_runs(self) -> list[Run]:
        """The same bytes as a `Run` per row and part (for a cut that splits rows: rare, and slow)."""
        parts = list(zip(self.parts, self.widths))
        return [Run(p.fd, p.offset + i * w, w) for i in range(self.rows) for p, w in parts]

    def row_range(self, first: int, count: int) -> "Columns":
        """Rows ``[first, first + count)``: each part's rows are contiguous, so still one `Columns`."""
        return Columns(tuple(Run(p.fd, p.offset + first * w, count * w) for p, w in zip(self.parts, self.widths)), count)

    def columns(self, lo: int, hi: int) -> list[Piece]:
        """Bytes ``[lo, hi)`` of every row: the parts it covers whole, as one `Columns` (a single part: its
        run), when it starts and ends at part boundaries (an MCore writer taking the same TP split); else a
        run per row and part it touches (gathered when written, like any row-parallel shard)."""
        widths, bounds, at = self.widths, [], 0
        for w in widths:
            bounds.append((at, at + w))
            at += w
        whole = [i for i, (a, b) in enumerate(bounds) if lo <= a and b <= hi]
        if whole and bounds[whole[0]][0] == lo and bounds[whole[-1]][1] == hi:
            picked = tuple(self.parts[i] for i in whole)
            return [picked[0]] if len(picked) == 1 else [Columns(picked, self.rows)]
        touched = [(p, w, max(a, lo) - a, min(b, hi) - max(a, lo))  # (part, width, first byte, bytes) of a row
                   for p, w, (a, b) in zip(self.parts, widths, bounds) if max(a, lo) < min(b, hi)]
        out: list[Piece] = []
        for i in range(self.rows):
            for p, w, skip, n in touched:
                _append(out, Run(p.fd, p.offset + i * w + skip, n))
        return out


Piece = Run | Columns


@dataclass(frozen=True)
class Spans:
    """One tensor's bytes, in C order, as runs of source bytes."""

    runs: tuple[Piece, ...]
    dtype: torch.dtype
    shape: Shape

    @property
    def interleaved(self) -> bool:
        """Whether a `Columns` element is among the runs."""
        return any(isinstance(r, Columns) for r in self.runs)

    def source_runs(self) -> list[Run]:
        """Every held-file run the bytes come from, a `Columns` element's parts whole (order aside: what the
        value checks read)."""
        return [p for r in self.runs for p in (r.parts if isinstance(r, Columns) else (r,)) if p.fd is not None]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize if self.shape else self.dtype.itemsize

    def cut(self, start: int, length: int) -> tuple[Piece, ...]:
        """The runs of bytes ``[start, start + length)``."""
        out: list[Piece] = []
        pos, end = 0, start + length
        for r in self.runs:
            lo, hi = max(start, pos), min(end, pos + r.length)
            if lo < hi and isinstance(r, Columns):
                rb = sum(r.widths)
                if (lo, hi) == (pos, pos + r.length):
                    out.append(r)
                elif (lo - pos) % rb == 0 and (hi - pos) % rb == 0:  # whole rows (a pipeline stage's layers...)
                    out.append(r.row_range((lo - pos) // rb, (hi - lo) // rb))
                else:
                    out.extend(Spans(tuple(r.row_runs()), self.dtype, (r.length,)).cut(lo - pos, hi - lo))
            elif lo < hi:
                out.append(Run(r.fd, r.offset + lo - pos, hi - lo) if r.fd is not None else Run(None, 0, hi - lo))
            pos += r.length
            if pos >= end:
                break
        return tuple(out)

    def rows(self, start: int, count: int) -> "Spans":
        rb = self.row_bytes
        return Spans(self.cut(start * rb, count * rb), self.dtype, (count, *self.shape[1:]))

    def regions(self, axis: int, regions: Sequence[tuple[int, int]]) -> "Spans":
        """The ``(start, length)`` regions along ``axis``, back to back: `sharding.split`'s shard of this
        tensor. Along dimension 0 a few row runs; along a later one, a run per region of every slice of the
        dimensions before it (a row-parallel shard is a strided column block: one short copy a row)."""
        shape = list(self.shape)
        shape[axis] = sum(length for _, length in regions)
        if axis == 0:
            return Spans(tuple(r for start, length in regions for r in self.rows(start, length).runs), self.dtype,
                         tuple(shape))
        inner = math.prod(self.shape[axis + 1:]) * self.dtype.itemsize
        stride = self.shape[axis] * inner
        out: list[Piece] = []
        if self.interleaved:  # an MCore source's row-parallel tensor, split along its columns again
            return self._column_regions(axis, regions, inner, tuple(shape))
        if len(self.runs) == 1 and isinstance(self.runs[0], Run) and self.runs[0].fd is not None:  # one stretch (usual)
            fd, first = self.runs[0].fd, self.runs[0].offset
            for at in range(first, first + self.nbytes, stride):
                for start, length in regions:
                    _append(out, Run(fd, at + start * inner, length * inner))
            return Spans(tuple(out), self.dtype, tuple(shape))
        for at in range(0, self.nbytes, stride):
            for start, length in regions:
                for r in self.cut(at + start * inner, length * inner):
                    _append(out, r)
        return Spans(tuple(out), self.dtype, tuple(shape))

    def _column_regions(self, axis: int, regions: Sequence[tuple[int, int]], inner: int, shape: Shape) -> "Spans":
        """`regions` of a tensor held as one `Columns` (else as its runs of rows, the slow way)."""
        (c,) = self.runs if len(self.runs) == 1 and axis == 1 else (None,)
        if not isinstance(c, Columns):
            flat = Spans(tuple(r for p in self.runs for r in (p.row_runs() if isinstance(p, Columns) else (p,))),
                         self.dtype, self.shape)
            return flat.regions(axis, regions)
        if len(regions) == 1:
            (start, length), = regions
            return Spans(tuple(c.columns(start * inner, (start + length) * inner)), self.dtype, shape)
        out: list[Piece] = []
        for i in range(c.rows):  # several regions a row: each row's pieces in region order
            row = c.row_range(i, 1)
            for start, length in regions:
                for r in row.columns(start * inner, (start + length) * inner):
                    _append(out, r)
        return Spans(tuple(out), self.dtype, shape)

    def padded(self, rows: int) -> "Spans":
        """Zero rows appended up to ``rows`` (MCore's vocabulary padding)."""
        if rows == self.shape[0]:
            return self
        return Spans((*self.runs, Run(None, 0, (rows - self.shape[0]) * self.row_bytes)), self.dtype,
                     (rows, *self.shape[1:]))


def _row_moving(step: Op) -> bool:
    if isinstance(step, (Concat, Split)):
        return step.dim == 0
    return isinstance(step, (Identity, Interleave, TakeExpert))


def row_moving(steps: Sequence[Op]) -> bool:
    """Whether every step only moves whole rows (its output bytes are runs of its input bytes)."""
    return all(_row_moving(s) for s in steps)


def unit_runs(fn: Callable[[list[torch.Tensor]], list[torch.Tensor]], in_shapes: Sequence[Shape]
              ) -> tuple[list[list[UnitRun]], list[int]] | None:
    """Per output of ``fn`` (a row-moving function), its runs of input units, and each input's unit size
    in elements (a last-dimension row, or one element of a 1-D tensor); None when ``fn`` does more than
    move rows (its outputs lose the shrunk last dimension) or refuses the shapes."""
    if not in_shapes or len({len(s) for s in in_shapes}) != 1 or not in_shapes[0]:
        return None
    nd = len(in_shapes[0])
    small = [tuple(s[:-1]) + (1,) if nd > 1 else tuple(s) for s in in_shapes]
    units = [s[-1] if nd > 1 else 1 for s in in_shapes]
    if len(set(units)) != 1:
        return None
    starts, xs, base = [], [], 0
    for s in small:
        n = math.prod(s)
        starts.append(base)
        xs.append(torch.arange(base, base + n, dtype=torch.int64).reshape(s))
        base += n
    try:
        ys = fn(xs)
    except (MappingError, RuntimeError, IndexError, ValueError):
        return None
    bounds = torch.tensor(starts[1:] + [base], dtype=torch.int64)
    out = []
    for y in ys:
        if y.dim() < 1 or (nd > 1 and y.shape[-1] != 1):
            return None
        ids = y.reshape(-1)
        if ids.numel() == 0:
            out.append([])
            continue
        owner = torch.bucketize(ids, bounds, right=True)
        brk = ((ids[1:] - ids[:-1]) != 1) | (owner[1:] != owner[:-1])
        edges = [0, *(torch.nonzero(brk).reshape(-1) + 1).tolist(), ids.numel()]
        first, own = ids.tolist(), owner.tolist()
        out.append([(own[a], first[a] - starts[own[a]], b - a) for a, b in zip(edges[:-1], edges[1:])])
    return out, units


def compose(inputs: Sequence[Spans], runs: list[UnitRun], unit: int, dtype: torch.dtype, shape: Shape) -> Spans:
    """The output whose bytes are ``runs`` of ``inputs`` (units of ``unit`` elements)."""
    ub = unit * dtype.itemsize
    out: list[Piece] = []
    for i, first, count in runs:
        for r in inputs[i].cut(first * ub, count * ub):
            _append(out, r)
    return Spans(tuple(out), dtype, tuple(shape))


def _append(out: list[Piece], r: Piece) -> None:
    last = out[-1] if out else None
    if isinstance(r, Run) and isinstance(last, Run) and r.fd is not None and last.fd == r.fd \
            and last.offset + last.length == r.offset:
        out[-1] = Run(r.fd, out[-1].offset, out[-1].length + r.length)  # adjacent in the file: one copy
    else:
        out.append(r)


def small_shape(shape: Shape) -> Shape:
    """``shape`` with its last dimension shrunk to 1 (1-D shapes unchanged): what `unit_runs` feeds ``fn``."""
    return tuple(shape[:-1]) + (1,) if len(shape) > 1 else tuple(shape)


_ZEROS = 16 * 2**20
#: a source run shorter than this is gathered with its neighbours into one ``pwritev`` from a read-only
#: mapping of the source (one system call per IOV_MAX runs) rather than copied by a ``copy_file_range`` of
#: its own: a row-parallel shard is one short run per row (a Llama-3.1-8B-shaped model split at TP 2 is
#: 262,000 of them), and a call per run cost more than the bytes (8.46 GiB to legacy TP2 x PP2: 9.6 s in
#: 262,690 calls)
_SHORT = 2**20
#: the most source bytes one mapping spans: mapped pages count towards resident memory while mapped
_WINDOW = 64 * 2**20


def write_spans(spans: Spans, dst_fd: int, dst_offset: int, path, fast: bool = True) -> int:
    """Write the bytes of ``spans`` at ``dst_offset`` of ``dst_fd`` (the file at ``path``): source runs copied
    inside the kernel when ``fast`` (short ones gathered from a mapping of the source, see `_SHORT`, and so are
    `Columns`; else through a buffer), zero runs written; returns the bytes written."""
    pos = dst_offset
    batch = _Batch()
    for r in spans.runs:
        if fast and isinstance(r, Run) and r.fd is not None and r.length < _SHORT:
            if not batch.takes(r):
                pos += batch.write(dst_fd, pos, path)
                batch = _Batch()
                batch.takes(r)
            continue
        pos += batch.write(dst_fd, pos, path)
        batch = _Batch()
        if isinstance(r, Columns):
            pos += _write_columns(r, dst_fd, pos, path, fast)
            continue
        if r.fd is None:
            zeros = bytes(min(_ZEROS, r.length))
            for at in range(0, r.length, _ZEROS):
                pwrite_all(dst_fd, memoryview(zeros)[:min(_ZEROS, r.length - at)], pos + at, path)
        else:
            copy_range_all(r.fd, r.offset, dst_fd, pos, r.length, path, fast)
        pos += r.length
    pos += batch.write(dst_fd, pos, path)
    return pos - dst_offset


def _write_columns(c: Columns, dst_fd: int, dst_offset: int, path, fast: bool) -> int:
    """Write ``c``'s rows at ``dst_offset``, a window of rows at a time (at most `_WINDOW` source bytes mapped
    or read): gathered by ``pwritev`` from read-only mappings of its parts (`_mapped`) when ``fast``, else read
    into a buffer. A part that ends early (truncated behind our back) is a `WriteError`."""
    widths = c.widths
    step = max(1, _WINDOW // max(1, sum(widths)))
    pos = dst_offset
    for first in range(0, c.rows, step):
        rows = min(step, c.rows - first)
        if not fast:
            blocks = [os.pread(p.fd, rows * w, p.offset + first * w) for p, w in zip(c.parts, widths)]
            if any(len(b) != rows * w for b, w in zip(blocks, widths)):
                raise WriteError(path, "the source ended before the bytes to copy", False)
            data = b"".join(b[i * w:(i + 1) * w] for i in range(rows) for b, w in zip(blocks, widths))
            pos += pwrite_all(dst_fd, data, pos, path)
            continue
        with contextlib.ExitStack() as maps:
            views = [maps.enter_context(_mapped(p.fd, p.offset + first * w, p.offset + (first + rows) * w, path))
                     for p, w in zip(c.parts, widths)]
            pos += _write_pieces(dst_fd, [v[i * w:(i + 1) * w] for i in range(rows) for v, w in zip(views, widths)],
                                 pos, path)
    return pos - dst_offset


@contextlib.contextmanager
def _mapped(fd: int, start: int, end: int, path) -> Iterator[memoryview]:
    """Bytes ``[start, end)`` of the held source ``fd`` through a read-only mapping. A source shorter than
    ``end`` (truncated behind our back) is a `WriteError` before anything is mapped: reading a mapped page
    past the end of a file would kill the process. Views cut from it must be released before it closes
    (`_write_pieces` does)."""
    if os.fstat(fd).st_size < end:
        raise WriteError(path, f"the source ended before byte {end} of the bytes to copy", False)
    base = start - start % mmap.ALLOCATIONGRANULARITY
    with mmap.mmap(fd, end - base, prot=mmap.PROT_READ, offset=base) as mapping:
        view = memoryview(mapping)[start - base:]
        try:
            yield view
        finally:
            view.release()


def _write_pieces(dst_fd: int, pieces: list[memoryview], dst_offset: int, path) -> int:
    """`pwritev_all` of views into mappings, each released afterwards, whatever happens (a mapping with a
    view still open cannot close)."""
    try:
        return pwritev_all(dst_fd, pieces, dst_offset, path)
    finally:
        for piece in pieces:
            piece.release()


class _Batch:
    """Short runs of one source file, in order, within `_WINDOW` bytes of the first: written together by
    one read-only mapping of the source and ``pwritev`` (the kernel copies each byte once, as
    ``copy_file_range`` would)."""

    def __init__(self) -> None:
        self.runs: list[Run] = []
        self.end = 0

    def takes(self, r: Run) -> bool:
        """Add ``r`` if it shares the mapping (same file, not before the first run, window not exceeded)."""
        if self.runs:
            first = self.runs[0]
            if r.fd != first.fd or r.offset < first.offset or max(self.end, r.offset + r.length) - first.offset > _WINDOW:
                return False
        self.runs.append(r)
        self.end = max(self.end, r.offset + r.length)
        return True

    def write(self, dst_fd: int, dst_offset: int, path) -> int:
        """Write the runs back to back at ``dst_offset``; returns the bytes written (0 for no runs). A source
        shorter than the runs is a `WriteError` before anything is mapped, as a short copy is."""
        if len(self.runs) <= 1:
            for r in self.runs:
                copy_range_all(r.fd, r.offset, dst_fd, dst_offset, r.length, path)
            return sum(r.length for r in self.runs)
        start = self.runs[0].offset
        with _mapped(self.runs[0].fd, start, self.end, path) as view:
            return _write_pieces(dst_fd, [view[r.offset - start:r.offset - start + r.length] for r in self.runs],
                                 dst_offset, path)


def hf_spans(pt, spans: Spans, cfg) -> list[Spans] | None:
    """The HF tensors of ``pt`` (a `spec.PlannedTensor`) as runs of its canonical tensor's ``spans``, when
    the rule's steps only move rows; None otherwise."""
    transform = pt.rule.transform
    if not row_moving(transform.steps) or any(isinstance(s, TakeExpert) for s in transform.steps):
        return None
    small = [small_shape(s) for s in pt.hf_shapes]
    found = unit_runs(lambda xs: transform.to_hf(xs[0], cfg, small), [tuple(spans.shape)])
    if found is None:
        return None
    runs, units = found
    return [compose([spans], r, units[0], spans.dtype, tuple(shape)) for r, shape in zip(runs, pt.hf_shapes)]
