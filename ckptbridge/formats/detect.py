"""Recognise a checkpoint folder and open it as a canonical tensor source."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from ..errors import FormatError
from ..staging import MARKER as STAGING_MARKER
from ..spec import ModelSpec, PlannedTensor
from ..config_source import ConfigOptions
from .hf import HFSource, asset_files
from .legacy import RANK_DIR, LegacySource
from .mcore_common import ASSETS_DIR, checkpoint_root, iteration_dir
from .torch_dist import TorchDistSource


class Source(Protocol):
    format: str
    spec: ModelSpec
    dtype: torch.dtype
    planned: tuple[PlannedTensor, ...]  # ``spec.planned()``, computed once when the source is opened


    def verify(self) -> None: ...
    def read(self, pt: PlannedTensor) -> torch.Tensor: ...
    def check_unchanged(self) -> None: ...
    def close(self) -> None: ...


def detect_format(path: Path, iteration: int | None = None) -> str:
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
    it = iteration_dir(path, iteration)
    if (it / "metadata.json").exists() or (it / ".metadata").exists():
        return "torch_dist"
    if any(RANK_DIR.match(p.name) for p in it.iterdir()):
        return "torch"
    raise FormatError(f"{it}: neither torch_dist (metadata.json) nor legacy (mp_rank_*) checkpoint")


def open_source(path: Path, expect: str | None = None, config: ConfigOptions | None = None,
                iteration: int | None = None) -> Source:
    """Open ``path``; ``expect`` is ``hf`` or ``mcore`` (from --src) and must agree with what is found.
    ``config`` says where an MCore checkpoint's HF config comes from when ckptbridge did not write it;
    ``iteration`` picks an ``iter_NNNNNNN`` folder instead of the tracker's."""
    fmt = detect_format(path, iteration)
    family = "hf" if fmt == "hf" else "mcore"
    if expect and expect != family:
        raise FormatError(f"{path}: --src {expect} given, but this is an {family} checkpoint ({fmt})")
    if fmt == "hf":
        return HFSource(path)
    it = iteration_dir(path, iteration)
    return TorchDistSource(it, config) if fmt == "torch_dist" else LegacySource(it, config)


def source_assets(path: Path, source: Source, config: ConfigOptions | None = None) -> list[Path]:
    """Tokenizer and generation-config files that travel with a conversion: the HF folder's, else those
    of the ``--hf-config`` folder, else those ckptbridge stored beside an MCore checkpoint."""
    if isinstance(source, HFSource):
        return source.assets()
    if config is not None and config.asset_folder() is not None:
        return asset_files(config.asset_folder())
    bridge_tokenizer = getattr(source, "iter_dir", Path()) / "tokenizer"  # Megatron-Bridge keeps the HF tokenizer here
    if getattr(source, "common", None) is not None and source.common.producer == "Megatron-Bridge" \
            and bridge_tokenizer.is_dir():
        return asset_files(bridge_tokenizer)
    folder = checkpoint_root(Path(path)) / ASSETS_DIR
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def source_notes(source: Source) -> tuple[str, ...]:
    """What a user must know about an MCore source: who wrote it, where its HF config came from, what
    was left out (optimizer state is never converted)."""
    if isinstance(source, HFSource):
        return source.notes  # e.g. an FP8 source that was dequantized
    common = getattr(source, "common", None)
    if common is None:
        return ()
    out = [f"source: {common.producer} checkpoint, iteration {common.iteration}; HF config: {common.origin}"]
    skipped = source.training_state()
    if skipped.entries:
        out.append(f"dropped training state: {skipped.describe()}")
    return (*out, *common.notes)
