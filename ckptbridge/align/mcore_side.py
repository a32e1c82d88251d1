"""Build megatron-core's ``GPTModel`` from a torch_dist checkpoint and run recorded passes on it.

TP=PP=1 runs in this process (a single-rank gloo group); any other layout runs in forked gloo
workers (:func:`ckptbridge.mcore.launch.run_workers`), each building its shard of the model and loading it with
megatron's own ``dist_checkpointing.load``.  A *pass* is one forward with a set of MCore-side
ablations, optional HF inputs to inject (isolated mode) and optional explicit RoPE positions.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from ckptbridge.harness.checkpoint_args import checkpoint_args
from ckptbridge.mcore import model as mm

from . import points as P
from .ablations import applied
from .capture import MCoreRecorder
from ..mcore.launch import DEFAULT_PRELOAD, ensure_single_rank_group, run_workers
from .variants import VariantContext

Captures = dict[str, torch.Tensor]


@dataclass(frozen=True)
class McoreSpec:
    """Which checkpoint, at which layout and dtype.  Picklable (sent to workers)."""

    iter_dir: str
    tp: int = 1
    pp: int = 1
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    seed: int = 1234

    @property
    def world(self) -> int:
        return self.tp * self.pp


@dataclass
class McorePass:
    """One recorded forward."""

    key: str
    tokens: torch.Tensor
    variants: tuple[str, ...] = ()
    inject: dict[str, torch.Tensor] | None = None
    positions: tuple[int, ...] | None = None


def build_and_load(spec: McoreSpec) -> list[torch.nn.Module]:
    """``init_parallel`` + ``build_gpt_model`` + megatron's ``dist_checkpointing.load`` (strict)."""
    args = checkpoint_args(spec.iter_dir, spec.tp, spec.pp)
    mm.init_parallel(spec.tp, spec.pp, seed=spec.seed)
    # local spec even where TE is usable: its norms/linears are separate modules, so every capture
    # point exists and the TE variants swap real TE modules into it.  No random init: every
    # parameter is overwritten by the strict load (init costs ~1 s per 100M parameters).
    models = mm.build_gpt_model(args, dtype=spec.dtype, use_te=False, perform_initialization=False)
    mm.load_torch_dist(models, spec.iter_dir)
    if spec.device != "cpu":
        models = [m.to(spec.device) for m in models]
    return models


def _forward(models: list[torch.nn.Module], tokens: torch.Tensor, spec: McoreSpec) -> torch.Tensor | None:
    """Logits [b, s, vocab] (gathered over TP, sliced to the HF vocabulary) on last-stage ranks."""
    if spec.device == "cpu":
        return mm.forward_logits(models, tokens)
    if spec.pp != 1 or spec.tp != 1:
        raise NotImplementedError("on CUDA only TP=PP=1 is wired up (untested without a GPU)")
    b, s = tokens.shape
    dev = torch.device(spec.device)
    pos = torch.arange(s, device=dev).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=dev), diagonal=1)[None, None]
    with torch.no_grad():
        out = models[0](input_ids=tokens.to(dev), position_ids=pos, attention_mask=mask)
    return out[..., : int(models[0]._ckptbridge_args.vocab_size)]


def run_pass(models: list[torch.nn.Module], spec: McoreSpec, p: McorePass, ctx: VariantContext) -> Captures:
    """Run one pass; every requested injection must have happened (else the isolation is a lie)."""
    with torch.no_grad(), applied(p.variants, "mcore", models, ctx), \
            MCoreRecorder(models, inject=p.inject, positions=p.positions) as rec:
        logits = _forward(models, p.tokens, spec)
    caps = dict(rec.tensors)
    if logits is not None:
        caps[P.LOGITS] = logits.detach().cpu()
    if p.inject is not None:
        local = {P.layer_input(int(layer.layer_number) - 1) for m in models for layer in m.decoder.layers}
        if getattr(models[-1].decoder, "final_layernorm", None) is not None:
            local.add(P.FINAL_NORM_INPUT)
        missing = (local & set(p.inject)) - set(rec.injected)
        if missing:
            raise RuntimeError(f"isolated pass {p.key}: inputs not injected: {sorted(missing)}")
    return caps


def _worker(rank: int, world: int, spec: McoreSpec, passes: list[McorePass], ctx: VariantContext) -> dict[str, Captures]:
    models = build_and_load(spec)
    out: dict[str, Captures] = {}
    first_of_tp = rank % spec.tp == 0  # TP ranks record identical tensors; send one copy per stage
    for p in passes:
        caps = run_pass(models, spec, p, ctx)
        out[p.key] = caps if first_of_tp else {}
    return out


def _merge(per_rank: list[dict[str, Captures]]) -> dict[str, Captures]:
    merged: dict[str, Captures] = {}
    for result in per_rank:
        for key, caps in result.items():
            for name, t in caps.items():
                merged.setdefault(key, {}).setdefault(name, t)
    return merged


class McoreRunner:
    """Runs passes for one layout: in-process (model built once, kept) or in fresh workers."""

    def __init__(self, spec: McoreSpec) -> None:
        self.spec = spec
        self._models: list[torch.nn.Module] | None = None

    def run(self, passes: list[McorePass], ctx: VariantContext) -> dict[str, Captures]:
        if not passes:
            return {}
        if self.spec.world == 1:
            ensure_single_rank_group()
            if self._models is None:
                self._models = build_and_load(self.spec)
            return {p.key: run_pass(self._models, self.spec, p, ctx) for p in passes}
        if self.spec.device != "cpu":
            raise NotImplementedError("multi-rank MCore runs use gloo workers on CPU only")
        results = run_workers(_worker, self.spec.world, self.spec, passes, ctx, preload=(*DEFAULT_PRELOAD, __name__))
        return _merge(results)

    def close(self) -> None:
        """Drop the in-process model (its memory) -- the process group stays for the next run."""
        self._models = None
