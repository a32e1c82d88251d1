"""Which commands need which optional extra, and the one-line refusal when it is missing.

``pip install ckptbridge`` is the converter alone (``convert``, ``inspect``, ``compare``,
``list-architectures``): torch, safetensors and a few small libraries. The commands that run the
models themselves (``align``, ``converge``, ``gate``, ``example``) need the ``[align]`` extra
(megatron-core, transformers, ...). Checking before the command's own imports turns a deep
``ModuleNotFoundError`` into one line that names the extra to install.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Callable
from typing import Any

import click

#: extra -> (import name, distribution name) of what it installs; must agree with pyproject.toml
EXTRAS: dict[str, tuple[tuple[str, str], ...]] = {
    "align": (("megatron.core", "megatron-core"), ("transformers", "transformers"), ("accelerate", "accelerate"),
              ("pandas", "pandas"), ("matplotlib", "matplotlib")),
}

EXIT_USAGE = 2


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (a missing parent package counts as missing)."""
    top, _, _ = module.partition(".")
    return importlib.util.find_spec(top) is not None and importlib.util.find_spec(module) is not None


def missing(extra: str) -> list[str]:
    """Distributions of ``extra`` that are not installed."""
    return [dist for module, dist in EXTRAS[extra] if not _installed(module)]


def needs_extra(extra: str, command: click.Command) -> click.Command:
    """``command``, refusing to run (exit 2, one line naming the extra) when ``extra`` is not installed."""
    callback: Callable[..., Any] = command.callback  # type: ignore[assignment]

    @functools.wraps(callback)
    def checked(*args: Any, **kwargs: Any) -> Any:
        absent = missing(extra)
        if absent:
            click.secho(f"error: ckptbridge {command.name} needs the [{extra}] extra ({', '.join(absent)} not installed): "
                        f"pip install 'ckptbridge[{extra}]'", fg="red", err=True)
            sys.exit(EXIT_USAGE)
        return callback(*args, **kwargs)

    command.callback = checked
    return command
