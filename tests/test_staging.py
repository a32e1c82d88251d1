"""Staging, the DST lock, --force, and what kills leave behind.

The kill matrix runs the real CLI in subprocesses. To hit exact points it sets
``CKPTBRIDGE_TEST_STOP_AT`` (the process SIGSTOPs itself there, see
ckptbridge/staging.py), then sends the signal and SIGCONT. After every kill DST
is absent, or the old DST, or the complete new checkpoint; never a partial
folder any reader accepts. The next run names what was left, --clean removes it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckptbridge.cli import main
from ckptbridge.compare import compare
from ckptbridge.errors import FormatError
from ckptbridge.formats.detect import open_source
from ckptbridge.staging import MARKER

from helpers import to_mcore, tree_digest

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **extra}


def _spawn(src: Path, dst: Path, *args: str, stop: str | None = None, **env: str) -> subprocess.Popen:
    if stop:
        env["CKPTBRIDGE_TEST_STOP_AT"] = stop
    return subprocess.Popen([sys.executable, "-m", "ckptbridge.cli", "convert", "-q", *args, str(src), str(dst)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(**env))


def _wait_stopped(proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the process has SIGSTOPped itself at its stop point (state T in /proc)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before its stop point: {proc.stderr.read()}")
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("never reached its stop point")


def _signal(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    os.kill(proc.pid, sig)
    if sig != signal.SIGKILL:
        os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _cli(*args: str):
    return CliRunner().invoke(main, ["convert", "-q", *args])


def _ours(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if "ckptbridge" in p.name)


def _assert_refused(folder: Path) -> None:
    """Neither the folder nor an iteration folder inside it opens as a checkpoint."""
    for path in [folder, *[p for p in folder.iterdir() if p.is_dir()]]:
        with pytest.raises(FormatError, match="unfinished ckptbridge output"):
            open_source(path)


@pytest.fixture(scope="module")
def sources(tiny_hf, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("staging_src")
    hf = tiny_hf["llama3.2-1b"]
    return {"hf": hf, "mcore": to_mcore(hf, root / "mcore")}


def _args(out: str) -> tuple[str, list[str]]:
    """(source kind, CLI args) that produce an ``out`` checkpoint (hf, torch_dist or torch)."""
    if out == "hf":
        return "mcore", ["--src", "mcore", "--dst", "hf"]
    return "hf", ["--src", "hf", "--dst", "mcore", "--format", out]


# every signal at every point, spread over the three output formats (a Latin square)
MATRIX = [("hf", signal.SIGKILL, "staged"), ("hf", signal.SIGTERM, "half"), ("hf", signal.SIGINT, "written"),
          ("torch_dist", signal.SIGINT, "staged"), ("torch_dist", signal.SIGKILL, "half"), ("torch_dist", signal.SIGTERM, "written"),
          ("torch", signal.SIGTERM, "staged"), ("torch", signal.SIGINT, "half"), ("torch", signal.SIGKILL, "written")]


@pytest.mark.slow
def test_kill_matrix(sources, tmp_path):
    procs = []
    for i, (out, sig, point) in enumerate(MATRIX):  # all started at once: they reach their points in parallel
        kind, args = _args(out)
        case = tmp_path / f"case{i}"
        case.mkdir()
        procs.append((out, sig, point, case, kind, args, _spawn(sources[kind], case / "dst", *args, stop=point)))
    for out, sig, point, case, kind, args, proc in procs:
        what = f"{out} {signal.Signals(sig).name} at {point}"
        _wait_stopped(proc)
        code, err = _signal(proc, sig)
        assert not (case / "dst").exists(), what
        left = _ours(case)
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL and len(left) == 2, (what, left)  # the temp folder and the lock file
            tmp = next(p for p in left if ".ckptbridge-tmp-" in p.name)
            assert (tmp / MARKER).exists(), what
            _assert_refused(tmp)
            r = _cli(*args, str(sources[kind]), str(case / "dst"))
            assert r.exit_code == 0 and f"leftover of an interrupted conversion: {tmp}" in r.output, (what, r.output)
            assert tmp.exists()
            r = _cli(*args, "--force", "--clean", str(sources[kind]), str(case / "dst"))
            assert r.exit_code == 0 and f"removed leftover of an interrupted conversion: {tmp}" in r.output, (what, r.output)
            assert _ours(case) == [], what
        else:
            assert code == 128 + sig, (what, err)
            assert err.strip().splitlines() == [f"interrupted ({signal.Signals(sig).name}), nothing written"], (what, err)
            assert left == [], (what, left)


def _old_dst(dst: Path) -> Path:
    dst.mkdir()
    (dst / "old.txt").write_text("the old checkpoint")
    return dst


@pytest.mark.parametrize("exchange", [True, False])
def test_force_killed_between_steps(sources, tmp_path, exchange):
    """--force killed between its steps: DST is the old or the complete new checkpoint, or (two-rename
    path only) missing until the next run puts the old one back."""
    env = {} if exchange else {"CKPTBRIDGE_TEST_NO_EXCHANGE": "1"}
    point = "exchanged" if exchange else "moved-old"
    dst = _old_dst(tmp_path / "dst")
    proc = _spawn(sources["hf"], dst, "--src", "hf", "--dst", "mcore", "--force", stop=point, **env)
    _wait_stopped(proc)
    code, _ = _signal(proc, signal.SIGKILL)
    assert code == -signal.SIGKILL
    if exchange:
        assert all(r.bit_exact for r in compare(sources["hf"], dst))  # the new one, complete
        (left,) = [p for p in _ours(tmp_path) if ".ckptbridge-tmp-" in p.name]
        assert (left / "old.txt").exists()  # the old one, moved aside whole
    else:
        assert not dst.exists()
        (old,) = [p for p in _ours(tmp_path) if ".ckptbridge-old-" in p.name]
        assert (old / "old.txt").exists()
    r = _cli("--src", "hf", "--dst", "mcore", "--force", "--clean", str(sources["hf"]), str(dst))
    assert r.exit_code == 0, r.output
    assert ("put back" in r.output) == (not exchange), r.output
    assert all(r.bit_exact for r in compare(sources["hf"], dst))
    assert _ours(tmp_path) == []


def test_force_terminated_during_commit_finishes_it(sources, tmp_path):
    """SIGTERM inside the (two-rename) commit waits for it: DST is complete and the exit says so."""
    dst = _old_dst(tmp_path / "dst")
    proc = _spawn(sources["hf"], dst, "--src", "hf", "--dst", "mcore", "--force", stop="moved-old",
                  CKPTBRIDGE_TEST_NO_EXCHANGE="1")
    _wait_stopped(proc)
    code, err = _signal(proc, signal.SIGTERM)
    assert code == 143 and "DST was already complete" in err, err
    assert all(r.bit_exact for r in compare(sources["hf"], dst))
    assert _ours(tmp_path) == []


def test_second_conversion_to_one_dst_is_refused(sources, tmp_path):
    dst = tmp_path / "dst"
    first = _spawn(sources["hf"], dst, "--src", "hf", "--dst", "mcore", stop="staged")
    try:
        _wait_stopped(first)
        r = _cli("--src", "hf", "--dst", "mcore", "--force", str(sources["hf"]), str(dst))
        assert r.exit_code == 2, r.output
        assert f"is being written by another conversion (pid {first.pid} on " in r.output, r.output
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert all(r.bit_exact for r in compare(sources["hf"], dst))
    assert _ours(tmp_path) == []  # the lock file goes with its holder


def test_force_never_deletes_what_the_source_reaches(sources, tmp_path):
    """HF-cache layout: the snapshot's weights are symlinks into blobs/; replacing blobs/ would break the source.
    (Assets are plain files here: a symlinked asset outside the folder is refused on its own.)"""
    cache = tmp_path / "sym"
    (cache / "blobs").mkdir(parents=True)
    (cache / "snap").mkdir()
    for i, f in enumerate(sorted(sources["hf"].iterdir())):
        if f.suffix != ".safetensors":
            shutil.copy(f, cache / "snap" / f.name)
            continue
        shutil.copy(f, cache / "blobs" / f"blob{i}")
        (cache / "snap" / f.name).symlink_to(Path("..") / "blobs" / f"blob{i}")
    before = tree_digest(cache / "snap")
    r = _cli("--src", "hf", "--dst", "mcore", "--force", str(cache / "snap"), str(cache / "blobs"))
    assert r.exit_code == 2 and "--force would delete" in r.output and "which the source reaches through" in r.output, r.output
    assert tree_digest(cache / "snap") == before
    assert _ours(cache) == []


def test_force_replaces_a_file(sources, tmp_path):
    dst = tmp_path / "dst"
    dst.write_text("not a checkpoint")
    r = _cli("--src", "hf", "--dst", "mcore", "--force", str(sources["hf"]), str(dst))
    assert r.exit_code == 0, r.output
    assert all(r.bit_exact for r in compare(sources["hf"], dst))
    assert _ours(tmp_path) == []


def test_staging_marker_refused(sources, tmp_path):
    """A folder with the staging marker (here a finished legacy checkpoint) is refused, as is its release/."""
    out = to_mcore(sources["hf"], tmp_path / "legacy", fmt="torch")
    (out / MARKER).write_text("{}")
    _assert_refused(out)
