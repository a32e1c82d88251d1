"""Row-parallel tensors of an MCore source (TP shards side by side, `fastcopy.Columns`) copied for the HF
export from mappings of the shards, never through memory; byte identity with the slow path for every
layout of the round-trip matrix is `test_fast_copy.test_fast_path_writes_the_slow_paths_bytes`."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptbridge import fastcopy
from ckptbridge.convert import Target, convert, fast_plan
from ckptbridge.errors import PlanError
from ckptbridge.fastcopy import Columns, Run, Spans
from ckptbridge.fileio import WriteError
from ckptbridge.formats.detect import open_source
from ckptbridge.layout import ParallelLayout

from test_fast_copy import _spans_file, _written, assert_same_files, both


def _expected(data: bytes, c: Columns) -> bytes:
    widths = [p.length // c.rows for p in c.parts]
    return b"".join(data[p.offset + i * w:p.offset + (i + 1) * w] for i in range(c.rows) for p, w in zip(c.parts, widths))


@pytest.mark.parametrize("window", [7, 64 * 2**20])  # a row a mapping; every row at once
def test_columns_written_as_rows_interleaved(tmp_path, monkeypatch, window):
    data, fd = _spans_file(tmp_path, 50_000)
    other = os.open(tmp_path / "src", os.O_RDONLY)  # the second shard through its own descriptor, as a second file
    monkeypatch.setattr(fastcopy, "_WINDOW", window)
    try:
        c = Columns((Run(fd, 4099, 33 * 3), Run(other, 20_001, 33 * 5)), 33)  # 33 rows of 3 + 5 bytes
        spans = Spans((Run(fd, 1, 10), c, Run(None, 0, 4)), torch.uint8, (10 + c.length + 4,))
        expected = b"\0" * 3 + data[1:11] + _expected(data, c) + b"\0" * 4
        assert spans.interleaved and not Spans((Run(fd, 1, 10),), torch.uint8, (10,)).interleaved
        assert _written(spans, tmp_path, "fast", True) == expected == _written(spans, tmp_path, "slow", False)
        assert spans.cut(10, c.length) == (c,)  # a whole Columns stays one
        part = Spans(spans.cut(5, 50), torch.uint8, (50,))  # a cut through it: runs of rows, same bytes
        assert not part.interleaved and _written(part, tmp_path, "cut", True) == b"\0" * 3 + expected[3 + 5:3 + 55]
        assert sorted(spans.source_runs(), key=lambda r: r.offset) == [Run(fd, 1, 10), *c.parts]
    finally:
        os.close(fd)
        os.close(other)


def test_columns_past_the_source_end_are_a_write_error(tmp_path):
    _, fd = _spans_file(tmp_path, 1_000)
    try:
        spans = Spans((Columns((Run(fd, 0, 400), Run(fd, 800, 400)), 4),), torch.uint8, (800,))
        with pytest.raises(WriteError, match="the source ended"):
            _written(spans, tmp_path, "out", True)
    finally:
        os.close(fd)


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_row_parallel_tensors_of_an_mcore_source_copied(tiny_hf, tmp_path, fmt):
    """At TP 2 every row-parallel tensor reaches the writers as one `Columns`: the HF writer's rows, an MCore
    writer's shards at TP 1 (whole), TP 2 (a part each) or TP 4 (a run a row of half a part)."""
    mcore = tmp_path / "mcore"
    convert(tiny_hf["llama3.2-1b"], mcore, None, Target("mcore", layout=ParallelLayout(tp=2), ckpt_format=fmt))
    source = open_source(mcore, "mcore", None, None)
    try:
        source.verify()
        planned = list(source.planned)
        row = {pt.mcore_name for pt in planned if pt.rule.shard_kind(source.layer_spec).axis == 1}
        to_hf = fast_plan(source, Target("hf"), planned, source.dtype, None)
        margs = source.spec.megatron_args(ParallelLayout(), source.dtype, "te", "torch_dist")
        to_mcore = fast_plan(source, Target("mcore"), planned, source.dtype, margs)
    finally:
        source.close()
    assert row and row <= set(to_hf) and all(to_hf[n].interleaved for n in row) and set(to_hf) <= set(to_mcore)
    fast, slow = both(mcore, tmp_path / "hf", kind="hf")
    assert_same_files(fast, slow)
    for i, layout in enumerate([dict(tp=1), dict(tp=2, pp=2), dict(tp=4)]):
        for out_fmt in ("torch_dist", "torch"):
            assert_same_files(*both(mcore, tmp_path / f"re{i}{out_fmt}", kind="mcore", layout=ParallelLayout(**layout),
                                    ckpt_format=out_fmt))
    original, back = load_file(tiny_hf["llama3.2-1b"] / "model.safetensors"), load_file(fast / "model.safetensors")
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)


def test_nonfinite_in_a_row_parallel_shard_found(tiny_hf, tmp_path):
    """The values of a tensor copied as column blocks are checked in its shards' own bytes."""
    src = tmp_path / "src"
    shutil.copytree(tiny_hf["llama3.2-1b"], src)
    tensors = load_file(src / "model.safetensors")
    name = "model.layers.1.self_attn.o_proj.weight"
    tensors[name][5, -1] = float("nan")  # in the second TP shard's columns
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    mcore = tmp_path / "mcore"
    convert(src, mcore, None, Target("mcore", layout=ParallelLayout(tp=2)), allow_nonfinite=True)
    with pytest.raises(PlanError, match=f"{name}.*1 NaN or Inf"):
        convert(mcore, tmp_path / "hf", None, Target("hf"))
    assert not (tmp_path / "hf").exists()
    notes = convert(mcore, tmp_path / "hf", None, Target("hf"), allow_nonfinite=True).notes
    assert any(name in n and "--allow-nonfinite" in n for n in notes)


def test_columns_rows_and_column_ranges():
    """A row range of a `Columns` is one again; a column range is its whole parts (one part: its run) when it
    meets their boundaries, else a run per row and part; regions along dimension 1 follow."""
    c = Columns((Run(3, 100, 6), Run(4, 0, 4)), 2)  # 2 rows of 3 + 2 bytes
    assert c.row_runs() == [Run(3, 100, 3), Run(4, 0, 2), Run(3, 103, 3), Run(4, 2, 2)] and c.length == 10
    assert c.row_range(1, 1) == Columns((Run(3, 103, 3), Run(4, 2, 2)), 1)
    assert c.columns(0, 5) == [c] and c.columns(0, 3) == [Run(3, 100, 6)] and c.columns(3, 5) == [Run(4, 0, 4)]
    assert c.columns(2, 4) == [Run(3, 102, 1), Run(4, 0, 1), Run(3, 105, 1), Run(4, 2, 1)]
    spans = Spans((c,), torch.uint8, (2, 5))
    assert spans.rows(1, 1).runs == (c.row_range(1, 1),)
    assert spans.regions(1, [(3, 2)]).runs == (Run(4, 0, 4),)
    assert spans.regions(1, [(0, 1), (4, 1)]).runs == (Run(3, 100, 1), Run(4, 1, 1), Run(3, 103, 1), Run(4, 3, 1))
