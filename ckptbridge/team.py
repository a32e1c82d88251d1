"""Several processes converting one checkpoint together, and launching them.

``torchrun --nproc-per-node N -m ckptbridge convert ...`` (on one node or several sharing a file
system) starts N copies of the same command; each joins a gloo group over torchrun's ``env://``
rendezvous (CPU only: the processes only exchange a few small objects), plans the whole conversion,
writes its share of whole output files (`workshare`), and reports to the others. Rank 0 prepares the
staging folder and tells the others where it is, and, once every rank reported success, writes the
index files and moves the folder into place. ``convert --workers N`` runs that launch on this
machine; then the launching process itself holds the destination's lock and staging folder (handed
to the workers in ``CKPTBRIDGE_STAGING``), so a worker killed outright, rank 0 included, still leaves
neither DST nor the staging folder behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from .errors import WorkerError

STAGING_ENV = "CKPTBRIDGE_STAGING"  # set by the --workers launcher: the folder its workers write into
#: how long a rank waits for the others at a collective: the slowest rank's whole share of the writing
#: (a worker that dies is noticed at once, its connections close)
WAIT = timedelta(hours=24)


@dataclass(frozen=True)
class Team:
    """This process's rank among ``size`` processes converting together (a team of one: no torchrun)."""

    rank: int = 0
    size: int = 1

    def share(self, value: Any) -> Any:
        """Rank 0's ``value``, on every rank."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        self._collective(lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if self.size == 1:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        self._collective(lambda: dist.all_gather_object(out, value))
        return out

    @staticmethod
    def _collective(run) -> None:  # noqa: ANN001
        try:
            run()
        except RuntimeError as exc:  # gloo: a peer's connection closed (it died) or the wait ran out
            raise WorkerError(f"a worker stopped before the others finished ({str(exc).splitlines()[0]}); "
                              "nothing was installed") from None

    def close(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def join() -> Team:
    """This process's place in a torchrun launch (``WORLD_SIZE`` > 1), else a team of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return Team()
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://", timeout=WAIT)
    return Team(dist.get_rank(), dist.get_world_size())


def given_staging() -> Path | None:
    """The staging folder a --workers launcher prepared for this worker, if any."""
    given = os.environ.get(STAGING_ENV)
    return Path(given) if given else None


def worker_args(argv: Sequence[str]) -> list[str]:
    """The command line (after the program name) with ``--workers N`` / ``--workers=N`` removed."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out


def launch(args: Sequence[str], workers: int, staging: Path) -> None:
    """Run ``ckptbridge <args>`` as ``workers`` processes under torchrun on this machine, writing into
    ``staging``; raise `WorkerError` unless all of them succeed."""
    env = {**os.environ, STAGING_ENV: str(staging)}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
           "-m", "ckptbridge", *args]
    proc = subprocess.Popen(cmd, env=env)
    try:
        code = proc.wait()
    except BaseException:  # interrupted: stop the workers before the staging folder is removed
        proc.terminate()
        proc.wait()
        raise
    if code:
        raise WorkerError(f"{workers} workers under torchrun: exit status {code} (their errors are above); "
                          "nothing was installed")
