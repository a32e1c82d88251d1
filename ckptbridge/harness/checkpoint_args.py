"""A checkpoint's Megatron-LM args, ready to build megatron-core's model at another layout."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..formats.mcore_common import safe_load


def checkpoint_args(iter_dir: str | Path, tp: int = 1, pp: int = 1, ep: int = 1,
                    etp: int | None = None) -> argparse.Namespace:
    """The checkpoint's Megatron-LM args, re-laid out for ``tp`` x ``pp`` and, for MoE models, ``ep`` x ``etp``
    (``None`` = ``tp``, megatron's default): torch_dist loads at any layout, so the layout the checkpoint was
    written with must not leak into the model that reads it."""
    args = argparse.Namespace(**vars(safe_load(Path(iter_dir) / "common.pt")["args"]))
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size = tp, pp
    args.virtual_pipeline_model_parallel_size = None
    args.decoder_first_pipeline_num_layers = args.decoder_last_pipeline_num_layers = None
    args.expert_model_parallel_size, args.expert_tensor_parallel_size = ep, etp
    return args
