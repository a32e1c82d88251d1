"""Writes that never lose bytes silently.

``os.write``/``os.pwrite`` may write fewer bytes than asked (Linux caps one
call at 2,147,479,552 bytes; a nearly full disk or a signal can cut one
short), so every writer of ckptbridge goes through `pwrite_all` or
`CheckedFile`, which loop until every byte is written and turn a full disk
(ENOSPC, EDQUOT) or a file-size limit (EFBIG) into a one-line `WriteError`
naming the file. `check_size` then compares each finished file with the size
the plan gives it.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import writeback
from .errors import CkptBridgeError

# Linux writes at most this many bytes per write()/pwrite() call (MAX_RW_COUNT).
MAX_WRITE = 0x7FFFF000
# buffers one pwritev() call may gather (IOV_MAX; 1024 on Linux)
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") and "SC_IOV_MAX" in os.sysconf_names else 1024
_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
         errno.EFBIG: "file too large (file-size limit reached)"}


class WriteError(CkptBridgeError):
    """A file of the output could not be written whole (disk full, quota, file-size limit, I/O error)."""

    def __init__(self, path: Path | str, reason: str, disk_full: bool):
        super().__init__(f"cannot write {path}: {reason}")
        self.path = Path(path)
        self.reason = reason
        self.disk_full = disk_full


def _error(path: Path | str, exc: OSError) -> WriteError:
    reason = _FULL.get(exc.errno or 0, exc.strerror or str(exc))
    return WriteError(path, reason, exc.errno in (errno.ENOSPC, errno.EDQUOT))


def _call(write: Callable[[], int], path: Path | str) -> int:
    """One write system call, repeated when a signal interrupts it; its failure a one-line `WriteError`."""
    while True:
        try:
            return write()
        except InterruptedError:
            continue
        except OSError as exc:
            raise _error(path, exc) from None


def pwrite_all(fd: int, data: Any, offset: int | None, path: Path | str, cap: int = MAX_WRITE) -> int:
    """Write every byte of ``data`` at ``offset`` (at the file position when None); returns the count.

    ``cap`` bounds one system call (the kernel's own limit by default); tests pass a small one to
    exercise the loop on short writes. Writes go in pieces of at most `writeback.STEP` bytes, each
    followed by `writeback.written`, so the disk writes while the rest is still being produced.
    """
    view = memoryview(data).cast("B")
    done = 0
    step = min(cap, writeback.STEP)
    while done < len(view):
        chunk = view[done:done + step]
        n = _call(lambda: os.write(fd, chunk) if offset is None else os.pwrite(fd, chunk, offset + done), path)
        if n <= 0:
            raise WriteError(path, f"the system accepted {done} of {len(view)} bytes and then none", True)
        done += n
        writeback.written(fd, n)
    return done


def pwritev_all(fd: int, pieces: Sequence[memoryview], offset: int, path: Path | str) -> int:
    """Write ``pieces`` back to back at ``offset`` with as few ``pwritev`` calls as the system allows (it
    gathers up to IOV_MAX buffers a call); returns the count. Short writes continue where they stopped, as
    `pwrite_all` does; a full disk is a `WriteError`. On any error the views this function made of
    ``pieces`` are dropped before it raises, so the caller can close the mapping they point into."""
    todo = [p for p in pieces if len(p)]
    total = sum(p.nbytes for p in todo)
    done, first = 0, 0
    batch: list[memoryview] = []
    try:
        while first < len(todo):
            batch = todo[first:first + _IOV_MAX]
            n = _call(lambda: os.pwritev(fd, batch, offset + done), path)
            if n <= 0:
                raise WriteError(path, f"the system accepted {done} of {total} bytes and then none", True)
            done += n
            writeback.written(fd, n)
            for size in [b.nbytes for b in batch]:  # drop what was written; a piece cut short keeps its tail
                if n < size:
                    todo[first] = todo[first].cast("B")[n:]
                    break
                n -= size
                first += 1
    except BaseException:  # no view of the caller's buffers may outlive this frame in the traceback
        todo.clear()
        batch.clear()
        raise
    return done


def write_bytes(path: Path, data: bytes) -> None:
    """``Path.write_bytes`` with every byte checked and the size verified."""
    with CheckedFile(path) as f:
        f.write(data)
    check_size(path, len(data))


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def copy_file(src: Path, dst: Path, chunk: int = 16 * 2**20) -> None:
    """Copy ``src`` (an asset: tokenizer, generation config) to ``dst`` with checked writes and its mode/times."""
    size = 0
    with open(src, "rb") as f, CheckedFile(dst) as out:
        while block := f.read(chunk):
            size += out.write(block)
    check_size(dst, size)
    shutil.copystat(src, dst)


def check_size(path: Path, expected: int) -> None:
    """The file at ``path`` must hold exactly ``expected`` bytes (what the plan laid out)."""
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise _error(path, exc) from None
    if size != expected:
        raise WriteError(path, f"holds {size} bytes after writing, the plan gives it {expected}", False)


class CheckedFile(io.RawIOBase):
    """A writable, seekable file object whose ``write`` writes everything or raises `WriteError`.

    torch.save writes through Python callbacks and wraps any exception they raise in a RuntimeError;
    `saving` unwraps it again so the caller sees the one-line `WriteError`.
    """

    def __init__(self, path: Path, cap: int = MAX_WRITE):
        super().__init__()
        self.path = Path(path)
        self.cap = cap
        self.error: WriteError | None = None
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            raise _error(path, exc) from None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            return pwrite_all(self.fd, data, None, self.path, self.cap)
        except WriteError as exc:
            self.error = exc
            raise

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        return os.lseek(self.fd, pos, whence)

    def tell(self) -> int:
        return os.lseek(self.fd, 0, io.SEEK_CUR)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if not self.closed:
            writeback.forget(self.fd)
            os.close(self.fd)
        super().close()

    def saving(self, obj: Any, save: Any = None) -> None:
        """``torch.save(obj, self)`` (or ``save(obj, self)``), raising our `WriteError` rather than torch's
        wrapper around it."""
        import torch

        try:
            (save or torch.save)(obj, self)
        except Exception:
            if self.error is not None:
                raise self.error from None
            raise


#: errors after which a kernel-side copy is retried through user space (another file system on an
#: older kernel, a file system or file type that refuses copy_file_range, a kernel without it)
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.ETXTBSY, errno.EPERM}


def copy_range_all(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int, path: Path | str,
                   fast: bool = True, cap: int = MAX_WRITE) -> bool:
    """Copy ``length`` bytes at ``src_offset`` of ``src_fd`` to ``dst_offset`` of ``dst_fd`` (the file at ``path``),
    inside the kernel (``copy_file_range``) when ``fast`` and the system allows it, else through a buffer with
    `pwrite_all`; returns whether the kernel copied. Short copies loop, as writes do; a full disk is a `WriteError`.
    A source that ends early (truncated behind our back) is a `WriteError` too: nothing partial is installed."""
    done = 0
    if fast and hasattr(os, "copy_file_range"):
        while done < length:
            try:
                n = os.copy_file_range(src_fd, dst_fd, min(cap, writeback.STEP, length - done), src_offset + done,
                                       dst_offset + done)
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno in _NO_KERNEL_COPY:
                    break  # refused: the rest through user space
                raise _error(path, exc) from None
            if n <= 0:
                raise WriteError(path, f"the source ended after {done} of {length} bytes to copy", False)
            done += n
            writeback.written(dst_fd, n)
        if done == length:
            return True
    chunk = 64 * 2**20
    buf = bytearray(min(chunk, max(length - done, 0)))
    view = memoryview(buf)
    while done < length:
        want = min(chunk, length - done)
        try:
            n = os.preadv(src_fd, [view[:want]], src_offset + done)
        except InterruptedError:
            continue
        if n <= 0:
            raise WriteError(path, f"the source ended after {done} of {length} bytes to copy", False)
        pwrite_all(dst_fd, view[:n], dst_offset + done, path, cap)
        done += n
    return False
