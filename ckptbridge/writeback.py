"""Start the disk on a destination file while the conversion is still filling it.

A conversion fsyncs its staged output before the final rename (a rename must never publish bytes that
are still only in the page cache). Left to itself the kernel writes dirty pages back late (after 30 s,
or once 10 % of memory is dirty), so that fsync waited for most of the output: 0.5-0.7 s of a 2.3 GiB
model on the reference machine, a quarter of the conversion, and past the dirty limit every writer
stalls. Asking the kernel to start writing a file back after every `STEP` bytes written to it (Linux
``sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)``, which queues the I/O and does not wait for it)
overlaps the disk with the copy: the final fsync finds the pages clean, and a durable kernel-side copy
takes about as long as ``cp``, which never syncs.

This is a hint only. Durability still comes from the fsync of every staged file, which reports any
I/O error; so the call's own result is not checked, and on a system without the call nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from collections.abc import Callable

#: bytes written to one file between two requests to start its writeback
STEP = 64 * 2**20
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h


def _load() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    call = getattr(libc, "sync_file_range", None)
    if call is None:
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


_sync_file_range = _load()
_pending: dict[int, int] = {}  # fd -> bytes written since its last request
_lock = threading.Lock()


def available() -> bool:
    """Whether this system can start writeback early (Linux); elsewhere the final fsync does it all."""
    return _sync_file_range is not None


def written(fd: int, nbytes: int) -> bool:
    """Note ``nbytes`` just written to ``fd``; every `STEP` bytes, ask the kernel to start writing the
    file's dirty pages to disk. Returns whether it asked. Called by every writer in `fileio`, from any
    thread (a descriptor number reused after a close only moves its next request earlier)."""
    if _sync_file_range is None or nbytes <= 0:
        return False
    with _lock:
        total = _pending.get(fd, 0) + nbytes
        due = total >= STEP
        _pending[fd] = 0 if due else total
    if due:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
    return due


def forget(fd: int) -> None:
    """``fd`` is closed (or about to be): its count starts again for the next file given that number."""
    with _lock:
        _pending.pop(fd, None)
