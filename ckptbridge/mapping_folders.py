"""Where mapping files come from besides the shipped ones: ``$CKPTBRIDGE_MAPPINGS`` and ``--mappings DIR``.

Kept apart from the registry (which imports torch to prove each mapping's inverse) so that the command
line can take ``--mappings`` before, or without, loading any mapping: ``ckptbridge --help`` needs no torch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .errors import MappingError

#: environment variable naming user mapping folders (separated like PATH)
ENV_VAR = "CKPTBRIDGE_MAPPINGS"
_given: list[Path] = []
_generation = 0


def set_user_folders(folders: Sequence[Path]) -> None:
    """Folders given on the command line (``--mappings DIR``); read after ``$CKPTBRIDGE_MAPPINGS``. Each call
    starts a new `generation`: the registry rereads the folders, whose files may have changed meanwhile."""
    global _generation
    _given[:] = [Path(f) for f in folders]
    _generation += 1


def generation() -> int:
    return _generation


def user_folders() -> list[Path]:
    env = [Path(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    out = env + _given
    for f in out:
        if not f.is_dir():
            raise MappingError(f"mapping folder {f} (from --mappings or ${ENV_VAR}) is not a folder")
    return out
