"""Shared steps of the per-architecture tests (tests/test_arch_<family>.py): the round trip at the standard layouts,
the megatron-core load at another layout than written, and ``align`` on the preset, optionally with a mapping
folder that replaces the family's file (the architecture's signature bug, which must fail the gate)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from ckptbridge.cli import main
from ckptbridge.harness.checkpoint_args import checkpoint_args
from ckptbridge.formats.legacy import FILE, rank_dir_name
from ckptbridge.formats.mcore_common import safe_load
from ckptbridge.layout import ParallelLayout
from ckptbridge.mapping.registry import ENV_VAR, MappingRegistry, default_registry, mappings_dir
from ckptbridge.mcore import model as mm
from helpers import assert_bit_exact, hf_config, hf_tensors, to_hf, to_mcore
from mcore_runner import run_distributed

ATOL = 1e-4
#: the layouts every architecture round-trips at (tp, pp)
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def round_trip(src: Path, work: Path, fmt: str, tp: int, pp: int, **layout: int) -> Path:
    """HF -> MCore at the layout -> HF; asserts the tensors and the config come back bit-exactly."""
    mcore = to_mcore(src, work / "mcore", fmt, tp=tp, pp=pp, **layout)
    back = to_hf(mcore, work / "hf")
    assert_bit_exact(hf_tensors(src), hf_tensors(back))
    assert hf_config(back) == hf_config(src)
    return mcore


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(tokens).logits


def megatron_logits(rank: int, world: int, iter_dir: str, tp: int, tokens: torch.Tensor,
                    arg_changes: dict) -> torch.Tensor | None:
    """Logits of megatron-core's GPTModel built from the checkpoint's own args at TP ``tp`` (PP 1, experts: EP 1 and
    expert TP ``tp``, whatever was written), loaded from its torch_dist files; ``arg_changes`` set args first (to
    show a setting matters). Runs in a worker."""
    args = checkpoint_args(iter_dir, tp, 1, 1, tp)  # the written layout (EP, expert TP) must not leak into the load
    for key, value in arg_changes.items():
        setattr(args, key, value)
    mm.init_parallel(tp, 1, seed=100 + rank, ep=1, etp=tp)
    models = mm.build_gpt_model(args, dtype=torch.float32)
    mm.load_torch_dist(models, iter_dir)
    return mm.forward_logits(models, tokens, vocab_size=args.vocab_size)


def assert_megatron_matches_hf(src: Path, work: Path, tokens: torch.Tensor, **written: int) -> Path:
    """Write torch_dist at TP2xPP2 (or ``written``), load it into megatron-core's GPTModel at TP2 and at TP1 (other
    layouts than written): fp32 logits within `ATOL` of HF's. Returns the checkpoint's iteration folder."""
    iter_dir = to_mcore(src, work / "mcore", "torch_dist", **(written or dict(tp=2, pp=2))) / "release"
    expected = hf_logits(src, tokens)
    for tp in (2, 1):
        for logits in run_distributed(megatron_logits, tp, str(iter_dir), tp, tokens, {}, timeout=180):
            assert (logits - expected).abs().max() <= ATOL, (tp, float((logits - expected).abs().max()))
    return iter_dir


def legacy_logits(rank: int, world: int, iter_dir: str, tokens: torch.Tensor) -> torch.Tensor | None:
    """Logits of megatron-core's GPTModel of the legacy checkpoint's own args and layout, each rank loading its own
    file (TE or local names, as written). Runs in a worker, one per rank of the written layout."""
    args = next(safe_load(sub / FILE, map_location="meta")["args"] for sub in sorted(Path(iter_dir).iterdir())
                if sub.name.startswith("mp_rank_"))
    layout = ParallelLayout.from_args(vars(args))
    mm.init_parallel(layout.tp, layout.pp, layout.vpp, seed=100 + rank, ep=layout.ep, etp=layout.etp)
    state = safe_load(Path(iter_dir) / rank_dir_name(rank % layout.tp, rank // layout.tp, layout) / FILE)
    models = mm.build_gpt_model(args, dtype=torch.float32)
    mm.load_legacy_rank(models, state)
    return mm.forward_logits(models, tokens, vocab_size=args.vocab_size)


def assert_legacy_matches_hf(src: Path, work: Path, tokens: torch.Tensor, spec: str, tp: int = 2) -> float:
    """Write the legacy format at TP ``tp`` with ``spec``'s names, load it rank by rank into megatron-core's GPTModel:
    fp32 logits within `ATOL` of HF's. Returns the largest difference."""
    mcore = to_mcore(src, work / f"legacy-{spec}", "torch", tp=tp, spec=spec)
    expected = hf_logits(src, tokens)
    got = [x for x in run_distributed(legacy_logits, tp, str(mcore / "release"), tokens, timeout=180) if x is not None]
    assert got
    err = max(float((logits - expected).abs().max()) for logits in got)
    assert err <= ATOL, (spec, err)
    return err


def assert_align_gate_passes(preset: str, out: Path, probes: int = 3) -> None:
    """``align`` on the preset passes its default gate, including every long-position probe (``probes`` of them:
    three below a 32k+ context, fewer for a shorter one)."""
    code, output, summary = align_preset(preset, out)
    assert code == 0 and "gate: passed" in output, output
    found = probe_max_abs(summary)
    assert len(found) == probes and all(v <= ATOL for v in found.values()), found

def assert_broken_mapping_fails_gate(preset: str, family: str, work: Path, old: str, new: str) -> None:
    """The family's file with ``old`` replaced by ``new`` (a signature bug) fails ``align``'s logits gate."""
    code, output, _ = align_preset(preset, work / "out", broken_copy(family, work / "maps", old, new))
    assert code != 0 and "FAIL propagated.logits.max_abs" in output, output


def align_preset(preset: str, out: Path, mappings: Path | None = None) -> tuple[int, str, dict]:
    """``ckptbridge [--mappings DIR] align --model PRESET --random-init --layers 2 --shrink``: exit code, output
    and summary.json (empty when none was written)."""
    extra = ["--mappings", str(mappings)] if mappings else []
    r = CliRunner().invoke(main, [*extra, "align", "--model", preset, "--random-init", "--layers", "2", "--shrink",
                                  "--out", str(out), "--run", "r"])
    summary = out / "r" / "summary.json"
    return r.exit_code, r.output, json.loads(summary.read_text()) if summary.exists() else {}


def probe_max_abs(summary: dict) -> dict[str, float]:
    """The long-position probe's largest logit difference per probed position."""
    return {c["name"]: c["value"] for c in summary["gate"]["checks"]
            if c["name"].startswith("probe@") and c["metric"] == "max_abs"}


def broken_copy(family: str, folder: Path, old: str, new: str) -> Path:
    """A mapping folder holding the family's shipped file with ``old`` replaced by ``new``."""
    text = (mappings_dir() / f"{family}.yaml").read_text()
    assert text.count(old) == 1, old
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{family}.yaml").write_text(text.replace(old, new))
    # a user file that does not load leaves the shipped one in use: the copy must load for the test to mean anything
    assert not MappingRegistry([mappings_dir(), folder]).broken
    return folder


@contextmanager
def mappings_in_use(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """In-process conversions inside the block read the mapping files of ``folder`` (``CKPTBRIDGE_MAPPINGS``)
    over the shipped ones; the cached registry is rebuilt on entry and on exit."""
    monkeypatch.setenv(ENV_VAR, str(folder))
    default_registry.cache_clear()
    try:
        yield
    finally:
        monkeypatch.delenv(ENV_VAR)
        default_registry.cache_clear()
