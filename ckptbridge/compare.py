"""Compare two checkpoints of the same model tensor by tensor, whatever their formats and layouts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CkptBridgeError
from .config_source import ConfigOptions, refuse_unused
from .formats.detect import open_source


@dataclass(frozen=True)
class TensorDiff:
    name: str
    bit_exact: bool
    max_abs: float


def compare(a: Path, b: Path, config: ConfigOptions | None = None, iteration: int | None = None) -> list[TensorDiff]:
    """Canonical (global MCore) tensors of ``a`` and ``b``, compared pairwise in a common dtype; ``config`` and
    ``iteration`` apply to an MCore checkpoint among them (see `config_source`)."""
    sa = open_source(a, config=config, iteration=iteration)
    sb = open_source(b, config=config, iteration=iteration)
    try:
        refuse_unused(config, iteration, {a: sa, b: sb})
        sa.verify()
        sb.verify()
        pa, pb = sa.spec.planned(), sb.spec.planned()
        if [p.mcore for p in pa] != [p.mcore for p in pb] or [p.shape for p in pa] != [p.shape for p in pb]:
            raise CkptBridgeError(f"{a} and {b} are not the same model (tensor names or shapes differ)")
        out = []
        for pt in pa:
            x, y = sa.read(pt), sb.read(pt)
            exact = x.dtype == y.dtype and torch.equal(x, y)
            diff = 0.0 if exact else float((x.double() - y.double()).abs().max())
            out.append(TensorDiff(pt.mcore, exact, diff))
        return out
    finally:
        sa.close()
        sb.close()
