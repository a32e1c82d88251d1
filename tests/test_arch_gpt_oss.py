"""gpt-oss is data: ``mappings/gpt_oss.yaml`` (sinks, alternating sliding window, biased fused experts, YaRN).

A tiny gpt-oss-20b-shaped model (4 layers: sliding, full, sliding, full; window 5; 8 experts top-2 with
biases) converts at TP2 x PP2 x EP2 in both MCore formats, round-trips bit-exactly (the fused expert
tensors are written back whole), and loads into megatron-core's own GPTModel at another layout with fp32
logits equal to HF's on 16 tokens (longer than the window). The signature bug, a ``down_proj`` transposed
twice, is invisible to shapes and to the round trip when the expert FFN is square (gpt-oss-20b's 2880 x
2880): the regression test converts such a model with the broken rule and sees megatron's logits move.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ckptbridge.align.mcore_side import checkpoint_args
from ckptbridge.errors import CkptBridgeError, LayoutError
from ckptbridge.formats.mcore_common import safe_load
from ckptbridge.mapping.registry import mappings_dir
from ckptbridge.mcore import model as mm
from ckptbridge.presets import build_tiny_hf, convertible_config, load_preset
from ckptbridge.spec import ModelSpec
from arch_checks import mappings_in_use
from helpers import assert_bit_exact, hf_config, hf_tensors, to_hf, to_mcore
from mcore_runner import run_distributed

ATOL = 1e-4
TOKENS = torch.randint(0, 1001, (2, 16), generator=torch.Generator().manual_seed(9))


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_hf("gpt-oss-20b", tmp_path_factory.mktemp("gpt_oss") / "hf", layers=4, seed=31)


@pytest.fixture(scope="module")
def square(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Expert FFN width == hidden size, as gpt-oss-20b: a transposed down_proj keeps its shape."""
    return build_tiny_hf("gpt-oss-20b", tmp_path_factory.mktemp("gpt_oss_sq") / "hf", layers=2, seed=32, ffn=64)


def hf_logits(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(TOKENS).logits


def _logits(rank: int, world: int, iter_dir: str, tp: int, pp: int, ep: int) -> torch.Tensor | None:
    args = checkpoint_args(iter_dir, tp, pp, ep, 1)
    mm.init_parallel(tp, pp, seed=100 + rank, ep=ep, etp=1)
    models = mm.build_gpt_model(args, dtype=torch.float32)
    mm.load_torch_dist(models, iter_dir)
    return mm.forward_logits(models, TOKENS, vocab_size=args.vocab_size)


def megatron_logits(iter_dir: Path, tp: int, pp: int, ep: int) -> list[torch.Tensor]:
    world = math.lcm(tp, ep) * pp
    return [r for r in run_distributed(_logits, world, str(iter_dir), tp, pp, ep, timeout=240) if r is not None]


def test_preset_translates_to_megatron_settings() -> None:
    args = ModelSpec.from_hf_config(convertible_config(load_preset("gpt-oss-20b"))).args
    assert args["softmax_type"] == "learnable" and args["quick_geglu"] and not args["swiglu"]
    assert args["glu_linear_offset"] == 1.0 and args["activation_func_clamp_value"] == 7.0
    assert args["window_size"] == (127, 0) and args["window_attn_skip_freq"] == [1, 0] * 12
    assert args["position_embedding_type"] == "yarn" and args["yarn_rotary_scaling_factor"] == 32.0
    assert args["yarn_original_max_position_embeddings"] == 4096 and args["yarn_correction_range_round_to_int"] is False
    assert args["add_bias_linear"] and args["add_qkv_bias"] and args["num_moe_experts"] == 32


def test_mxfp4_hub_config_refused() -> None:
    with pytest.raises(CkptBridgeError, match="mxfp4"):
        ModelSpec.from_hf_config(load_preset("gpt-oss-20b")["hf_config"])


def test_expert_tensor_parallel_refused(gpt_oss: Path, tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="only at ETP 1"):
        to_mcore(gpt_oss, tmp_path / "m", "torch_dist", tp=2)


@pytest.mark.parametrize("layout", [dict(tp=2, pp=2, ep=2, etp=1), dict(pp=2, vpp=2, ep=4, etp=1)])
@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_tp2pp2ep2_round_trip_bit_exact(gpt_oss: Path, tmp_path: Path, fmt: str, layout: dict) -> None:
    mcore = to_mcore(gpt_oss, tmp_path / "mcore", fmt, **layout)
    back = to_hf(mcore, tmp_path / "hf")
    assert_bit_exact(hf_tensors(gpt_oss), hf_tensors(back))
    assert hf_config(back) == hf_config(gpt_oss)
    assert "model.layers.0.mlp.experts.gate_up_proj" in hf_tensors(back)  # fused, as transformers loads it


def test_loads_in_megatron_with_hf_logits(gpt_oss: Path, tmp_path: Path) -> None:
    mcore = to_mcore(gpt_oss, tmp_path / "mcore", "torch_dist", tp=2, pp=2, ep=2, etp=1)
    expected = hf_logits(gpt_oss)
    for tp, pp, ep in ((1, 1, 2), (2, 1, 1)):
        got = megatron_logits(mcore / "release", tp, pp, ep)
        assert got and all((g - expected).abs().max() <= ATOL for g in got), (tp, pp, ep)


def test_down_proj_orientation(square: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The signature bug: down_proj is stored [F, H] (``h @ down_proj[e]``); MCore's linear_fc2 holds
    [H, F]. A rule that transposes it twice converts, round-trips and matches every shape (F == H here)
    and computes something else: megatron's logits leave HF's."""
    expected = hf_logits(square)
    good = to_mcore(square, tmp_path / "good", "torch_dist")
    (logits,) = megatron_logits(good / "release", 1, 1, 1)
    assert (logits - expected).abs().max() <= ATOL
    folder = tmp_path / "broken"
    folder.mkdir()
    text = (mappings_dir() / "gpt_oss.yaml").read_text()
    broken = text.replace("      - take_expert\n      - {transpose: [0, 1]}\n    shard: row",
                          "      - take_expert\n      - {transpose: [0, 1]}\n      - {transpose: [0, 1]}\n    shard: row")
    assert broken != text
    (folder / "gpt_oss.yaml").write_text(broken)
    with mappings_in_use(folder, monkeypatch):
        bad = to_mcore(square, tmp_path / "bad", "torch_dist")
        assert_bit_exact(hf_tensors(square), hf_tensors(to_hf(bad, tmp_path / "bad_hf")))  # the round trip is blind
    (wrong,) = megatron_logits(bad / "release", 1, 1, 1)
    assert (wrong - expected).abs().max() > 100 * ATOL
