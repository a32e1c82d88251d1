"""Keep megatron's, TransformerEngine-absence and library warnings out of the terminal.

Importing megatron-core without TransformerEngine/Apex prints ~40 ``UserWarning`` lines, loading
prints progress bars, and forked MCore workers write to the inherited stderr.  During an align
run everything written to stderr -- Python's ``sys.stderr`` (warnings, logging, tqdm) *and* file
descriptor 2 (C code, worker processes) -- goes to a log file instead; afterwards one line says
how many warnings there were, of which kind, and where the log is.  Nothing is dropped: the log
keeps every line, and a crash's traceback is appended to it.  ``align`` and ``converge`` both use it;
:attr:`Collected.terminal` still reaches the real stderr, for a command's own progress lines.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

_WARNING = re.compile(r"^\S.*?:\d+: (\w*Warning): (.*)$")
_ABSENT = re.compile(r"Transformer ?Engine|Apex|not installed|TE is not", re.IGNORECASE)


@dataclass
class Collected:
    """Where stderr went; :meth:`summary` reads it back after the block."""

    path: Path
    terminal: TextIO  # the stderr the user sees (for progress lines the command itself prints)

    def summary(self) -> str:
        text = self.path.read_text(errors="replace") if self.path.exists() else ""
        found = [m for m in (_WARNING.match(line) for line in text.splitlines()) if m]
        if not found:
            return f"stderr of the run (no warnings) is in {self.path}"
        absent = sum(1 for m in found if _ABSENT.search(m.group(2)))
        kinds = sorted({m.group(1) for m in found})
        return (f"{len(found)} warnings collected ({absent} about TransformerEngine/Apex being absent; "
                f"{', '.join(kinds)}) in {self.path}")


@contextlib.contextmanager
def collected_stderr(path: Path) -> Iterator[Collected]:
    """Redirect ``sys.stderr`` and fd 2 to ``path`` for the block (restored even on error)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    previous = sys.stderr
    with open(path, "w", buffering=1, errors="replace") as log:
        saved_fd = _redirect_fd2(log)
        terminal = _terminal(previous, saved_fd)
        try:
            with contextlib.redirect_stderr(log):
                yield Collected(path, terminal)
        finally:
            log.flush()
            if terminal is not previous:
                terminal.close()
            if saved_fd is not None:
                os.dup2(saved_fd, 2)
                os.close(saved_fd)


def _terminal(previous: TextIO, saved_fd: int | None) -> TextIO:
    """A stream to what stderr was before the block: ``previous`` itself, unless it writes to fd 2
    (now the log), then a new stream on the saved descriptor."""
    try:
        on_fd2 = previous.fileno() == 2
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        on_fd2 = False
    if on_fd2 and saved_fd is not None:
        return os.fdopen(os.dup(saved_fd), "w", buffering=1, errors="replace")
    return previous


def _redirect_fd2(log: io.TextIOWrapper) -> int | None:
    """Point fd 2 at the log; ``None`` where there is no fd 2 to move (some embedded interpreters)."""
    try:
        saved = os.dup(2)
    except OSError:
        return None
    os.dup2(log.fileno(), 2)
    return saved
