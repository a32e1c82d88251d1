"""Compare two checkpoints of the same model tensor by tensor, whatever their formats and layouts.

Memory stays bounded by the two tensors being compared: one canonical tensor of
each side is held at a time, equality is checked without a copy, and the
difference of unequal tensors is computed in float64 over chunks of at most
`CHUNK` elements, never over a whole tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CkptBridgeError
from .config_source import ConfigOptions, refuse_unused
from .formats.detect import open_source

CHUNK = 2**22  # elements per float64 difference block (32 MiB per temporary)


@dataclass(frozen=True)
class TensorDiff:
    name: str
    bit_exact: bool
    max_abs: float


def max_abs_diff(x: torch.Tensor, y: torch.Tensor, chunk: int = CHUNK) -> float:
    """``max |x - y|`` in float64, over blocks of leading-axis slices of at most ``chunk`` elements."""
    if x.dim() == 0:
        return float((x.double() - y.double()).abs())
    if x.numel() == 0:
        return 0.0
    row = x[0].numel()
    if row > chunk and x.dim() > 1:  # one slice is already too big: go one axis deeper
        return max(max_abs_diff(x[i], y[i], chunk) for i in range(x.shape[0]))
    step = max(1, chunk // max(row, 1))
    worst = 0.0
    for start in range(0, x.shape[0], step):
        a, b = x[start:start + step], y[start:start + step]
        worst = max(worst, float((a.double() - b.double()).abs().max()))
    return worst


def compare(a: Path, b: Path, config: ConfigOptions | None = None, iteration: int | None = None) -> list[TensorDiff]:
    """Canonical (global MCore) tensors of ``a`` and ``b``, compared pairwise in a common dtype; ``config`` and
    ``iteration`` apply to an MCore checkpoint among them (see `config_source`)."""
    sa = open_source(a, config=config, iteration=iteration)
    sb = open_source(b, config=config, iteration=iteration)
    try:
        refuse_unused(config, iteration, {a: sa, b: sb})
        sa.verify()
        sb.verify()
        pa, pb = sa.planned, sb.planned
        if [p.mcore_name for p in pa] != [p.mcore_name for p in pb] or [p.shape for p in pa] != [p.shape for p in pb]:
            raise CkptBridgeError(f"{a} and {b} are not the same model (tensor names or shapes differ)")
        # An MCore read may briefly hold a second copy (a chunk being assembled); an HF read of the
        # largest tensors (embedding, head) does not. Reading the MCore side first keeps that
        # transient copy out of the moment both tensors are held.
        first, second = (sb, sa) if sa.format == "hf" and sb.format != "hf" else (sa, sb)
        out = []
        for pt in pa:
            x = first.read(pt)
            y = second.read(pt)
            exact = x.dtype == y.dtype and torch.equal(x, y)
            out.append(TensorDiff(pt.mcore_name, exact, 0.0 if exact else max_abs_diff(x, y)))
            del x, y
        return out
    finally:
        sa.close()
        sb.close()
