"""A source file opened once and held from the checks to the last read.

Offsets parsed from a header are only valid for the bytes they were parsed from: reopening by path
later would read a file swapped in meanwhile at stale offsets. So every source file is opened once
(refused unless it is a regular file: a FIFO would block forever, a device is not a checkpoint),
read through that descriptor only, and checked at the end of a conversion: a file whose size or
modification time changed, or whose path now names another file, fails the conversion.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import FormatError


def regular_file(path: Path) -> os.stat_result:
    """``stat`` of ``path``, which must exist and be a regular file (symlinks followed)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FormatError(f"{path}: file is missing") from None
    except PermissionError:
        raise FormatError(f"{path}: permission denied") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "not a regular file"
        raise FormatError(f"{path}: is {kind}; a checkpoint file must be a regular file")
    return st


class HeldFile:
    """One open, regular source file and the identity it had when opened."""

    def __init__(self, path: Path):
        self.path = Path(path)
        regular_file(self.path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)  # never block, even if swapped for a FIFO
        except PermissionError:
            raise FormatError(f"{self.path}: permission denied") from None
        self._id = self._identity(os.fstat(self.fd))
        if not stat.S_ISREG(os.fstat(self.fd).st_mode):
            os.close(self.fd)
            raise FormatError(f"{self.path}: is not a regular file")

    @staticmethod
    def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    @property
    def size(self) -> int:
        return self._id[2]

    def check_unchanged(self) -> None:
        """Raise if the file was modified, or its path replaced, since it was opened."""
        now = self._identity(os.fstat(self.fd))
        try:
            at_path = self._identity(os.stat(self.path))
        except FileNotFoundError:
            at_path = None
        if now != self._id or at_path is None or at_path[:2] != self._id[:2]:
            raise FormatError(f"{self.path}: changed while it was being converted (modified, replaced or removed); "
                              "nothing was written")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
