"""SIGINT and SIGTERM end a conversion like an error: the temporary folder is
removed, one line is printed, the exit status is 128 + the signal number.

While `handled` is active the signals raise `Interrupted` (a BaseException, so
no ``except Exception`` swallows it). When it is raised inside a Python callback
that C++ calls (torch.save writing through a file object), torch wraps it in a
RuntimeError; `handled` knows a signal arrived and reports the interrupt
instead of that wrapper. `deferred` holds signals back while a step must not
be cut in two (moving the finished folder into place, removing a temp folder).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The conversion was stopped by a signal. ``committed``: DST was already complete when it arrived."""

    def __init__(self, signum: int, committed: bool = False):
        self.signum = signum
        self.committed = committed
        self.exit_code = 128 + signum
        super().__init__(signal.Signals(signum).name)


class _State:
    signum: int | None = None
    defer = 0


def _handler(signum: int, frame: object) -> None:
    _State.signum = signum
    if not _State.defer:
        raise Interrupted(signum)


def received() -> int | None:
    """The signal that arrived while `handled` was active, if any."""
    return _State.signum


@contextmanager
def handled() -> Iterator[None]:
    """Turn SIGINT/SIGTERM into `Interrupted` for the block (main thread only: Python runs handlers there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _handler) for s in SIGNALS}
    _State.signum, _State.defer = None, 0
    try:
        yield
    except Interrupted:
        raise
    except BaseException:
        if _State.signum is None:
            raise
        raise Interrupted(_State.signum) from None  # what torch (or any C++ layer) wrapped
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _State.signum, _State.defer = None, 0


@contextmanager
def deferred() -> Iterator[None]:
    """Hold signals back for the block; `received` still tells whether one arrived."""
    _State.defer += 1
    try:
        yield
    finally:
        _State.defer -= 1
