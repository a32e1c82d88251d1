"""Every write is checked: short writes are continued, a full disk or a file-size limit is a one-line
error naming the file, and no destination or temporary folder is left behind."""

from __future__ import annotations

import io
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckptbridge import writeback
from ckptbridge.compare import max_abs_diff
from ckptbridge.fileio import CheckedFile, WriteError, check_size, pwrite_all
from ckptbridge.interrupts import Interrupted, handled

from helpers import to_mcore


def test_pwrite_all_continues_short_writes(tmp_path):
    """A per-call cap of 7 bytes forces hundreds of short writes; every byte still lands, at the right offset."""
    data = os.urandom(4099)
    path = tmp_path / "f"
    path.write_bytes(b"\0" * 5000)
    fd = os.open(path, os.O_WRONLY)
    try:
        assert pwrite_all(fd, data, 901, path, cap=7) == len(data)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"\0" * 901 + data


def test_checked_file_torch_save_with_short_writes(tmp_path):
    """torch.save through CheckedFile with tiny write calls gives the same bytes as an unbroken save."""
    t = torch.randn(300, 70)
    ref = io.BytesIO()
    torch.save(t, ref)
    with CheckedFile(tmp_path / "t.pt", cap=13) as f:
        f.saving(t)
    assert (tmp_path / "t.pt").read_bytes() == ref.getvalue()
    check_size(tmp_path / "t.pt", len(ref.getvalue()))
    with pytest.raises(WriteError, match="holds .* bytes after writing, the plan gives it 1"):
        check_size(tmp_path / "t.pt", 1)


def test_torch_save_write_error_is_unwrapped(tmp_path):
    """torch wraps a callback's exception in RuntimeError; `saving` hands back the one-line WriteError."""
    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    code = ("import torch, sys\nfrom ckptbridge.fileio import CheckedFile, WriteError\n"
            "try:\n    CheckedFile(sys.argv[1]).saving(torch.zeros(10000))\n"
            "except WriteError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.pt")], capture_output=True, text=True,
                       preexec_fn=limited, env=_env())
    assert r.stdout.strip() == f"cannot write {tmp_path / 'x.pt'}: file too large (file-size limit reached)", r.stderr


def test_signal_inside_torch_save_is_an_interrupt(tmp_path):
    """SIGINT arriving inside torch.save's write callback is reported as the interrupt, not torch's RuntimeError."""
    class Signalling(CheckedFile):
        def write(self, data):
            os.kill(os.getpid(), signal.SIGINT)
            return super().write(data)

    with pytest.raises(Interrupted) as info:
        with handled():
            with Signalling(tmp_path / "x.pt") as f:
                f.saving(torch.zeros(10))
    assert info.value.exit_code == 130 and not info.value.committed


def test_max_abs_diff_chunks_match_whole():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 11, 5, generator=gen)
    y = x + torch.randn(37, 11, 5, generator=gen) * 1e-3
    whole = float((x.double() - y.double()).abs().max())
    for chunk in (1, 7, 55, 56, 10**6):
        assert max_abs_diff(x, y, chunk) == whole
    assert max_abs_diff(x.bfloat16(), x, 3) == float((x.bfloat16().double() - x.double()).abs().max())


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _cli(*args: str, limit: int | None = None) -> subprocess.CompletedProcess:
    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "ckptbridge.cli", "convert", "-q", *args], capture_output=True,
                          text=True, env=_env(), preexec_fn=limited if limit else None, timeout=300)


@pytest.mark.parametrize("kind", ["hf", "torch_dist", "torch"])
def test_file_size_limit_fails_cleanly(tiny_hf, tmp_path, kind):
    """RLIMIT_FSIZE below the largest output file: every writer stops with one line naming the file, no DST."""
    src = tiny_hf["llama3.2-1b"]
    if kind == "hf":
        src = to_mcore(src, tmp_path / "mcore")
        args = ["--src", "mcore", "--dst", "hf"]
    else:
        args = ["--src", "hf", "--dst", "mcore", "--format", kind]
    limit = (src / "model.safetensors").stat().st_size // 2 if kind != "hf" else 100_000
    dst = tmp_path / "out"
    r = _cli(*args, str(src), str(dst), limit=limit)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write ") and "file too large" in lines[0], r.stderr
    assert ".ckptbridge-tmp-" in lines[0]  # names the file being written
    assert not dst.exists()
    assert not [p for p in tmp_path.iterdir() if "ckptbridge" in p.name]


def test_writeback_started_every_step(tmp_path):
    """Writers ask the kernel to start writing a file back every `writeback.STEP` bytes (so the fsync
    before installing finds the pages clean); only a hint, and only where the system has the call."""
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        writeback.forget(fd)  # a number another test's file may have had
        asked = [writeback.written(fd, writeback.STEP // 2) for _ in range(4)]
    finally:
        writeback.forget(fd)
        os.close(fd)
    assert asked == ([False, True, False, True] if writeback.available() else [False] * 4)
    assert writeback.written(fd, 0) is False
