"""The click options that say where a command's weights come from, shared by ``align`` and ``converge``
(both resolve them with :func:`ckptbridge.harness.weights.resolve_weights`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


def weight_source_options(hf_help: str, mcore_help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--model/--hf/--mcore/--random-init/--layers/--shrink/--seed``; only what ``--hf``/``--mcore`` are
    used for differs between commands."""
    options = [
        click.option("--model", "preset", default=None, help="Preset name (alignment/presets), e.g. llama3.2-1b."),
        click.option("--hf", "hf_path", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
                     help=hf_help),
        click.option("--mcore", "mcore_path", type=click.Path(path_type=Path, exists=True, file_okay=False),
                     default=None, help=mcore_help),
        click.option("--random-init", is_flag=True, help="Seeded random weights of the preset's architecture (no download)."),
        click.option("--layers", type=click.IntRange(1), default=None, help="With --random-init: number of layers."),
        click.option("--shrink", is_flag=True, help="With --random-init: tiny widths (hidden 64, ffn 128, vocab 1001)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of --random-init weights."),
    ]

    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            f = option(f)
        return f

    return apply
