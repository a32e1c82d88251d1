"""Run a function on N gloo ranks in forked worker processes (test helper).

Forking from a parent that already imported torch + megatron-core makes every multi-process
scenario cost well under a second instead of ~6 s of re-imports per worker with ``spawn``
(see /work/shared/notes/mcore-on-cpu.md).  The parent must not have initialised a process
group or started torch's intra-op thread pool in a way that breaks after fork; plain CPU
tensor work in the parent is fine.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from typing import Any, Callable

__all__ = ["run_distributed", "WorkerError", "free_port"]


class WorkerError(RuntimeError):
    """A worker raised, died or timed out; the message carries its traceback."""


def free_port() -> int:
    """Return a currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    args: tuple[Any, ...],
    results: "mp.Queue[tuple[int, bool, Any]]",
    pg_timeout_s: float,
) -> None:
    import datetime

    import torch

    ok, payload = True, None
    try:
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
        )
        torch.set_num_threads(max(1, 2 // world_size))
        torch.distributed.init_process_group(
            backend="gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
        )
        payload = fn(rank, world_size, *args)
        pickle.dumps(payload)  # fail here (with a traceback) rather than in the queue thread
    except BaseException:  # noqa: BLE001 - everything must reach the parent
        ok, payload = False, traceback.format_exc()
    try:
        results.put((rank, ok, payload))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                if ok:
                    dist.barrier()
                dist.destroy_process_group()
        except BaseException:  # noqa: BLE001
            pass
        # Skip interpreter teardown (atexit handlers inherited from the parent, e.g. pytest's).
        results.close()
        results.join_thread()
        os._exit(0)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` forked gloo ranks.

    ``fn`` must be picklable-result-returning; it may be a closure or lambda since workers are
    forked (nothing is pickled on the way in).  Returns the results ordered by rank.  Raises
    :class:`WorkerError` with the first failing worker's traceback, if a worker exits without
    a result, or when ``timeout`` seconds pass (all workers are then killed).
    """
    ctx = mp.get_context("fork")
    results: "mp.Queue[tuple[int, bool, Any]]" = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, rank, world_size, port, args, results, max(timeout, 10.0)),
            # not daemonic: megatron's torch_dist save forks writer processes (and S1's
            # Manager), which daemonic processes may not do; the finally below reaps them.
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()

    deadline = time.monotonic() + timeout
    out: dict[int, Any] = {}
    try:
        while len(out) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerError(
                    f"timeout after {timeout:.0f}s; results from ranks {sorted(out)} only"
                )
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = [
                    i
                    for i, p in enumerate(procs)
                    if i not in out and p.exitcode is not None
                ]
                if dead:
                    # Give a dying worker's queued traceback a moment to arrive.
                    try:
                        rank, ok, payload = results.get(timeout=2.0)
                    except queue.Empty:
                        raise WorkerError(
                            f"worker(s) {dead} exited (codes "
                            f"{[procs[i].exitcode for i in dead]}) without a result"
                        ) from None
                else:
                    continue
            if not ok:
                raise WorkerError(f"rank {rank} failed:\n{payload}")
            out[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=5.0 if len(out) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
        results.close()
    return [out[r] for r in range(world_size)]
