"""The command line ends without the interpreter's teardown (`quick_exit`), and exits as a normal exit would."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ckptbridge.quick_exit import _exit_status


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=120)


def test_exit_status_as_sys_exit() -> None:
    assert _exit_status(None) == 0
    assert _exit_status(3) == 3
    assert _exit_status(True) == 1
    assert _exit_status(256 + 2) == 2  # what the operating system keeps of it


def test_message_exit_prints_and_is_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_status("went wrong") == 1
    assert capsys.readouterr().err == "went wrong\n"


def test_success_error_and_usage_codes() -> None:
    ok = subprocess.run([sys.executable, "-m", "ckptbridge", "list-architectures"], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0 and "llama" in ok.stdout and ok.stdout.endswith("\n")  # every line flushed
    usage = subprocess.run([sys.executable, "-m", "ckptbridge", "convert", "--src", "hf"], capture_output=True,
                           text=True, timeout=120)
    assert usage.returncode == 2 and "Missing argument" in usage.stderr


def test_atexit_handlers_still_run(tmp_path: Path) -> None:
    """What a normal exit does before its teardown still happens: atexit handlers, flushed streams."""
    mark = tmp_path / "ran"
    done = _python(f"""
        import atexit, sys
        atexit.register(lambda: open({str(mark)!r}, "w").write("yes"))
        sys.argv = ["ckptbridge", "--version"]
        from ckptbridge.cli import run
        run()
        """)
    assert done.returncode == 0, done.stderr
    assert "version" in done.stdout
    assert mark.read_text() == "yes"


def test_waits_for_other_threads(tmp_path: Path) -> None:
    """A thread still running at the end: the normal exit, which waits for it."""
    mark = tmp_path / "thread"
    done = _python(f"""
        import sys, threading, time
        def late():
            time.sleep(0.5)
            open({str(mark)!r}, "w").write("done")
        threading.Thread(target=late).start()
        sys.argv = ["ckptbridge", "--version"]
        from ckptbridge.cli import run
        run()
        """)
    assert done.returncode == 0, done.stderr
    assert mark.read_text() == "done"
