"""Ending the command-line process without tearing the interpreter down.

A Python process that imported torch spends about half a second after its last statement tearing the
interpreter down: module dictionaries, then libtorch's C++ static destructors. Measured on the 2-core
reference machine: ``python -c "import torch"`` takes 1.6-2.6 s where the import itself takes 1.1-1.8 s,
and 0.03 s more with ``os._exit``. For ``convert`` of a 2.3 GiB model that is a sixth of the run, and no
command has anything left to do by then: each one writes, fsyncs and closes its output (and moves it into
place) before it returns.

So, once a command has returned, the command line does what the interpreter's exit does before its
teardown (the ``atexit`` handlers: logging's flush, temporary folders' finalizers, multiprocessing's joins;
then the standard streams flushed) and ends the process with ``os._exit``. It takes the normal exit
instead wherever that could differ: another Python thread still alive (the interpreter would wait for it),
a torch.distributed group still open (torchrun's workers end as torch expects), or an interpreter without
``atexit._run_exitfuncs``.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def leave(done: SystemExit) -> NoReturn:
    """End the process as ``raise done`` would, skipping the interpreter's teardown where that is safe."""
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_handlers is None or not _nothing_else_running():
        raise done
    code = _exit_status(done.code)
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: the interpreter's exit reports 120 for this
            code = code or 120
    os._exit(code)


def _nothing_else_running() -> bool:
    """Only this thread alive and no torch.distributed group open."""
    if threading.active_count() > 1:
        return False
    dist = sys.modules.get("torch.distributed")
    return dist is None or not (dist.is_available() and dist.is_initialized())


def _exit_status(code: object) -> int:
    """The status ``sys.exit(code)`` ends with: None is 0, an int itself, anything else printed and 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1
