"""Kernel-side copies (copy_file_range) write exactly the files the through-memory path writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptbridge import fastcopy
from ckptbridge.convert import Target, convert, fast_plan
from ckptbridge.fastcopy import Run, Spans, write_spans
from ckptbridge.errors import PlanError
from ckptbridge.fileio import WriteError, copy_range_all
from ckptbridge.formats.detect import open_source
from ckptbridge.formats.torch_dist import read_metadata
from ckptbridge.layout import ParallelLayout
from ckptbridge.values import _count_nonfinite, all_finite

from test_roundtrip import LAYOUTS


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_files(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        if name.endswith(".metadata"):  # names a random save_id: the index itself must match
            ma, mb = read_metadata(a / Path(name).parent), read_metadata(b / Path(name).parent)
            assert ma.state_dict_metadata == mb.state_dict_metadata and ma.storage_data == mb.storage_data
        else:
            assert fa[name] == fb[name], name


def both(src: Path, tmp: Path, **target) -> tuple[Path, Path]:
    out = []
    for fast in (True, False):
        dst = tmp / f"{'fast' if fast else 'slow'}"
        convert(src, dst, None, Target(fast_copy=fast, **target))
        out.append(dst)
    return out[0], out[1]


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fast_path_writes_the_slow_paths_bytes(tiny_hf, tmp_path, layout, fmt):
    src = tiny_hf["qwen2.5-0.5b"]  # biases (1-D qkv interleave), tied embeddings, vocab padding
    fast, slow = both(src, tmp_path, kind="mcore", layout=ParallelLayout(**LAYOUTS[layout]), ckpt_format=fmt)
    assert_same_files(fast, slow)
    back_fast, back_slow = both(fast, tmp_path / "back", kind="hf")  # MCore source: chunks / rank files as runs
    assert_same_files(back_fast, back_slow)
    assert load_file(back_fast / "model.safetensors").keys() == load_file(src / "model.safetensors").keys()
    other = dict(layout=ParallelLayout(**RESHARD[layout]), ckpt_format="torch" if fmt == "torch_dist" else "torch_dist")
    re_fast, re_slow = both(fast, tmp_path / "reshard", kind="mcore", **other)  # MCore -> MCore
    assert_same_files(re_fast, re_slow)
    assert byte_runs(fast) > 0


#: per round-trip layout, the layout an MCore -> MCore reshard of it goes to
RESHARD = {name: (dict(tp=1, pp=2) if lay.get("tp", 1) > 1 else dict(tp=2)) for name, lay in LAYOUTS.items()}


def byte_runs(mcore: Path) -> int:
    """How many planned tensors an MCore -> HF conversion of ``mcore`` copies as byte runs."""
    source = open_source(mcore, "mcore", None, None)
    try:
        source.verify()
        return len(fast_plan(source, Target("hf"), list(source.planned), source.dtype, None))
    finally:
        source.close()


def test_row_parallel_shards_copied(tiny_hf):
    """A row-parallel tensor split over TP ranks is a strided column block: both MCore writers copy it a run
    a row, gathered (its bytes checked against the slow path above)."""
    source = open_source(tiny_hf["llama3.2-1b"], "hf", None, None)
    try:
        source.verify()
        planned = source.spec.planned()
        row = [pt.mcore_name for pt in planned if pt.rule.shard_kind("te").axis == 1]
        layout = ParallelLayout(tp=2)
        plans = []
        for fmt in ("torch", "torch_dist"):
            margs = source.spec.megatron_args(layout, source.dtype, "te", fmt)
            plans.append(fast_plan(source, Target("mcore", layout=layout, ckpt_format=fmt), planned, source.dtype, margs))
        legacy, dist = plans
    finally:
        source.close()
    assert row and set(row) <= set(legacy) and set(row) <= set(dist)


@pytest.mark.parametrize("fmt,layout", [("torch_dist", dict(tp=2, ep=2)), ("torch", dict(tp=2, pp=2, ep=2, etp=1))])
def test_fast_path_moe(tiny_moe, tmp_path, fmt, layout):
    fast, slow = both(tiny_moe["qwen3-30b-a3b"], tmp_path, kind="mcore", layout=ParallelLayout(**layout), ckpt_format=fmt)
    assert_same_files(fast, slow)
    assert_same_files(*both(fast, tmp_path / "hf", kind="hf"))
    assert_same_files(*both(fast, tmp_path / "ep1", kind="mcore", layout=ParallelLayout(tp=1, ep=2)))


def test_fast_path_to_hf_equals_source(tiny_hf, tmp_path):
    src = tiny_hf["llama3.2-1b"]
    mcore = tmp_path / "mcore"
    convert(src, mcore, None, Target("mcore"))
    fast, slow = both(mcore, tmp_path / "hf", kind="hf")
    assert_same_files(fast, slow)


def test_nonfinite_found_without_reading(tiny_hf, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for p in tiny_hf["llama3.2-1b"].iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    tensors = load_file(src / "model.safetensors")
    name = next(n for n in tensors if "mlp.up_proj" in n)
    tensors[name].view(-1)[3] = float("nan")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PlanError, match="NaN"):
        convert(src, tmp_path / "out", None, Target("mcore"))
    assert not (tmp_path / "out").exists()


def test_nonfinite_checked_beside_the_copy_in_order(tiny_hf, tmp_path):
    """The checks run on a thread beside the kernel copy: every poisoned tensor is still found, reported
    in the order the writer took them, and the first one stops a conversion that does not allow them."""
    src = tmp_path / "src"
    src.mkdir()
    for p in tiny_hf["llama3.2-1b"].iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    tensors = load_file(src / "model.safetensors")
    names = [f"model.layers.{i}.mlp.gate_proj.weight" for i in (0, 1)]  # [gate; up]: named by gate
    for name in names:
        tensors[name].view(-1)[5] = float("inf")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PlanError, match=f"{names[0]}.*Inf"):
        convert(src, tmp_path / "out", None, Target("mcore"))
    assert not (tmp_path / "out").exists()
    notes = convert(src, tmp_path / "out", None, Target("mcore"), allow_nonfinite=True).notes
    assert [n.split("'")[1] for n in notes if "--allow-nonfinite" in n] == names


def test_copy_range_loops_on_short_copies_and_falls_back(tmp_path):
    data = os.urandom(100_003)
    (tmp_path / "src").write_bytes(data)
    src = os.open(tmp_path / "src", os.O_RDONLY)
    try:
        for fast in (True, False):
            out = tmp_path / f"out-{fast}"
            dst = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                kernel = copy_range_all(src, 17, dst, 5, 100_000 - 17, out, fast=fast, cap=4096)
            finally:
                os.close(dst)
            assert kernel == (fast and hasattr(os, "copy_file_range")) or not kernel
            assert out.read_bytes() == b"\0" * 5 + data[17:100_000]
    finally:
        os.close(src)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_all_finite(dtype):
    t = torch.randn(10_001).to(dtype)
    assert all_finite(t) and _count_nonfinite(t) == 0
    for value in (float("nan"), float("inf"), float("-inf")):
        t[7777] = value
        assert not all_finite(t) and _count_nonfinite(t) == 1
        t[7777] = 0


def _spans_file(tmp_path: Path, size: int) -> tuple[bytes, int]:
    data = os.urandom(size)
    (tmp_path / "src").write_bytes(data)
    return data, os.open(tmp_path / "src", os.O_RDONLY)


def _written(spans, tmp_path: Path, name: str, fast: bool) -> bytes:
    out = tmp_path / name
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        assert write_spans(spans, fd, 3, out, fast) == spans.nbytes
    finally:
        os.close(fd)
    return out.read_bytes()


def test_short_runs_gathered_from_a_mapping(tmp_path, monkeypatch):
    """Row-parallel shards are one short run a row: they go out as pwritev batches from a read-only mapping
    of the source, cut where the mapping window ends, a long run or a zero run comes, or the source file
    changes; the bytes are those the buffered path writes (and above, the slow path's files)."""
    data, fd = _spans_file(tmp_path, 300_000)
    other = os.open(tmp_path / "src", os.O_RDONLY)  # the same bytes through another descriptor: another source
    monkeypatch.setattr(fastcopy, "_WINDOW", 50_000)
    try:
        runs = [Run(fd, 1000 + 700 * i, 300) for i in range(200)]  # a strided column block
        runs += [Run(None, 0, 77), Run(other, 5, 40_000), Run(fd, 9, 11), Run(other, 100, 33)]
        runs += [Run(fd, 299_000 - 2000 * i, 100) for i in range(3)]  # backwards: one mapping each
        spans = Spans(tuple(runs), torch.uint8, (sum(r.length for r in runs),))
        expected = b"\0" * 3 + b"".join(data[r.offset:r.offset + r.length] if r.fd is not None else b"\0" * r.length
                                        for r in runs)
        assert _written(spans, tmp_path, "fast", True) == expected == _written(spans, tmp_path, "slow", False)
        many = Spans(tuple(Run(fd, 3 * i, 2) for i in range(3000)), torch.uint8, (6000,))  # > IOV_MAX pieces a call
        assert _written(many, tmp_path, "many", True) == b"\0" * 3 + b"".join(data[3 * i:3 * i + 2] for i in range(3000))
    finally:
        os.close(fd)
        os.close(other)


def test_gathered_runs_past_the_source_end_are_a_write_error(tmp_path):
    """A source cut short behind our back is a one-line error before anything is mapped (a read of a mapped
    page past the end of a file would kill the process)."""
    _, fd = _spans_file(tmp_path, 10_000)
    try:
        spans = Spans((Run(fd, 0, 100), Run(fd, 9_950, 100)), torch.uint8, (200,))
        with pytest.raises(WriteError, match="the source ended"):
            _written(spans, tmp_path, "out", True)
    finally:
        os.close(fd)
