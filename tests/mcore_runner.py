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
import signal
import socket
import time
import traceback
from typing import Any
from collections.abc import Callable

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
    results: mp.Queue[tuple[int, bool, bytes]],
    pg_timeout_s: float,
) -> None:
    import datetime

    import torch

    # Own process group, so that the parent can kill this worker together with anything it
    # started (megatron's writer processes, the checkpoint-results Manager) on timeout.
    os.setpgid(0, 0)
    ok, payload = True, b""
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
        # Plain pickle to bytes: torch tensors put on an mp.Queue directly are sent as
        # shared-memory handles that die with this process before the parent reads them.
        payload = pickle.dumps(fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - everything must reach the parent
        ok, payload = False, traceback.format_exc().encode()
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
        results.close()
        results.join_thread()
        # Return normally: multiprocessing then runs its own finalizers (shutting down e.g. a
        # Manager started by a torch_dist save) and os._exit()s without the parent's atexit
        # handlers.  An explicit os._exit here would orphan such Manager processes.


def _context() -> mp.context.BaseContext:
    """Workers fork from a forkserver that imported megatron-core and never ran torch kernels.

    Forking the pytest process itself is fast but unsafe once earlier tests have used torch's
    OpenMP thread pool (a forked child can hang in its first parallel region); the forkserver
    keeps the speed of fork (megatron is imported once, in the server) without that hazard.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "ckptbridge.mcore.model", "mcore_runner"])
    return ctx


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` forked gloo ranks.

    ``fn`` must be a module-level function (it is pickled by reference to the forkserver) and
    must return something picklable.  Returns the results ordered by rank.  Raises
    :class:`WorkerError` with the first failing worker's traceback, if a worker exits without
    a result, or when ``timeout`` seconds pass (all workers are then killed).
    """
    ctx = _context()
    results: mp.Queue[tuple[int, bool, bytes]] = ctx.Queue()
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
                        rank, ok, payload = results.get(timeout=1.0)
                    except queue.Empty:
                        raise WorkerError(
                            f"worker(s) {dead} exited (codes "
                            f"{[procs[i].exitcode for i in dead]}) without a result"
                        ) from None
                else:
                    continue
            if not ok:
                raise WorkerError(f"rank {rank} failed:\n{payload.decode()}")
            out[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=5.0 if len(out) == world_size else 0.1)
        for p in procs:
            if p.is_alive() and p.pid is not None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # the worker's own process group
                except ProcessLookupError:
                    pass
                p.join(timeout=5.0)
        results.close()
    return [out[r] for r in range(world_size)]
