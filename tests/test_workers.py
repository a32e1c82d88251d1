"""Several processes writing one conversion (torchrun, gloo on CPU): the same files as one process, and
a worker that dies leaves neither DST nor the staging folder behind.

No output file is named by the writer's rank: torch_dist data files carry the rank megatron-core would
save them from (``__{stage x TP + TP rank}_0.distcp``), legacy files their (TP, PP, EP) rank, HF shards
their index, whichever worker writes them. So every file is byte-identical to a one-process run; only
``.metadata`` differs, by the random ``save_id`` two one-process runs differ by too (its index is
compared instead). The exception: more workers than torch_dist ranks cut each rank's data into parts
(``__R_K.distcp``), different files holding the same tensors (megatron-core's own load is the check).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptbridge.convert import Target, convert
from ckptbridge.formats.hf import hf_plan
from ckptbridge.layout import ParallelLayout
from ckptbridge.spec import ModelSpec
from ckptbridge.workshare import assign, loads

from mcore_runner import run_distributed
from test_fast_copy import assert_same_files

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1", **extra}


def _ckptbridge(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckptbridge", "convert", "-q", *args], capture_output=True,
                          text=True, env=_env(**env), timeout=300)


def _ours(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "ckptbridge" in p.name)


def test_assign_splits_by_bytes():
    shares = assign({"a": 10, "b": 7, "c": 3, "d": 3, "e": 1}, 2)
    assert shares == [frozenset({"a", "d"}), frozenset({"b", "c", "e"})]  # largest first onto the least loaded
    assert loads({"a": 10, "b": 7, "c": 3, "d": 3, "e": 1}, shares) == [13, 11]
    assert assign({"a": 1}, 3) == [frozenset({"a"}), frozenset(), frozenset()]  # more workers than files


def test_workers_write_the_one_process_files(tiny_hf, tmp_path):
    """`--workers 2` (a real torchrun launch on this machine) for each output format."""
    src = tiny_hf["qwen2.5-0.5b"]
    mcore = tmp_path / "one"
    convert(src, mcore, None, Target("mcore", ParallelLayout(tp=2, pp=2)))
    runs = [
        (src, ["--src", "hf", "--dst", "mcore", "--tp", "2", "--pp", "2"]),  # torch_dist: 4 data files
        (mcore, ["--src", "mcore", "--dst", "mcore", "--format", "torch", "--tp", "2", "--pp", "2"]),  # legacy
        (mcore, ["--src", "mcore", "--dst", "hf", "--max-shard-size", "200KB"]),  # HF shards + index
    ]
    for i, (source, args) in enumerate(runs):
        one, two = tmp_path / f"{i}-one", tmp_path / f"{i}-two"
        assert _ckptbridge(*args, str(source), str(one)).returncode == 0
        done = _ckptbridge(*args, "--workers", "2", str(source), str(two))
        assert done.returncode == 0, done.stderr
        assert_same_files(one, two)
        assert _ours(tmp_path) == []


def test_torchrun_launch_rank0_stages(tiny_hf, tmp_path):
    """torchrun started by hand (as on several nodes): rank 0 holds the lock and the staging folder."""
    src = tiny_hf["llama3.2-1b"]
    one = tmp_path / "one"
    convert(src, one, None, Target("mcore", ParallelLayout(tp=2)))
    two = tmp_path / "two"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "ckptbridge", "convert", "--src", "hf", "--dst", "mcore", "--tp", "2", str(src),
                           str(two)], capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("hf -> torch_dist") == 1  # one summary: rank 0's
    assert_same_files(one, two)
    assert _ours(tmp_path) == []


def _worker(staging_under: Path, rank: int, timeout: float = 120) -> int:
    """The pid of worker ``rank`` launched for a staging folder under ``staging_under``, once it has
    SIGSTOPped itself (state T)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                environ = (proc / "environ").read_bytes().split(b"\0")
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            staging = [e for e in environ if e.startswith(b"CKPTBRIDGE_STAGING=")]
            if staging and str(staging_under).encode() in staging[0] and f"RANK={rank}".encode() in environ \
                    and state == "T":
                return int(proc.name)
        time.sleep(0.1)
    raise AssertionError(f"worker {rank} never reached its stop point")


def test_killed_worker_leaves_nothing(tiny_hf, tmp_path):
    src, dst = tiny_hf["qwen2.5-0.5b"], tmp_path / "out"
    launcher = subprocess.Popen([sys.executable, "-m", "ckptbridge", "convert", "-q", "--src", "hf", "--dst", "mcore",
                                 "--tp", "2", "--pp", "2", "--workers", "2", str(src), str(dst)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=_env(CKPTBRIDGE_TEST_STOP_AT="half"))  # each worker stops half-way
    try:
        victim, other = _worker(tmp_path, 1), _worker(tmp_path, 0)
        assert any(p.name.startswith(".out.ckptbridge-tmp-") for p in tmp_path.iterdir())  # half written
        os.kill(victim, signal.SIGKILL)
        os.kill(other, signal.SIGCONT)
        _, err = launcher.communicate(timeout=180)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 2, err
    assert "nothing was installed" in err
    assert not dst.exists() and _ours(tmp_path) == []


@pytest.mark.parametrize("workers", [1, 2, 8])
def test_shard_plan_covers_every_tensor(tiny_hf, workers):
    spec = ModelSpec.from_hf_config(json.loads((tiny_hf["llama3.2-1b"] / "config.json").read_text()))
    plan = hf_plan(spec, spec.planned(), torch.float32, 100_000).files
    shares = assign(plan.sizes, workers)
    assert set().union(*shares) == set(plan.sizes) and sum(loads(plan.sizes, shares)) == sum(plan.sizes.values())
    assert set().union(*(plan.tensors_for(s) for s in shares)) == {pt.mcore_name for pt in spec.planned()}


def _loaded(rank: int, world: int, iter_dirs: list[str]) -> list[dict[str, torch.Tensor]]:
    """Worker: each torch_dist folder loaded by megatron-core's own ``dist_checkpointing`` into its GPTModel."""
    from ckptbridge.formats.mcore_common import safe_load
    from ckptbridge.mcore import model as mm

    out = []
    for iter_dir in iter_dirs:
        args = safe_load(Path(iter_dir) / "common.pt")["args"]
        mm.init_parallel(1, 1, None, seed=100 + len(out))  # weights differ until the load
        models = mm.build_gpt_model(args, dtype=torch.float32)
        mm.load_torch_dist(models, iter_dir)
        out.append({k: v.detach().clone() for k, v in models[0].state_dict().items()
                    if isinstance(v, torch.Tensor) and "_extra_state" not in k})
    return out


def test_more_workers_than_ranks_cut_torch_dist_files(tiny_hf, tmp_path):
    """TP 1 has one rank: three workers each write whole ``__0_K.distcp`` parts of it, which megatron-core
    loads into the same tensors as the one-process ``__0_0.distcp``."""
    src = tiny_hf["llama3.2-1b"]
    one, three = tmp_path / "one", tmp_path / "three"
    convert(src, one, None, Target("mcore"))
    done = _ckptbridge("--src", "hf", "--dst", "mcore", "--workers", "3", str(src), str(three))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (one / "release").glob("*.distcp")) == ["__0_0.distcp"]
    parts = sorted(p.name for p in (three / "release").glob("*.distcp"))
    assert len(parts) >= 3 and parts == [f"__0_{k}.distcp" for k in range(len(parts))]
    a, b = run_distributed(_loaded, 1, [str(one / "release"), str(three / "release")], timeout=180)[0]
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name
    back_one, back_three = tmp_path / "back-one", tmp_path / "back-three"  # our own reader follows the index too
    convert(one, back_one, None, Target("hf"))
    convert(three, back_three, None, Target("hf"))
    assert_same_files(back_one, back_three)


def test_worker_notes_reported_once(tiny_hf, tmp_path):
    """Notes made inside workers (here: NaN values let through, one tensor in each worker's file) come
    back to the launcher and are printed once each, with the source's own."""
    src = tmp_path / "nan"
    shutil.copytree(tiny_hf["llama3.2-1b"], src)
    tensors = load_file(src / "model.safetensors")
    first, last = "model.layers.0.mlp.down_proj.weight", "model.layers.3.mlp.down_proj.weight"
    for name in (first, last):
        tensors[name][0, 0] = float("nan")
    save_file(tensors, src / "model.safetensors", {"format": "pt"})
    mcore = tmp_path / "mcore"
    convert(src, mcore, None, Target("mcore", ParallelLayout(pp=2)), allow_nonfinite=True)
    done = subprocess.run([sys.executable, "-m", "ckptbridge", "convert", "--src", "mcore", "--dst", "mcore",
                           "--format", "torch", "--pp", "2", "--allow-nonfinite", "--workers", "2", str(mcore),
                           str(tmp_path / "out")], capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    notes = [line for line in done.stderr.splitlines() if line.startswith("note: ")]
    assert len(notes) == len(set(notes)), notes
    assert sum("NaN" in n for n in notes) == 2 and sum(n.startswith("note: source: ") for n in notes) == 1, notes
    assert not list((tmp_path / "out").rglob(".ckptbridge-notes*"))
