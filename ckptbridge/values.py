"""Checks on each tensor's values as it streams through a conversion.

A conversion that exits 0 must not have changed a value silently: a NaN or Inf in the source is
reported (an error unless allowed: a model with one usually trained into divergence), a cast that
overflows (fp32 -> fp16 turns 1e6 into inf) is an error naming the tensor, and a source holding
tensors of several dtypes is not downcast to one without ``--dtype`` saying so, and a value-changing
mapping step that would round (``offset``) is an error unless ``--allow-rounding`` (then a note says how
much was rounded). Each check is one pass over a tensor that is in memory anyway.

A tensor copied inside the kernel (`fastcopy`) is never in our memory: its values are checked through a
read-only mapping of the source's page-cache bytes, on a worker thread (`SpanChecks`) while the kernel
copies the same bytes (both release the GIL), and every check has finished, its failure raised, before
the output can be installed.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .errors import PlanError
from .spec import PlannedTensor
from .transform_values import Rounded, rounding_allowed

if TYPE_CHECKING:
    from .fastcopy import Spans


@dataclass
class ValueChecks:
    """``cast(pt, tensor)``: the tensor in the output dtype, after the checks; ``nonfinite`` lists what an
    allowed NaN/Inf source held (tensor name, NaN count, Inf count) for the conversion's notes."""

    dtype: torch.dtype  # the conversion's dtype
    explicit: bool  # --dtype given: casting every tensor is what the user asked for
    allow_nonfinite: bool = False
    allow_rounding: bool = False  # --allow-rounding: an inexact offset step rounds, counted in ``rounded``
    nonfinite: list[tuple[str, int, int]] = field(default_factory=list)
    rounded: Rounded = field(default_factory=Rounded)

    def rounding(self) -> AbstractContextManager[object]:
        """Around the writing: where rounding is allowed, the mapping steps round and count into ``rounded``."""
        return rounding_allowed(self.rounded) if self.allow_rounding else nullcontext()

    def cast(self, pt: PlannedTensor, tensor: torch.Tensor, to: torch.dtype | None = None) -> torch.Tensor:
        """``to``: read at another dtype than the output's (a tensor an FP8 export quantizes stays fp32)."""
        want = to or pt.dtype(self.dtype)
        name = pt.hf_names[0] if pt.hf_names else pt.mcore_name
        if not self.explicit and to is None and pt.rule.dtype is None and tensor.dtype != want:
            raise PlanError(f"tensor {name!r} is {_name(tensor.dtype)} in the source, the model's others "
                            f"{_name(want)}: a mixed-dtype source is not cast silently; pass --dtype to choose")
        if tensor.is_floating_point() and not all_finite(tensor):
            nans, infs = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            if not self.allow_nonfinite:
                raise PlanError(f"tensor {name!r} holds {nans} NaN and {infs} Inf values in the source "
                                "(pass --allow-nonfinite to convert it anyway)")
            self.nonfinite.append((name, nans, infs))
            return tensor.to(want)
        out = tensor.to(want)
        if out.is_floating_point() and out.dtype != tensor.dtype and not bool(torch.isfinite(out).all()):
            peak = float(tensor.abs().max())
            raise PlanError(f"casting tensor {name!r} to {_name(want)} overflows (largest |value| {peak:.4g} > "
                            f"{torch.finfo(want).max:.4g}); choose another --dtype")
        return out

    def judge_spans(self, pt: PlannedTensor, bad: int) -> None:
        """The checks of `cast` for a tensor copied byte for byte (same dtype, no cast), given ``bad``, the
        NaN/Inf values `nonfinite_in_spans` counted in its source bytes (never copied into our memory)."""
        if not bad:
            return
        name = pt.hf_names[0] if pt.hf_names else pt.mcore_name
        if not self.allow_nonfinite:
            raise PlanError(f"tensor {name!r} holds {bad} NaN or Inf values in the source "
                            "(pass --allow-nonfinite to convert it anyway)")
        self.nonfinite.append((name, bad, 0))

    def notes(self) -> tuple[str, ...]:
        notes = [f"tensor {n!r} holds {a} NaN and {b} Inf values (converted as they are: --allow-nonfinite)"
                 for n, a, b in self.nonfinite]
        r = self.rounded
        if r.values:
            notes.append(f"{r.values} value(s) in {r.tensors} tensor(s) rounded by an offset step (largest change "
                         f"{r.max_error:.3g}; --allow-rounding)")
        return tuple(notes)


class SpanChecks:
    """`nonfinite_in_spans` on one worker thread, judged by `ValueChecks.judge_spans` in submission order,
    overlapping the kernel copy of the same bytes. Each `submit` first reports the checks finished so far (a failure stops the writing
    about where it would have stopped without the thread), `finish` waits for the rest and reports them;
    leaving the ``with`` block always waits for the thread, so no check maps a source file after it closes."""

    def __init__(self, values: ValueChecks):
        self.values = values
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptbridge-check")
        self._pending: deque[tuple[PlannedTensor, Future[int]]] = deque()

    def __enter__(self) -> "SpanChecks":
        return self

    def __exit__(self, *exc: object) -> None:
        for _, future in self._pending:
            future.cancel()
        wait_all([f for _, f in self._pending])
        self._pool.shutdown(wait=True)

    def submit(self, pt: PlannedTensor, spans: "Spans") -> None:
        self._report(block=False)
        self._pending.append((pt, self._pool.submit(nonfinite_in_spans, spans)))

    def finish(self) -> None:
        """Every submitted check done; the first failure (in submission order) raised."""
        self._report(block=True)

    def _report(self, block: bool) -> None:
        while self._pending and (block or self._pending[0][1].done()):
            pt, future = self._pending.popleft()
            self.values.judge_spans(pt, future.result())


def nonfinite_in_spans(spans: "Spans") -> int:
    """NaN/Inf values among the source bytes of ``spans`` (0 for a dtype without them; zero runs hold none)."""
    if not spans.dtype.is_floating_point:
        return 0
    return sum(_nonfinite_in_file(r.fd, r.offset, r.length, spans.dtype) for r in spans.source_runs())


_MINMAX = (torch.bfloat16, torch.float16, torch.float32, torch.float64)  # dtypes aminmax takes on CPU
_CHUNK = 2**26  # elements per pass: bounds the temporaries of a count


def all_finite(tensor: torch.Tensor) -> bool:
    """``torch.isfinite(tensor).all()`` by the smallest and largest value (NaN propagates through both, an
    Inf is one of them): one reduction without a temporary, 40x faster than ``isfinite`` on bf16 on CPU."""
    if tensor.numel() == 0:
        return True
    if tensor.dtype not in _MINMAX:
        return bool(torch.isfinite(tensor).all())
    lo, hi = torch.aminmax(tensor.reshape(-1))
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _count_nonfinite(tensor: torch.Tensor) -> int:
    """NaN and Inf values of ``tensor`` (0 after the quick `all_finite`), counted in passes of bounded memory."""
    if all_finite(tensor):
        return 0
    flat = tensor.reshape(-1)
    return sum(int((~torch.isfinite(flat[at:at + _CHUNK])).sum()) for at in range(0, flat.numel(), _CHUNK))


def _nonfinite_in_file(fd: int, offset: int, length: int, dtype: torch.dtype) -> int:
    """NaN/Inf values among ``length`` bytes at ``offset`` of ``fd``, read through a read-only mapping in windows
    (mapped pages count towards resident memory only while a window is mapped)."""
    import mmap
    import warnings

    bad = 0
    window = 256 * 2**20
    for at in range(offset, offset + length, window):
        n = min(window, offset + length - at)
        base = at - at % mmap.ALLOCATIONGRANULARITY
        with mmap.mmap(fd, n + at - base, prot=mmap.PROT_READ, offset=base) as m:
            with warnings.catch_warnings():  # read-only on purpose: the values are only looked at
                warnings.simplefilter("ignore", UserWarning)
                data = torch.frombuffer(m, dtype=torch.uint8, offset=at - base, count=n)
            bad += _count_nonfinite(data.view(dtype))
            del data
    return bad


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
