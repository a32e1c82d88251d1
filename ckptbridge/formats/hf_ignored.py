"""Proving that an HF tensor a mapping's ``ignore:`` rule names is redundant, before it is dropped.

``rope_inv_freq``: the stored rotary frequencies must be the ones the config implies, computed as
transformers computes the default rope (``1 / base ** (arange(0, dim, 2) / dim)`` in fp32), to within
one unit in the last place of the stored dtype (GPU and CPU ``pow`` may differ by that much).
``copy_of``: the tensor must equal its partner bit for bit; both are streamed in chunks, so a
stored head as large as the embedding costs no memory beyond a chunk.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import expr
from ..errors import PlanError
from ..mapping.ignore import IgnoreRule
from ..spec import ModelSpec, PlannedTensor
from .safetensors_io import SafetensorsFile, read_into

CHUNK_BYTES = 64 * 2**20


def planned_ignores(spec: ModelSpec, planned: Sequence[PlannedTensor]) -> dict[str, tuple[IgnoreRule, int | None]]:
    """Concrete droppable names of this model -> (rule, layer). A name that is also a planned weight
    (conflicting rules) is a mapping error, not something to guess about. ``planned``: the spec's
    planned tensors (the source's, planned once)."""
    out: dict[str, tuple[IgnoreRule, int | None]] = {}
    for rule in spec.mapping.ignore:
        if rule.applies(spec.args):
            out.update({name: (rule, layer) for name, layer in rule.names(spec.num_layers)})
    weights = {n for pt in planned for n in (*pt.hf_names, *pt.hf_copies)}
    both = sorted(set(out) & weights)
    if both:
        raise PlanError(f"{spec.mapping.source}: {both[0]!r} is both ignored and a weight under this config")
    return out


def rope_inv_freq(base: float, dim: int) -> torch.Tensor:
    """transformers' default-rope ``inv_freq`` (fp32)."""
    return 1.0 / (float(base) ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def verify_ignored(name: str, rule: IgnoreRule, layer: int | None, args: Mapping[str, Any],
                   files: Mapping[str, SafetensorsFile], where: Mapping[str, str], folder: Path) -> None:
    """Raise `PlanError` (naming tensor, file and the difference) unless ``name`` is redundant."""
    f = files[where[name]]
    at = f"{name!r} in {folder / where[name]}"
    if rule.check == "rope_inv_freq":
        base, dim = expr.evaluate(rule.base, args), int(expr.evaluate(rule.dim, args))
        stored = f.read(name)
        expected = rope_inv_freq(base, dim)
        if not stored.is_floating_point() or tuple(stored.shape) != tuple(expected.shape):
            raise PlanError(f"tensor {at} is a {stored.dtype} tensor of shape {list(stored.shape)}; the rotary "
                            f"inv_freq the config implies (base {base}, dim {dim}) is float of shape {list(expected.shape)}")
        ref = expected.to(stored.dtype).float()
        diff = (stored.float() - ref).abs()
        if not bool((diff <= torch.finfo(stored.dtype).eps * ref.abs()).all()):
            raise PlanError(f"tensor {at} differs from the rotary inv_freq the config implies (rope base {base}, "
                            f"dim {dim}): max abs diff {diff.max().item():.3g}; refusing to drop it")
        return
    partner = rule.partner(layer)
    if partner not in where:
        raise PlanError(f"tensor {at} must be a copy of {partner!r}, which the folder lacks")
    max_diff = _max_diff(f, name, files[where[partner]], partner)
    if max_diff is not None:
        raise PlanError(f"tensor {at} is not a bit-exact copy of {partner!r} ({max_diff}); "
                        f"MCore keeps one tensor for both, so the difference cannot be converted")


def _max_diff(fa: SafetensorsFile, a: str, fb: SafetensorsFile, b: str) -> str | None:
    """None when ``a`` and ``b`` hold the same bytes, dtype and shape; else what differs."""
    ea, eb = fa.entries[a], fb.entries[b]
    if ea.dtype != eb.dtype or ea.shape != eb.shape:
        return f"{ea.dtype} {list(ea.shape)} vs {eb.dtype} {list(eb.shape)}"
    worst, offset, differs = 0.0, 0, False
    step = max(ea.dtype.itemsize, CHUNK_BYTES - CHUNK_BYTES % ea.dtype.itemsize)
    while offset < ea.nbytes:
        n = min(step, ea.nbytes - offset)
        xa = read_into(fa.file.fd, ea.start + offset, n, f"{fa.path}: {a}")
        xb = read_into(fb.file.fd, eb.start + offset, n, f"{fb.path}: {b}")
        if not torch.equal(xa, xb):
            differs = True
            if ea.dtype.is_floating_point:
                worst = max(worst, (xa.view(ea.dtype).double() - xb.view(eb.dtype).double()).abs().max().item())
        offset += n
    return f"max abs diff {worst:.3g}" if differs else None
