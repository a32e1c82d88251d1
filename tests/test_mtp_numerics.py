"""Multi-token prediction (MTP) numerics: megatron-core's MTP blocks, loaded from our torch_dist output, compute
the logits that the hub checkpoint's MTP weights define (DeepSeek-V3, GLM-4.5).

transformers has no MTP forward, so the reference is written here from transformers' own modules (the model's
decoder layer class, its RMSNorm, its rotary embedding and causal mask, captured from a real forward) and
DeepSeek-V3's MTP definition as the inference engines that run the hub weights implement it (vLLM's and
SGLang's DeepSeek/GLM MTP layers). Per depth ``k`` (1-based), position ``i``:

    x   = eh_proj(cat([enorm(embed(token[i + k])), hnorm(h_prev[i])]))   # embedding half first
    h_k = shared_head.norm(decoder_layer(x))                              # rotary positions 0..s-1
    logits_k = shared_head.head(h_k)                                      # predicts token[i + k + 1]

``h_prev`` is the main model's output after its final norm for ``k = 1``, then the previous depth's
``h_k`` (after its ``shared_head.norm``: megatron chains it so, gpt_model.py:592 -> multi_token_prediction.py:815,
as SGLang's deepseek_nextn recycles the post-norm state). megatron-core 0.16.1 agrees on the concatenation
order (``torch.cat((decoder_input, hidden_states), -1)``, multi_token_prediction.py:736) and shifts the ids
left by one per depth, filling the end with id 0 (roll_tensor): only positions ``i < s - k`` are compared,
the rest are padding by construction. vLLM additionally zeroes the embedding at position 0 when serving;
that is a serving convention, not a property of the weights, and megatron's training does not do it.

The MTP embedding and head are the blocks' own ``embed_tokens`` / ``shared_head.head`` copies here (what the
hub checkpoint holds); megatron uses the model's shared ones, which the converter checked to be exact copies.

Signature bug: ``enorm`` and ``hnorm`` are both ``[hidden]`` RMSNorm weights, so a mapping that swaps them
converts, round-trips bit-exactly and loads strictly, and only the MTP logits show it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from ckptbridge.harness.checkpoint_args import checkpoint_args
from ckptbridge.mapping.registry import mappings_dir
from ckptbridge.mcore import model as mm
from ckptbridge.presets import build_tiny_hf
from arch_checks import mappings_in_use
from helpers import add_mtp_blocks, assert_bit_exact, hf_config, hf_tensors, to_hf, to_mcore
from mcore_runner import run_distributed
from test_arch_kimi import with_expert_bias

ATOL = 1e-4
DEPTH = 2
TOKENS = torch.randint(0, 1001, (2, 12), generator=torch.Generator().manual_seed(21))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny DeepSeek-V3 (MLA, yarn) and GLM-4.5 (partial rotary, QKV bias, biased router): one dense and one
    MoE layer each, then two MTP blocks built like the last layer (random norms, projections, experts)."""
    root = tmp_path_factory.mktemp("mtp_numerics")
    ds = build_tiny_hf("deepseek-v3", root / "ds", layers=2, seed=31)
    glm = with_expert_bias(build_tiny_hf("glm-4.5", root / "glm", layers=2, seed=32), 0.5)
    return {"deepseek-v3": add_mtp_blocks(ds, root / "ds_mtp", depth=DEPTH, seed=33),
            "glm-4.5": add_mtp_blocks(glm, root / "glm_mtp", depth=DEPTH, seed=34)}


def _rms_norm(model: torch.nn.Module, weight: torch.Tensor) -> torch.nn.Module:
    """The model's own RMSNorm class (DeepseekV3RMSNorm, Glm4MoeRMSNorm) holding ``weight``."""
    norm = type(model.model.norm)(weight.numel(), eps=model.config.rms_norm_eps)
    with torch.no_grad():
        norm.weight.copy_(weight)
    return norm


def reference_mtp_logits(folder: Path, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Per depth ``[b, s, vocab]`` MTP logits from the HF folder's weights (module docstring); positions whose
    shifted token falls off the end are left as NaN."""
    config = AutoConfig.from_pretrained(folder)
    n, depth = config.num_hidden_layers, config.num_nextn_predict_layers
    main = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    # the same class, config and loader with the MTP blocks as extra decoder layers: transformers reads
    # model.layers.{n + k}.* (experts in whichever layout the file holds) into layers[n + k]
    config.num_hidden_layers = n + depth
    blocks = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32).eval().model.layers[n:]
    tensors = hf_tensors(folder)
    seen: dict[str, object] = {}

    def layer_inputs(module, args, kwargs):  # what the model passes its decoder layers: mask, rotary, positions
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

    def final_norm(module, args, output):
        seen["h"] = output

    hooks = [main.model.layers[0].register_forward_pre_hook(layer_inputs, with_kwargs=True),
             main.model.norm.register_forward_hook(final_norm)]
    b, s = tokens.shape
    out = []
    with torch.no_grad():
        main(tokens, use_cache=False)
        for h in hooks:
            h.remove()
        h = seen["h"]
        ids = tokens
        for k in range(depth):
            p = f"model.layers.{n + k}."
            ids = torch.cat([ids[:, 1:], torch.zeros(b, 1, dtype=ids.dtype)], dim=1)  # token[i + k + 1]
            e = _rms_norm(main, tensors[p + "enorm.weight"])(F.embedding(ids, tensors[p + "embed_tokens.weight"]))
            x = F.linear(torch.cat([e, _rms_norm(main, tensors[p + "hnorm.weight"])(h)], dim=-1),
                         tensors[p + "eh_proj.weight"])
            x = blocks[k](x, **seen["kwargs"])
            x = x[0] if isinstance(x, tuple) else x
            h = _rms_norm(main, tensors[p + "shared_head.norm.weight"])(x)
            logits = F.linear(h, tensors[p + "shared_head.head.weight"])
            logits[:, s - k - 1:] = float("nan")
            out.append(logits)
    return out


def _megatron_mtp_logits(rank: int, world: int, iter_dir: str, tp: int, pp: int, ep: int):
    args = checkpoint_args(iter_dir, tp, pp, ep, 1)
    mm.init_parallel(tp, pp, seed=100 + rank, ep=ep, etp=1)  # weights differ until the load
    models = mm.build_gpt_model(args, dtype=torch.float32)
    result = mm.load_torch_dist(models, iter_dir)
    assert not result["unexpected"] and not result["missing"], result
    return mm.forward_mtp_logits(models, TOKENS, vocab_size=args.vocab_size)


def megatron_mtp_logits(iter_dir: Path, tp: int, pp: int, ep: int = 1) -> list[list[torch.Tensor]]:
    world = math.lcm(tp, ep) * pp
    got = [r for r in run_distributed(_megatron_mtp_logits, world, str(iter_dir), tp, pp, ep, timeout=240)
           if r is not None]
    assert len(got) == world // pp
    return got


def max_diff_per_depth(got: list[torch.Tensor], expected: list[torch.Tensor]) -> list[float]:
    assert len(got) == len(expected) == DEPTH
    out = []
    for g, e in zip(got, expected):
        valid = ~e.isnan().any(-1)
        assert valid.sum() == TOKENS.shape[0] * (TOKENS.shape[1] - len(out) - 1)
        out.append(float((g[valid] - e[valid]).abs().max()))
    return out


#: loaded (tp, pp, ep); written at TP2 x EP2 (ETP 1), so every load re-lays the checkpoint out
LOADS = {"tp1": (1, 1, 1), "tp2": (2, 1, 1), "pp2": (1, 2, 1)}


@pytest.mark.parametrize("preset", ["deepseek-v3", "glm-4.5"])
def test_megatron_mtp_logits_match_the_hf_definition(models: dict[str, Path], tmp_path: Path, preset: str) -> None:
    mcore = to_mcore(models[preset], tmp_path / "m", "torch_dist", tp=2, ep=2, etp=1) / "release"
    expected = reference_mtp_logits(models[preset], TOKENS)
    for name, (tp, pp, ep) in LOADS.items():
        for got in megatron_mtp_logits(mcore, tp, pp, ep):
            diffs = max_diff_per_depth(got, expected)
            print(f"{preset} {name}: MTP max |d| per depth {diffs}")
            assert max(diffs) <= ATOL, (name, diffs)


def test_swapped_enorm_hnorm_is_caught_only_by_mtp_logits(models: dict[str, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A DeepSeek-V3 mapping with enorm and hnorm exchanged: same shapes, a bit-exact round trip, a strict
    load, and MTP logits that leave the reference (the main logits would not move)."""
    src = models["deepseek-v3"]
    text = (mappings_dir() / "deepseek_v3.yaml").read_text()
    broken = (text.replace("hf: model.layers.{L}.enorm.weight", "hf: SWAP")
              .replace("hf: model.layers.{L}.hnorm.weight", "hf: model.layers.{L}.enorm.weight")
              .replace("hf: SWAP", "hf: model.layers.{L}.hnorm.weight"))
    assert broken.count("hnorm") == text.count("hnorm") and broken != text
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "deepseek_v3.yaml").write_text(broken)
    with mappings_in_use(folder, monkeypatch):
        bad = to_mcore(src, tmp_path / "bad", "torch_dist")
        back = to_hf(bad, tmp_path / "bad_hf")
        assert_bit_exact(hf_tensors(src), hf_tensors(back))  # the round trip is blind to it
        assert hf_config(back) == hf_config(src)
    (got,) = megatron_mtp_logits(bad / "release", 1, 1)
    diffs = max_diff_per_depth(got, reference_mtp_logits(src, TOKENS))
    print(f"swapped enorm/hnorm: MTP max |d| per depth {diffs}")
    assert min(diffs) > 100 * ATOL
