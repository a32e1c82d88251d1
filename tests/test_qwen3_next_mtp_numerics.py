"""Qwen3-Next's hub MTP block (mtp.*), converted to megatron-core's MTP block: megatron-core's hybrid GPTModel,
loaded from our torch_dist output, computes the MTP logits the hub weights define.

transformers has no MTP forward (it ignores mtp.* on load), so the reference is built here from transformers' own
modules: the main model's final-norm output ``h``, Qwen3NextRMSNorm (x * (1 + w)) for the pre-fc norms and mtp.norm,
and the MTP layer as a real Qwen3NextDecoderLayer (full attention + MoE) loaded by transformers' own loader (the
block's tensors renamed to an extra full-attention layer), fed the mask and rotary of the main model's
full-attention layer. The definition is vLLM's qwen3_next_mtp.py (embedding half first, shared embedding and head):

    x = fc(cat([pre_fc_norm_embedding(embed(token[i + 1])), pre_fc_norm_hidden(h[i])]))
    logits = lm_head(norm(layer(x)))                                      # predicts token[i + 2]

megatron shifts the ids left by one and fills the end with id 0: the last position is not compared."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from ckptbridge.presets import build_tiny_hf
from helpers import to_mcore
from ckptbridge.harness.checkpoint_args import checkpoint_args
from ckptbridge.mcore import model as mm
from mcore_runner import run_distributed
from test_arch_qwen3_next import PRESET, hub_mtp_copy

ATOL = 1e-4
TOKENS = torch.randint(0, 1001, (2, 12), generator=torch.Generator().manual_seed(23))


def _norm(model: torch.nn.Module, weight: torch.Tensor) -> torch.nn.Module:
    norm = type(model.model.norm)(weight.numel(), eps=model.config.rms_norm_eps)
    with torch.no_grad():
        norm.weight.copy_(weight)
    return norm


def reference_mtp_logits(folder: Path, work: Path, tokens: torch.Tensor) -> torch.Tensor:
    """``[b, s, vocab]`` MTP logits of the hub definition (module docstring); the last position NaN."""
    main = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tensors = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    n = config["num_hidden_layers"]
    kinds = config.get("layer_types") or main.config.layer_types
    full = kinds.index("full_attention")
    # the MTP layer as an extra full-attention decoder layer, read by transformers' own loader
    extra = work / "extra"
    shutil.copytree(folder, extra)
    save_file({**{k: v for k, v in tensors.items() if not k.startswith("mtp.")},
               **{f"model.layers.{n}." + k[len("mtp.layers.0."):]: v for k, v in tensors.items()
                  if k.startswith("mtp.layers.0.")}}, extra / "model.safetensors", metadata={"format": "pt"})
    (extra / "config.json").write_text(json.dumps({**config, "num_hidden_layers": n + 1,
                                                   "layer_types": [*kinds, "full_attention"]}))
    layer = AutoModelForCausalLM.from_pretrained(extra, dtype=torch.float32).eval().model.layers[n]
    seen: dict[str, object] = {}
    hooks = [main.model.layers[full].register_forward_pre_hook(
                 lambda m, a, kw: seen.update(kw={k: v for k, v in kw.items() if k != "hidden_states"}), with_kwargs=True),
             main.model.norm.register_forward_hook(lambda m, a, out: seen.update(h=out))]
    b, s = tokens.shape
    with torch.no_grad():
        main(tokens, use_cache=False)
        for h in hooks:
            h.remove()
        ids = torch.cat([tokens[:, 1:], torch.zeros(b, 1, dtype=tokens.dtype)], dim=1)
        e = _norm(main, tensors["mtp.pre_fc_norm_embedding.weight"])(main.model.embed_tokens(ids))
        x = F.linear(torch.cat([e, _norm(main, tensors["mtp.pre_fc_norm_hidden.weight"])(seen["h"])], -1),
                     tensors["mtp.fc.weight"])
        x = layer(x, **seen["kw"])
        x = x[0] if isinstance(x, tuple) else x
        logits = main.lm_head(_norm(main, tensors["mtp.norm.weight"])(x))
        logits[:, s - 1:] = float("nan")
    return logits


def _megatron_mtp_logits(rank: int, world: int, iter_dir: str, tp: int) -> torch.Tensor | None:
    args = checkpoint_args(iter_dir, tp, 1, 1, tp)
    mm.init_parallel(tp, 1, seed=100 + rank, ep=1, etp=tp)  # weights differ until the load
    models = mm.build_gpt_model(args, dtype=torch.float32)
    result = mm.load_torch_dist(models, iter_dir)
    assert not result["unexpected"] and not result["missing"], result
    (logits,) = mm.forward_mtp_logits(models, TOKENS, vocab_size=args.vocab_size)
    return logits


def test_megatron_mtp_logits_match_the_hub_definition(tmp_path: Path) -> None:
    tiny = build_tiny_hf(PRESET, tmp_path / "hf", layers=2, seed=41)
    src = hub_mtp_copy(tiny, tmp_path / "hf_mtp", seed=42)
    assert AutoConfig.from_pretrained(src).layer_types[-1] == "full_attention"
    mcore = to_mcore(src, tmp_path / "m", "torch_dist", tp=2, pp=2) / "release"
    expected = reference_mtp_logits(src, tmp_path, TOKENS)
    valid = ~expected.isnan().any(-1)
    for tp in (1, 2):  # written at TP2 x PP2: each load re-lays it out (PP1)
        for logits in run_distributed(_megatron_mtp_logits, tp, str(mcore), tp, timeout=240):
            diff = float((logits[valid] - expected[valid]).abs().max())
            print(f"qwen3-next MTP max |d| at tp{tp} {diff}")
            assert diff <= ATOL, (tp, diff)
