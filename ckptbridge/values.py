"""Checks on each tensor's values as it streams through a conversion.

A conversion that exits 0 must not have changed a value silently: a NaN or Inf in the source is
reported (an error unless allowed: a model with one usually trained into divergence), a cast that
overflows (fp32 -> fp16 turns 1e6 into inf) is an error naming the tensor, and a source holding
tensors of several dtypes is not downcast to one without ``--dtype`` saying so. Each check is one
pass over a tensor that is in memory anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import PlanError
from .spec import PlannedTensor


@dataclass
class ValueChecks:
    """``cast(pt, tensor)``: the tensor in the output dtype, after the checks; ``nonfinite`` lists what an
    allowed NaN/Inf source held (tensor name, NaN count, Inf count) for the conversion's notes."""

    dtype: torch.dtype  # the conversion's dtype
    explicit: bool  # --dtype given: casting every tensor is what the user asked for
    allow_nonfinite: bool = False
    nonfinite: list[tuple[str, int, int]] = field(default_factory=list)

    def cast(self, pt: PlannedTensor, tensor: torch.Tensor, to: torch.dtype | None = None) -> torch.Tensor:
        """``to``: read at another dtype than the output's (a tensor an FP8 export quantizes stays fp32)."""
        want = to or pt.dtype(self.dtype)
        name = pt.hf_names[0] if pt.hf_names else pt.mcore
        if not self.explicit and to is None and pt.rule.dtype is None and tensor.dtype != want:
            raise PlanError(f"tensor {name!r} is {_name(tensor.dtype)} in the source, the model's others "
                            f"{_name(want)}: a mixed-dtype source is not cast silently; pass --dtype to choose")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
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

    def notes(self) -> tuple[str, ...]:
        return tuple(f"tensor {n!r} holds {a} NaN and {b} Inf values (converted as they are: --allow-nonfinite)"
                     for n, a, b in self.nonfinite)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
