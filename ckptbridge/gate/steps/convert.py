"""Step ``convert``: HF -> MCore at each configured layout, one check per layout.

A conversion that the converter refuses (an unmapped, missing, misshapen or truncated tensor, a
layout that does not fit) is a failed check carrying the converter's own message, which names
the file or tensor; the other layouts still run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...convert import Target, convert
from ...errors import CkptBridgeError
from ...dtypes import SHORT_NAMES
from ...layout import DEFAULT_VOCAB_DIVISIBLE_BY, ParallelLayout
from ..config import MISSING, ConfigError, Section, SourceConfig
from ..context import Candidate, GateContext
from ..results import FAIL, PASS, Check
from . import step

DTYPES = SHORT_NAMES


@dataclass(frozen=True)
class Layout:
    """One MCore output to make: a ``ckptbridge convert --dst mcore`` invocation as data."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    pp_first: int | None = None
    pp_last: int | None = None
    ep: int = 1
    etp: int | None = None
    format: str = "torch_dist"
    layer_spec: str = "te"  # the YAML key `spec`: te or local
    dtype: str | None = None  # None: keep the source dtype
    vocab_divisible_by: int = DEFAULT_VOCAB_DIVISIBLE_BY
    moe_grouped_gemm: bool = False

    @property
    def label(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}"]
        parts += [f"vpp{self.vpp}"] if self.vpp else []
        parts += [f"ppfirst{self.pp_first}"] if self.pp_first else []
        parts += [f"pplast{self.pp_last}"] if self.pp_last else []
        parts += [f"ep{self.ep}"] if self.ep > 1 else []
        parts += [f"etp{self.etp}"] if self.etp is not None else []
        parts += [self.format] + ([self.layer_spec] if self.layer_spec != "te" else []) + ([self.dtype] if self.dtype else [])
        return "-".join(parts)

    def target(self) -> Target:
        layout = ParallelLayout(self.tp, self.pp, self.vpp, self.pp_first, self.pp_last, self.ep, self.etp)
        return Target("mcore", layout, self.format, self.layer_spec, DTYPES[self.dtype] if self.dtype else None,
                      self.vocab_divisible_by, self.moe_grouped_gemm)


def _layout(raw: Any, where: str) -> Layout:
    s = Section(raw, where)
    layout = Layout(
        tp=s.take("tp", int, 1, minimum=1), pp=s.take("pp", int, 1, minimum=1),
        vpp=s.take("vpp", int, minimum=1, nullable=True), pp_first=s.take("pp_first", int, minimum=1, nullable=True),
        pp_last=s.take("pp_last", int, minimum=1, nullable=True), ep=s.take("ep", int, 1, minimum=1),
        etp=s.take("etp", int, minimum=1, nullable=True),
        format=s.take("format", str, "torch_dist", choices=("torch_dist", "torch")),
        layer_spec=s.take("spec", str, "te", choices=("te", "local")),
        dtype=s.take("dtype", str, choices=tuple(DTYPES), nullable=True),
        vocab_divisible_by=s.take("vocab_divisible_by", int, DEFAULT_VOCAB_DIVISIBLE_BY, minimum=1),
        moe_grouped_gemm=s.take("moe_grouped_gemm", bool, False),
    )
    s.finish()
    try:
        layout.target()  # ParallelLayout's own checks (vpp needs pp >= 2, ...) are config errors
    except CkptBridgeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return layout


def parse(raw: Any, source: SourceConfig, enabled: dict[str, Any]) -> list[Layout] | None:
    """A mapping (one layout), a list of mappings, ``true`` (the default layout) or ``false``.  Left out: TP1 PP1 torch_dist,
    except with ``source.mcore``, where the checkpoint under test is given and nothing is converted."""
    if raw is MISSING:
        return None if source.mcore is not None else [Layout()]
    if raw is False:
        return None
    if source.mcore is not None:
        raise ConfigError("convert: source.mcore is the checkpoint under test, so nothing is converted; remove `convert` or set it to false")
    if raw is True:
        return [Layout()]
    if isinstance(raw, list):
        if not raw:
            raise ConfigError("convert: an empty list; give at least one layout, or `convert: false`")
        layouts = [_layout(item, f"convert[{i}]") for i, item in enumerate(raw)]
    else:
        layouts = [_layout(raw, "convert")]
    labels = [lay.label for lay in layouts]
    dup = next((lab for lab in labels if labels.count(lab) > 1), None)
    if dup:
        raise ConfigError(f"convert: layout {dup} is listed twice")
    return layouts


@step("convert", parse)
def run(ctx: GateContext, layouts: list[Layout]) -> list[Check]:
    checks = []
    for lay in layouts:
        dst = ctx.work / f"mcore-{lay.label}"
        try:
            res = convert(ctx.hf, dst, "hf", lay.target(), force=True)
        except CkptBridgeError as exc:
            ctx.candidates.append(Candidate(lay.label, None, lay.format, error=str(exc)))
            checks.append(Check("convert", lay.label, FAIL, f"conversion failed: {exc}"))
            continue
        ctx.candidates.append(Candidate(lay.label, dst, lay.format, res.dtype))
        checks.append(Check("convert", lay.label, PASS,
                            f"{res.tensors} tensors, {res.bytes / 2**20:.1f} MiB, {str(res.dtype).replace('torch.', '')}, "
                            f"{res.layout}", seconds=res.seconds))
    return checks
