"""Isolated mode with one decoder layer of each model in memory at a time (``--layerwise``).

Both models are built as skeletons whose parameters live on the ``meta`` device (accelerate's
``init_empty_weights``; buffers such as HF's ``inv_freq`` stay real).  The embedding, final norm
and output layer are loaded once; every decoder layer is loaded by a forward pre-hook just before
it runs and returned to ``meta`` by a forward hook right after, so peak memory is the residents
plus one layer -- a model larger than RAM can be aligned.

Per setting: (1) HF runs its own forward, streaming, and records every layer's input (these are
HF's propagated states, i.e. the isolated-mode inputs); (2) MCore runs streaming with those
inputs injected at each layer and at the final norm.  HF tensors are read from the safetensors
files; MCore tensors from the torch_dist checkpoint through ckptbridge's reader (which assembles a
layer from its chunks; megatron's ``dist_checkpointing.load`` cannot load a subset of a
single-rank checkpoint).  The in-memory isolated run loads through megatron instead; the test
suite checks that both give the same numbers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .ablations import Ablation
from .capture import hf_decoder
from .runner import Setting, compare_captures
from ..harness.tokens import TokenSample
from .variants import VariantContext
from ..harness.weights import Weights

Loader = Callable[[str], torch.Tensor]


def _set_tensor(root: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    mod = root.get_submodule(".".join(path)) if path else root
    if leaf in mod._parameters:
        mod._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    elif leaf in mod._buffers:
        mod._buffers[leaf] = value
    else:
        raise KeyError(f"{type(root).__name__} has no parameter or buffer {name!r}")


def _materialise(module: torch.nn.Module, prefix: str, load: Loader) -> None:
    for name, p in list(module.named_parameters()):
        t = load(prefix + name)
        if t.shape != p.shape:
            if t.dim() == p.dim() and t.shape[1:] == p.shape[1:] and t.shape[0] < p.shape[0]:
                t = torch.cat([t, t.new_zeros((p.shape[0] - t.shape[0], *t.shape[1:]))])  # padded vocabulary rows
            else:
                raise ValueError(f"{prefix + name}: checkpoint shape {tuple(t.shape)}, model {tuple(p.shape)}")
        _set_tensor(module, name, t.to(p.dtype))


def _release(module: torch.nn.Module) -> None:
    for name, p in list(module.named_parameters()):
        _set_tensor(module, name, torch.empty_like(p, device="meta"))


@contextmanager
def streaming(layers: list[tuple[torch.nn.Module, str]], load: Loader) -> Iterator[None]:
    """Load each ``(module, prefix)`` right before its forward and release it right after."""
    with ExitStack() as stack:
        for module, prefix in layers:
            pre = module.register_forward_pre_hook(lambda m, a, prefix=prefix: _materialise(m, prefix, load))
            post = module.register_forward_hook(lambda m, a, o: _release(m))
            stack.callback(pre.remove)
            stack.callback(post.remove)
            stack.callback(_release, module)  # also when a forward raised half-way
        yield


class HFTensors:
    """Reads single tensors from an HF folder's safetensors files (sharded or not)."""

    def __init__(self, folder: Path) -> None:
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.exists():
            self.where = {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            self.where = {}
            for f in sorted(folder.glob("*.safetensors")):
                with safe_open(f, "pt") as h:
                    self.where.update({k: f for k in h.keys()})
        if not self.where:
            raise FileNotFoundError(f"{folder}: no safetensors weights")

    def __call__(self, name: str) -> torch.Tensor:
        with safe_open(self.where[name], "pt") as h:
            return h.get_tensor(name)


class McoreTensors:
    """Reads single canonical tensors (local-spec names) from a ckptbridge-written MCore checkpoint."""

    def __init__(self, iter_dir: Path) -> None:
        from ..formats.detect import open_source

        self.source = open_source(iter_dir, "mcore")
        self.by_name = {pt.rule.mcore_name(pt.layer, "local", getattr(pt, "expert", None)): pt
                        for pt in self.source.planned}

    def __call__(self, name: str) -> torch.Tensor:
        return self.source.read(self.by_name[name])

    def close(self) -> None:
        self.source.close()


def hf_skeleton(weights: Weights, dtype: torch.dtype, attention: str) -> tuple[torch.nn.Module, HFTensors]:
    """HF model with meta parameters; embedding, final norm and lm_head loaded."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(weights.hf_path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
    model.eval()
    load = HFTensors(weights.hf_path)
    dec = hf_decoder(model)
    _materialise(dec.embed_tokens, "model.embed_tokens.", load)
    _materialise(dec.norm, "model.norm.", load)
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = dec.embed_tokens.weight
    else:
        _materialise(model.lm_head, "lm_head.", load)
    return model, load


def mcore_skeleton(weights: Weights, dtype: torch.dtype) -> tuple[list[torch.nn.Module], McoreTensors]:
    """Single-rank GPTModel with meta parameters; embedding, final norm and output layer loaded."""
    from accelerate import init_empty_weights

    from ckptbridge.mcore import model as mm

    from ..mcore.launch import ensure_single_rank_group
    from ..harness.checkpoint_args import checkpoint_args

    ensure_single_rank_group()
    args = checkpoint_args(weights.mcore_iter)
    mm.init_parallel(1, 1)
    with init_empty_weights(include_buffers=False):
        models = mm.build_gpt_model(args, dtype=dtype, use_te=False, perform_initialization=False)
    load = McoreTensors(weights.mcore_iter)
    m = models[0]
    _materialise(m.embedding, "embedding.", load)
    _materialise(m.decoder.final_layernorm, "decoder.final_layernorm.", load)
    if m.output_layer.weight is not None:
        _materialise(m.output_layer, "output_layer.", load)
    return models, load


def run_layerwise(weights: Weights, sample: TokenSample, dtype: torch.dtype, settings: list[Setting],
                  ctx: VariantContext, registry: dict[str, Ablation], positions: list[int],
                  hf_attention: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Isolated-mode metric rows and MoE routing rows for every setting (and probe position),
    streaming both models."""
    from .hf_side import fill_context, run_hf
    from .mcore_side import McorePass, McoreSpec, run_pass
    from .routing import compare_routing
    from .runner import probe_position_ids

    hf, hf_load = hf_skeleton(weights, dtype, hf_attention)
    fill_context(hf, ctx)
    models, mc_load = mcore_skeleton(weights, dtype)
    spec = McoreSpec(str(weights.mcore_iter), 1, 1, dtype, "cpu")
    hf_layers = [(layer, f"model.layers.{i}.") for i, layer in enumerate(hf_decoder(hf).layers)]
    mc_layers = [(layer, f"decoder.layers.{int(layer.layer_number) - 1}.") for layer in models[0].decoder.layers]
    num_layers = len(mc_layers)
    rows: list[dict[str, Any]] = []
    routing: list[dict[str, Any]] = []
    try:
        for s in settings:
            for mode, offset in [("isolated", 0)] + [("probe", p) for p in (positions if s.probed else [])]:
                pos = probe_position_ids(sample.ids.shape[1], offset)
                with streaming(hf_layers, hf_load):
                    ref = run_hf(hf, sample.ids, ctx, s.hf_variants, pos, registry)
                inject = {k: v for k, v in ref.items() if k.endswith(".input")}
                p = McorePass(f"{s.name}|{mode}|{offset}", sample.ids, s.mcore_variants, inject, tuple(pos) if pos else None)
                with streaming(mc_layers, mc_load):
                    caps = run_pass(models, spec, p, ctx)
                base = {"setting": s.name, "mode": mode, "position": offset}
                rows += compare_captures(ref, caps, sample.ids, num_layers, base)
                routing += compare_routing(ref, caps, base, int(sample.ids.shape[1]))
    finally:
        mc_load.close()
    return rows, routing
