"""Where the two models' weights come from, in the order the issue asks for.

1. ``--hf PATH`` (and optionally ``--mcore PATH``);
2. else the preset's hub id in the local HF cache (``local_files_only``: never downloads);
3. else ``--random-init``: the preset's real architecture with seeded random weights, optionally
   with fewer layers (``--layers``) and tiny widths (``--shrink``);
4. else a clear error that suggests ``--random-init``.

Without ``--mcore`` the HF weights are converted with ckptbridge itself (torch_dist, TP=1; megatron
loads it at any TP/PP), so the run checks the converter's output.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CkptBridgeError
from ..formats.mcore_common import iteration_dir
from ..hf_config import language_model, read_config
from ..presets import build_tiny_hf, load_preset


@dataclass
class Weights:
    hf_path: Path
    mcore_iter: Path
    hf_source: str
    mcore_source: str
    random_init: bool
    hf_config: dict[str, Any]
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    def cleanup(self) -> None:
        """Delete generated weights (random-init and conversions) unless a --work-dir was given."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def cached_snapshot(hub_id: str) -> Path | None:
    """The local HF-cache snapshot of ``hub_id``, or None; never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(hub_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        return None


def build_random_hf(preset: str, out: Path, layers: int | None, seed: int, dtype: torch.dtype, shrink: bool,
                    matrix_std: float = 0.05) -> Path:
    """Seeded random weights for ``preset``'s architecture, saved with ``save_pretrained``.

    With ``shrink`` this is :func:`ckptbridge.presets.build_tiny_hf` (tiny widths, every structural
    feature kept).  Without it the real widths are kept and only the depth changes; the weights are
    drawn the same way, in the same order (matrices N(0, 0.05^2), norm weights 1 + N(0, 0.1^2)), in
    fp32 and then cast to ``dtype``.  ``matrix_std`` replaces 0.05 for real widths: training wants the
    config's ``initializer_range`` (0.02 for Llama), whose logits start near ln(vocab) instead of far above.
    """
    if shrink:
        return build_tiny_hf(preset, out, layers=layers or 2, seed=seed, dtype=dtype)
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = dict(load_preset(preset)["hf_config"])
    if layers is not None:
        raw["num_hidden_layers"] = layers
        if raw.get("max_window_layers") is not None:
            raw["max_window_layers"] = min(int(raw["max_window_layers"]), layers)
    model_type = raw.pop("model_type")
    raw.pop("architectures", None)
    config = AutoConfig.for_model(model_type, **raw)
    # parameters on meta: transformers' own initialisation of a billion parameters takes a minute
    # on 2 cores and is overwritten anyway; buffers (inv_freq) are computed for real
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()):  # tied weights appear once, as in build_tiny_hf
            scale = 0.1 if p.dim() == 1 else matrix_std
            base = 1.0 if "norm" in name else 0.0
            value = torch.randn(p.shape, generator=gen).mul_(scale).add_(base).to(dtype)  # = base + scale * randn
            module = model.get_submodule(name.rpartition(".")[0])
            module._parameters[name.rpartition(".")[2]] = torch.nn.Parameter(value, requires_grad=False)
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(out)
    return Path(out)


def resolve_weights(preset: str | None, hf: Path | None, mcore: Path | None, random_init: bool, layers: int | None,
                    shrink: bool, seed: int, dtype: torch.dtype, work_dir: Path | None,
                    matrix_std: float = 0.05) -> Weights:
    """Find or make both checkpoints; see the module docstring for the order."""
    from ..convert import Target, convert
    from ..layout import ParallelLayout

    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ckptbridge-align-")
        work = Path(tmp.name)
    else:
        work = Path(work_dir)
        work.mkdir(parents=True, exist_ok=True)
    if (layers is not None or shrink) and not random_init:
        raise CkptBridgeError("--layers/--shrink only apply to --random-init weights")
    info = load_preset(preset) if preset else None
    if hf is not None:
        hf_path, hf_source, random = Path(hf), f"--hf {hf}", False
        if random_init:
            raise CkptBridgeError("give --hf or --random-init, not both")
    elif random_init:
        if info is None:
            raise CkptBridgeError("--random-init needs --model PRESET")
        hf_path = build_random_hf(preset, work / "hf-random", layers, seed, dtype, shrink, matrix_std)
        cfg = language_model(read_config(hf_path))  # a VLM: its language model's sizes
        hf_source = (f"random init (seed {seed}) of the {preset} architecture: {cfg['num_hidden_layers']} layers, "
                     f"hidden {cfg['hidden_size']}, ffn {cfg['intermediate_size']}, vocab {cfg['vocab_size']}"
                     + (" (widths shrunk)" if shrink else " (real widths)"))
        random = True
    else:
        if info is None:
            raise CkptBridgeError("give --model PRESET or --hf PATH")
        snap = cached_snapshot(info["hub_id"])
        if snap is None:
            raise CkptBridgeError(
                f"no weights for {preset}: {info['hub_id']} is not in the local HF cache (nothing is downloaded). "
                f"Pass --hf PATH to a local checkpoint, or --random-init (add --layers N and --shrink for a laptop-sized "
                f"model) to align the {preset} architecture with seeded random weights.")
        hf_path, hf_source, random = snap, f"HF cache: {info['hub_id']} ({snap})", False
    if mcore is not None:
        mcore_iter, mcore_source = iteration_dir(Path(mcore)), f"--mcore {mcore}"
    else:
        dst = work / "mcore"
        convert(hf_path, dst, None, Target("mcore", ParallelLayout(tp=1, pp=1), "torch_dist", "te", dtype), force=True)
        mcore_iter, mcore_source = iteration_dir(dst), f"converted from the HF weights by ckptbridge (torch_dist, tp1, {str(dtype).replace('torch.', '')})"
    if not (mcore_iter / "metadata.json").exists():
        raise CkptBridgeError(f"{mcore_iter}: align loads MCore torch_dist checkpoints (metadata.json missing)")
    return Weights(hf_path, mcore_iter, hf_source, mcore_source, random, language_model(read_config(hf_path)), tmp)
