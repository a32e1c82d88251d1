"""What the steps share while a gate runs: the resolved source, the work and report folders, and
the MCore checkpoints under test (made by ``convert``, or given as ``source.mcore``), so that
``roundtrip`` and ``align`` check the very files that ``convert`` wrote."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import GateConfig


@dataclass
class Candidate:
    """One MCore checkpoint under test; ``error`` is set (and ``path`` None) when making it failed."""

    label: str  # e.g. "tp2-pp2-torch_dist"; names the check and the folder
    path: Path | None
    ckpt_format: str | None = None  # "torch_dist" | "torch"; None when unknown (given as source.mcore)
    dtype: torch.dtype | None = None
    error: str | None = None


@dataclass
class GateContext:
    config: GateConfig
    hf: Path  # the HF checkpoint under test (given, from the HF cache, or random-init weights made in `work`)
    work: Path  # scratch space: conversions, exports, align's own files
    report_dir: Path
    candidates: list[Candidate] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # reports a step wrote (for summary.json's "files")

    @property
    def preset(self) -> str | None:
        return self.config.source.preset
