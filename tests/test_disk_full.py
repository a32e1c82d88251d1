"""A real full disk and a real mount point, on a small tmpfs mounted in a private user+mount
namespace (``unshare -rm``: no root needed; skipped where the kernel does not allow it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs inside the namespace: mounts a tmpfs, runs the real CLI, reports what happened as JSON.
DRIVER = r'''
import json, os, signal, subprocess, sys, time
mode, mnt, src = sys.argv[1:4]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", mnt], check=True)
cmd = [sys.executable, "-m", "ckptbridge.cli", "convert", "-q", "--src", "hf", "--dst", "mcore"]
if mode == "enospc":
    dst = os.path.join(mnt, "dst")
    p = subprocess.Popen(cmd + [src, dst], stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "CKPTBRIDGE_TEST_STOP_AT": "staged"})
    while open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
        if p.poll() is not None:
            break
        time.sleep(0.05)
    st = os.statvfs(mnt)
    fd = os.open(os.path.join(mnt, "filler"), os.O_WRONLY | os.O_CREAT)
    os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize - 100_000)  # leave 100 kB: less than the output
    os.close(fd)
    os.kill(p.pid, signal.SIGCONT)
    _, err = p.communicate()
    os.unlink(os.path.join(mnt, "filler"))
else:  # "mount": DST is the mount point itself
    open(os.path.join(mnt, "keep.txt"), "w").write("mine")
    p = subprocess.run(cmd + ["--force", src, mnt], stderr=subprocess.PIPE, text=True)
    err = p.stderr
print(json.dumps({"rc": p.returncode, "stderr": err, "mnt": sorted(os.listdir(mnt)),
                  "parent": sorted(os.listdir(os.path.dirname(mnt)))}))
'''


def _in_namespace(mode: str, mnt: Path, src: Path) -> dict:
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("unshare -rm (user + mount namespace) is not available here")
    mnt.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run(["unshare", "-rm", sys.executable, "-c", DRIVER, mode, str(mnt), str(src)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_disk_full_mid_write(tiny_hf, tmp_path):
    """The disk fills after the free-space check: one line naming the file and the space needed, no DST."""
    out = _in_namespace("enospc", tmp_path / "mnt", tiny_hf["llama3.2-1b"])
    lines = out["stderr"].strip().splitlines()
    assert out["rc"] == 2 and len(lines) == 1, out
    assert lines[0].startswith("error: cannot write ") and "no space left on device: the output needs " in lines[0], out
    assert "free on its filesystem with the partial output removed" in lines[0], out
    assert out["mnt"] == [], out


def test_force_refuses_a_mount_point(tiny_hf, tmp_path):
    out = _in_namespace("mount", tmp_path / "mnt", tiny_hf["llama3.2-1b"])
    assert out["rc"] == 2 and "is a mount point; --force cannot replace it" in out["stderr"], out
    assert out["mnt"] == ["keep.txt"], out
    assert [n for n in out["parent"] if "ckptbridge" in n] == [], out
