"""Shared fixtures: tiny seeded HF models built from real configs (no model hub here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptbridge.presets import build_tiny_hf

from helpers import DENSE_PRESETS, MOE_PRESETS


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> dict[str, Path]:
    """One 4-layer fp32 model per dense preset (4 layers: room for VPP 2 x PP 2 and uneven stages)."""
    root = tmp_path_factory.mktemp("tiny_hf")
    return {name: build_tiny_hf(name, root / name, layers=4, seed=i) for i, name in enumerate(DENSE_PRESETS)}


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory) -> dict[str, Path]:
    """One 2-layer fp32 model per MoE preset, 8 experts, top-2 (EP 4 leaves 2 experts per rank);
    DeepSeek-V3 gets 4 layers: one dense, then three MoE layers."""
    root = tmp_path_factory.mktemp("tiny_moe")
    return {name: build_tiny_hf(name, root / name, layers=4 if name == "deepseek-v3" else 2, seed=10 + i)
            for i, name in enumerate(MOE_PRESETS)}
