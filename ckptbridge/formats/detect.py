"""Recognise a checkpoint folder and open it as a canonical tensor source."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from ..errors import FormatError
from ..staging import MARKER as STAGING_MARKER
from ..spec import ModelSpec, PlannedTensor
from .hf import HFSource
from .legacy import RANK_DIR, LegacySource
from .mcore_common import ASSETS_DIR, checkpoint_root, iteration_dir
from .torch_dist import TorchDistSource


class Source(Protocol):
    format: str
    spec: ModelSpec
    dtype: torch.dtype

    def verify(self) -> None: ...
    def read(self, pt: PlannedTensor) -> torch.Tensor: ...
    def close(self) -> None: ...


def detect_format(path: Path) -> str:
    """``hf``, ``torch_dist`` or ``torch`` (legacy)."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: does not exist")
    for folder in (path, path.parent):  # a staging folder, or an iteration folder inside one
        if (folder / STAGING_MARKER).exists():
            raise FormatError(f"{folder}: an unfinished ckptbridge output (it holds {STAGING_MARKER}); "
                              "not a checkpoint (convert --clean removes such leftovers)")
    if (path / "config.json").exists():
        return "hf"
    it = iteration_dir(path)
    if (it / "metadata.json").exists() or (it / ".metadata").exists():
        return "torch_dist"
    if any(RANK_DIR.match(p.name) for p in it.iterdir()):
        return "torch"
    raise FormatError(f"{it}: neither torch_dist (metadata.json) nor legacy (mp_rank_*) checkpoint")


def open_source(path: Path, expect: str | None = None) -> Source:
    """Open ``path``; ``expect`` is ``hf`` or ``mcore`` (from --src) and must agree with what is found."""
    fmt = detect_format(path)
    family = "hf" if fmt == "hf" else "mcore"
    if expect and expect != family:
        raise FormatError(f"{path}: --src {expect} given, but this is an {family} checkpoint ({fmt})")
    if fmt == "hf":
        return HFSource(path)
    it = iteration_dir(path)
    return TorchDistSource(it) if fmt == "torch_dist" else LegacySource(it)


def source_assets(path: Path, source: Source) -> list[Path]:
    if isinstance(source, HFSource):
        return source.assets()
    folder = checkpoint_root(Path(path)) / ASSETS_DIR
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
