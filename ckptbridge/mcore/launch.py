"""Process groups for the MCore side: one in-process gloo rank, or N forked worker ranks.

megatron-core needs ``torch.distributed`` even for TP=PP=1, so a single-rank gloo group is
created in the calling process on first use and kept.  Layouts with more than one rank run in
worker processes started from a *forkserver* that imported torch and megatron-core once: forking
that server costs well under a second per worker, whereas ``spawn`` re-imports megatron (~6 s per
worker on CPU), and forking the caller itself is unsafe once it
has used torch's OpenMP pool.  The alignment harness and the tests both launch workers here.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch

#: modules the forkserver imports once, so that every forked worker starts with them loaded
DEFAULT_PRELOAD = ("torch", "ckptbridge.mcore.model")


class WorkerError(RuntimeError):
    """A worker raised, died or timed out; the message carries its traceback."""


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_single_rank_group() -> None:
    """Initialise a world-size-1 gloo group in this process unless one exists.

    An existing group of another size belongs to someone else (e.g. a training job that imported
    us); running a single-rank MCore model inside it would be wrong, so that is an error.
    """
    dist = torch.distributed
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError(
                f"a process group of world size {dist.get_world_size()} is already initialised; "
                "the in-process MCore run needs a world of 1"
            )
        return
    dist.init_process_group(
        backend="gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}",
        timeout=datetime.timedelta(minutes=30),
    )


def _worker(fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple[Any, ...],
            results: Any, timeout_s: float) -> None:
    os.setpgid(0, 0)  # own process group: the parent can kill us and our children on timeout
    ok, payload = True, b""
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
        torch.distributed.init_process_group(backend="gloo", rank=rank, world_size=world,
                                             timeout=datetime.timedelta(seconds=timeout_s))
        # pickle to bytes: tensors put on a queue directly travel as shared-memory handles that
        # die with this process before the parent reads them
        payload = pickle.dumps(fn(rank, world, *args))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent with its traceback
        ok, payload = False, traceback.format_exc().encode()
    try:
        results.put((rank, ok, payload))
    finally:
        if torch.distributed.is_initialized():
            if ok:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        results.close()
        results.join_thread()


def run_workers(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 1800.0,
                preload: Sequence[str] = DEFAULT_PRELOAD) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; return the results by rank.

    ``fn`` must be a module-level function and return something picklable.  Raises
    :class:`WorkerError` with the failing worker's traceback, when a worker dies without a
    result, or after ``timeout`` seconds (all workers are then killed).
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world, port, args, results, max(timeout, 60.0)), daemon=False)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    out: dict[int, Any] = {}
    try:
        while len(out) < world:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerError(f"timeout after {timeout:.0f}s; results from ranks {sorted(out)} only")
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if i not in out and p.exitcode is not None]
                if not dead:
                    continue
                try:
                    rank, ok, payload = results.get(timeout=2.0)
                except queue.Empty:
                    raise WorkerError(f"worker(s) {dead} exited (codes {[procs[i].exitcode for i in dead]}) "
                                      "without a result") from None
            if not ok:
                raise WorkerError(f"rank {rank} failed:\n{payload.decode()}")
            out[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=10.0 if len(out) == world else 0.1)
        for p in procs:
            if p.is_alive() and p.pid is not None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass  # exited between the liveness check and the kill
                p.join(timeout=5.0)
        results.close()
    return [out[r] for r in range(world)]
