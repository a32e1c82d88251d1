"""Where a conversion writes, and how its output replaces DST.

* **One writer per DST.** An exclusive ``flock`` on ``.<name>.ckptbridge-lock``
  beside DST is held for the whole conversion; a second conversion to the same
  DST (from any process, container or PID namespace on this machine) is refused
  and told who holds it. The lock file is removed when the holder is done.
* **Staging folders cannot be mistaken for checkpoints.** Output goes to
  ``.<name>.ckptbridge-tmp-<random>`` beside DST, which carries a `MARKER` file
  until it is complete; readers refuse a folder (or an iteration folder inside
  one) that has it. Failures, SIGINT and SIGTERM remove the folder.
* **Leftovers are named.** Any ``.<name>.ckptbridge-tmp-*`` / ``-old-*`` found
  while we hold the lock belongs to a conversion that died (SIGKILL, power
  loss): the next conversion to that DST lists them, and ``--clean`` removes them.
* **--force replaces atomically.** ``renameat2(RENAME_EXCHANGE)`` swaps the
  finished folder and DST in one step (DST is always either the old or the new
  checkpoint), then the old one is marked and removed. Where the kernel or
  filesystem cannot exchange, two renames are used (DST -> ``-old-<id>``, then
  the new folder -> DST); a run killed between them leaves DST missing and the
  ``-old-`` folder unmarked, and the next conversion to that DST renames it
  back before anything else. --force refuses a DST that is a mount point and a
  DST holding any file the source reaches (real paths of every source file,
  symlinks followed: an HF-cache snapshot whose blobs live in DST).
* **Durable.** Every file and folder is fsynced before the folder is moved into
  place, and the parent folder after.

Test hooks (documented, inert unless set): ``CKPTBRIDGE_TEST_STOP_AT=<point>``
makes the process SIGSTOP itself at that point (``staged``, ``half``,
``written``, ``exchanged``, ``moved-old``) so a test can kill it exactly there;
``CKPTBRIDGE_TEST_NO_EXCHANGE=1`` takes the two-rename path of --force.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import interrupts
from .errors import DestinationError
from .fileio import WriteError, write_text
from .formats.mcore_common import checkpoint_root

MARKER = ".ckptbridge-staging"
STOP_ENV = "CKPTBRIDGE_TEST_STOP_AT"
NO_EXCHANGE_ENV = "CKPTBRIDGE_TEST_NO_EXCHANGE"
_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def stop_point(name: str) -> None:
    """Test hook: stop this process (SIGSTOP) at the named point when ``CKPTBRIDGE_TEST_STOP_AT`` says so.

    A signal sent while stopped is delivered on SIGCONT to any thread (torch's worker threads too); Python
    runs its handler in the main thread at the next check. The short sleep after waking lets it arrive here,
    at the point the test means, rather than a few statements later."""
    if os.environ.get(STOP_ENV) == name:
        os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(0.2)


def gib(n: float) -> str:
    """A byte count for a person: 512 B, 3.1 MiB, 2.15 GiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{int(n)} B"


def _prefix(dst: Path) -> str:
    return f".{dst.name}.ckptbridge-"


# ---------------------------------------------------------------- checks before anything is written


def check_destination(src: Path, dst: Path, force: bool) -> None:
    """DST may not overlap SRC, and may exist only with --force."""
    s, d = Path(src).resolve(), Path(dst).resolve()
    if s == d or s in d.parents or d in s.parents:
        raise DestinationError(f"destination {dst} overlaps the source {src}; the source is never modified")
    if os.path.lexists(d) and not force:
        raise DestinationError(f"destination {dst} exists; pass --force to replace it")


def source_reaches(src: Path) -> Iterator[tuple[Path, Path]]:
    """(path as found, real path) of every file and folder under the source's checkpoint root, symlinks followed."""
    root = checkpoint_root(Path(src))
    seen: set[str] = set()
    for top, dirs, files in os.walk(root, followlinks=True):
        real_top = os.path.realpath(top)
        if real_top in seen:  # a symlink cycle
            dirs[:] = []
            continue
        seen.add(real_top)
        yield Path(top), Path(real_top)
        for name in files:
            yield Path(top) / name, Path(os.path.realpath(os.path.join(top, name)))


def check_replaceable(src: Path, dst: Path) -> None:
    """An existing DST that --force is about to remove: not a mount point, and nothing the source needs."""
    if os.path.ismount(dst):
        raise DestinationError(f"destination {dst} is a mount point; --force cannot replace it "
                               f"(write to a folder inside it instead)")
    for path, real in source_reaches(src):
        if real == dst or dst in real.parents:
            raise DestinationError(f"--force would delete {real}, which the source reaches through {path}; "
                                   f"choose another destination")


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


# ---------------------------------------------------------------- the lock


class DestinationLock:
    """An exclusive flock on ``.<name>.ckptbridge-lock`` beside DST; the file says who holds it."""

    def __init__(self, dst: Path):
        self.path = dst.parent / f"{_prefix(dst)}lock"
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process that has not said who it is"
                os.close(fd)
                raise DestinationError(f"destination {dst} is being written by another conversion "
                                       f"({holder}; lock {self.path})") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file its last holder unlinked while we waited for it
                break
            os.close(fd)
        self.fd = fd
        holder = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)

    def release(self) -> None:
        os.unlink(self.path)  # while still held: a waiter that opened it sees it is gone and retries
        os.close(self.fd)


# ---------------------------------------------------------------- leftovers


@dataclass(frozen=True)
class Leftover:
    """A folder (or file) an interrupted conversion left beside DST."""

    path: Path
    bytes: int
    complete: bool  # no marker: a finished output, or an old DST a two-step --force moved aside

    def describe(self) -> str:
        what = "complete, unmarked" if self.complete else "partial, marked"
        return f"{self.path} ({gib(self.bytes)}, {what})"


def _tree_bytes(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    return sum((Path(top) / f).lstat().st_size for top, _, files in os.walk(path) for f in files)


def find_leftovers(dst: Path) -> list[Leftover]:
    prefix = _prefix(dst)
    out = []
    for p in sorted(dst.parent.iterdir()):
        if p.name.startswith(prefix) and p.name[len(prefix):].startswith(("tmp-", "old-")):
            out.append(Leftover(p, _tree_bytes(p), not (p / MARKER).exists()))
    return out


def _mark(folder: Path, state: str) -> None:
    write_text(folder / MARKER, json.dumps({"state": state, "pid": os.getpid(), "host": socket.gethostname(),
                                             "time": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")


def remove(path: Path) -> None:
    """Remove a staging folder or an old DST: marked first, so no reader takes a half-removed folder."""
    if path.is_dir() and not path.is_symlink():
        _mark(path, "removing")
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _recover(dst: Path) -> Path | None:
    """DST missing and an unmarked ``-old-`` folder beside it: a two-step --force died between its renames."""
    if os.path.lexists(dst):
        return None
    olds = [p for p in find_leftovers(dst) if p.complete and p.path.name.startswith(f"{_prefix(dst)}old-")]
    if not olds:
        return None
    newest = max(olds, key=lambda p: p.path.lstat().st_mtime).path
    os.rename(newest, dst)
    return newest


# ---------------------------------------------------------------- renames


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2``; False where the C library, kernel or filesystem lacks it (the caller falls back)."""
    if os.environ.get(NO_EXCHANGE_ENV) == "1":
        return False
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _sync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (so a rename never publishes data still in the page cache)."""
    for top, dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(top, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(top))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, dst: Path) -> None:
    """Move the finished ``tmp`` to ``dst``, replacing what is there (the caller checked --force)."""
    _sync_tree(tmp)
    (tmp / MARKER).unlink()
    if not os.path.lexists(dst):
        if not _renameat2(tmp, dst, _RENAME_NOREPLACE):
            if os.path.lexists(dst):
                raise DestinationError(f"destination {dst} appeared during conversion")
            os.rename(tmp, dst)
    elif _renameat2(tmp, dst, _RENAME_EXCHANGE):
        stop_point("exchanged")
        remove(tmp)  # now the old DST
    else:
        old = dst.parent / f"{_prefix(dst)}old-{uuid.uuid4().hex[:12]}"
        os.rename(dst, old)
        stop_point("moved-old")
        try:
            os.rename(tmp, dst)
        except BaseException:
            os.rename(old, dst)
            raise
        remove(old)
    _fsync_dir(dst.parent)


# ---------------------------------------------------------------- the staging context


@dataclass
class Staging:
    """The folder being written, and what was found beside DST on the way in."""

    folder: Path
    leftovers: list[Leftover]  # left by interrupted conversions, still there
    cleaned: list[Leftover]  # removed by --clean
    restored: Path | None  # an old DST moved back into place (a two-step --force that died half-way)

    def progress(self, inner: Callable[[int], None], total: int) -> Callable[[int], None]:
        """``inner`` plus the ``half`` test stop point."""
        done = [0]

        def advance(n: int) -> None:
            before = done[0]
            done[0] += n
            if before * 2 < total <= done[0] * 2:
                stop_point("half")
            inner(n)

        return advance


@contextmanager
def staged(src: Path, dst: Path, force: bool, clean: bool, need_bytes: int) -> Iterator[Staging]:
    """A marked folder beside ``dst`` that replaces it only if the block completes; see the module doc."""
    dst = Path(dst).resolve()
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        lock = DestinationLock(dst)
    except OSError as exc:
        raise DestinationError(f"cannot prepare {dst}: {exc.strerror} ({exc.filename})") from None
    try:
        restored = _recover(dst)
        leftovers, cleaned = find_leftovers(dst), []
        if clean:
            with interrupts.deferred():
                for left in leftovers:
                    remove(left.path)
            leftovers, cleaned = [], leftovers
        check_destination(src, dst, force)
        if os.path.lexists(dst):
            check_replaceable(src, dst)
        free = free_bytes(dst.parent)
        if free < need_bytes:
            raise DestinationError(f"not enough space for {dst}: the output needs {gib(need_bytes)}, "
                                   f"{gib(free)} free on its filesystem{_hint(leftovers)}")
        tmp = dst.parent / f"{_prefix(dst)}tmp-{uuid.uuid4().hex[:12]}"
        try:
            tmp.mkdir()
        except OSError as exc:
            raise DestinationError(f"cannot create the temporary folder {tmp}: {exc.strerror}") from None
        state = Staging(tmp, leftovers, cleaned, restored)
        try:
            _mark(tmp, "writing")
            stop_point("staged")
            yield state
            stop_point("written")
        except BaseException as exc:
            with interrupts.deferred():
                remove(tmp)
            if isinstance(exc, WriteError) and exc.disk_full:
                raise DestinationError(f"{exc}: the output needs {gib(need_bytes)}, {gib(free_bytes(dst.parent))} "
                                       f"free on its filesystem with the partial output removed{_hint(leftovers)}") from None
            raise
        with interrupts.deferred():
            try:
                _commit(tmp, dst)
            except BaseException as exc:
                if tmp.exists():
                    remove(tmp)
                if isinstance(exc, OSError):
                    raise DestinationError(f"cannot move the finished output into place at {dst}: {exc}") from None
                raise
        if interrupts.received() is not None:
            raise interrupts.Interrupted(interrupts.received(), committed=True)
    finally:
        lock.release()


def _hint(leftovers: list[Leftover]) -> str:
    if not leftovers:
        return ""
    held = sum(left.bytes for left in leftovers)
    return f"; leftovers of interrupted conversions hold {gib(held)} beside it (--clean removes them)"
