"""Step ``roundtrip``: export each MCore checkpoint under test back to HF and compare it with the
source, tensor by tensor (:func:`ckptbridge.compare.compare`).

Bit-exact by default: a conversion that keeps the dtype moves bytes and must give them back
unchanged.  With ``convert.dtype`` casting, set ``bit_exact: false`` and a ``max_abs`` tolerance.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ...compare import TensorDiff, compare
from ...convert import Target, convert
from ...errors import CkptBridgeError
from ..config import MISSING, ConfigError, Section, SourceConfig
from ..context import Candidate, GateContext
from ..results import FAIL, PASS, SKIP, Check
from . import step


@dataclass(frozen=True)
class RoundtripOptions:
    bit_exact: bool = True
    max_abs: float | None = None  # the tolerance when not bit_exact


def parse(raw: Any, source: SourceConfig, enabled: dict[str, Any]) -> RoundtripOptions | None:
    """``false``, ``true`` (bit-exact) or ``{bit_exact, max_abs}``; left out: on when there is
    something to export (a conversion, or ``source.mcore``)."""
    has_input = "convert" in enabled or source.mcore is not None
    if raw is MISSING:
        return RoundtripOptions() if has_input else None
    if raw is False:
        return None
    if raw is True:
        opts = RoundtripOptions()
    else:
        s = Section(raw, "roundtrip")
        opts = RoundtripOptions(s.take("bit_exact", bool, True), s.take("max_abs", float, minimum=0.0, nullable=True))
        s.finish()
        if opts.bit_exact and opts.max_abs is not None:
            raise ConfigError("roundtrip.max_abs: a tolerance only applies with bit_exact: false")
        if not opts.bit_exact and opts.max_abs is None:
            raise ConfigError("roundtrip.max_abs: required with bit_exact: false (the largest allowed |difference|)")
    if not has_input:
        raise ConfigError("roundtrip: nothing to export (convert is false and there is no source.mcore)")
    return opts


def _verdict(diffs: list[TensorDiff], opts: RoundtripOptions) -> tuple[bool, str, float, float]:
    """(passed, message, value, limit) for one export compared with the source."""
    if opts.bit_exact:
        bad = [d for d in diffs if not d.bit_exact]
        if not bad:
            return True, f"{len(diffs)}/{len(diffs)} tensors bit-identical to the source", 0.0, 0.0
        named = ", ".join(f"{d.name} (max abs {d.max_abs:.3g})" for d in bad[:3]) + (" ..." if len(bad) > 3 else "")
        return False, f"{len(bad)} of {len(diffs)} tensors differ from the source (limit: bit-identical): {named}", float(len(bad)), 0.0
    assert opts.max_abs is not None
    worst = max(diffs, key=lambda d: d.max_abs)
    ok = worst.max_abs <= opts.max_abs
    return ok, f"max abs {worst.max_abs:.6g} (limit <= {opts.max_abs:g}) over {len(diffs)} tensors, worst {worst.name}", \
        worst.max_abs, opts.max_abs


def _one(ctx: GateContext, cand: Candidate, opts: RoundtripOptions) -> Check:
    if cand.path is None:
        return Check("roundtrip", cand.label, SKIP, f"no checkpoint to export (convert failed: {cand.error})")
    export = ctx.work / f"hf-roundtrip-{cand.label}"
    start = time.perf_counter()
    try:
        convert(cand.path, export, "mcore", Target("hf"), force=True)
        diffs = compare(ctx.hf, export)
    except CkptBridgeError as exc:
        return Check("roundtrip", cand.label, FAIL, f"MCore -> HF -> compare failed: {exc}")
    ok, message, value, limit = _verdict(diffs, opts)
    return Check("roundtrip", cand.label, PASS if ok else FAIL, message, value, limit,
                 seconds=time.perf_counter() - start)


@step("roundtrip", parse)
def run(ctx: GateContext, opts: RoundtripOptions) -> list[Check]:
    return [_one(ctx, cand, opts) for cand in ctx.candidates]
