"""Unit-level checks of the alignment harness: metrics, recipes, gate/JUnit, and that every
ablation swap restores both real models exactly."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest
import torch

from ckptbridge.align.ablations import applied, load_ablations, select
from ckptbridge.align.gate import evaluate, load_thresholds, write_junit
from ckptbridge.align.metrics import logit_metrics, tensor_metrics
from ckptbridge.align.variants import IMPLS, VariantContext
from ckptbridge.errors import CkptBridgeError


def test_tensor_metrics_known_values():
    ref = torch.tensor([3.0, 4.0])
    m = tensor_metrics(ref, torch.tensor([3.0, 4.5]))
    assert m["max_abs"] == pytest.approx(0.5) and m["mean_abs"] == pytest.approx(0.25)
    assert m["rel_err"] == pytest.approx(0.5 / 5.0)
    assert m["cosine"] == pytest.approx((9 + 18) / (5 * math.hypot(3, 4.5)))
    assert tensor_metrics(ref, ref) == {"max_abs": 0.0, "mean_abs": 0.0, "rel_err": 0.0, "cosine": pytest.approx(1.0)}


def test_logit_metrics_kl_top1_loss():
    tokens = torch.tensor([[0, 1, 2, 1]])
    ref = torch.randn(1, 4, 5, generator=torch.Generator().manual_seed(0))
    same = logit_metrics(ref, ref.clone(), tokens)
    assert same["kl"] == 0 and same["top1"] == 1 and same["loss_delta"] == 0
    flipped = ref.clone()
    flipped[0, 0] = -flipped[0, 0]  # first position's ranking reversed
    m = logit_metrics(ref, flipped, tokens)
    assert m["top1"] == pytest.approx(0.75) and m["kl"] > 0
    assert m["loss_delta"] == pytest.approx(m["loss_test"] - m["loss_ref"])


def test_recipes_are_valid_and_cover_every_impl():
    reg = load_ablations()
    assert {a.impl for a in reg.values() if a.impl} == set(IMPLS)
    assert [a.name for a in select("rmsnorm", reg)] == ["rmsnorm/hf_order", "rmsnorm/te_order", "rmsnorm/torch"]
    assert len(select("all", reg)) == len(reg) >= 15
    assert {a.name for a in reg.values() if a.emulated(VariantContext(torch.bfloat16))} == \
        {"rmsnorm/te_order", "rope/fused", "swiglu/fused_fp32"}
    with pytest.raises(CkptBridgeError, match="unknown ablation"):
        select("rmsnorm/nope", reg)


def _rows(cos: float, kl: float) -> list[dict]:
    base = {"setting": "baseline", "position": 0}
    return [{**base, "mode": "propagated", "point": "layer0.output", "layer": 0, "kind": "output", "cosine": cos, "rel_err": 0.1},
            {**base, "mode": "propagated", "point": "logits", "layer": -1, "kind": "logits", "cosine": 1.0, "kl": kl,
             "max_abs": 0.5, "top1": 0.9, "rel_err": 0.01}]


def test_gate_file_flags_and_junit(tmp_path):
    gate = tmp_path / "gate.yaml"
    gate.write_text("logits: {max_kl: 0.5}\nbf16:\n  points: {min_cosine: 0.999}\n")
    th = load_thresholds("bf16", gate, {"logits": {"min_top1": 0.95}})
    assert th["logits"] == {"max_kl": 0.5, "min_cosine": 0.99, "min_top1": 0.95}
    assert th["points"]["min_cosine"] == 0.999
    checks = evaluate(_rows(cos=0.99, kl=0.1), th, ["propagated"], num_layers=1)
    failed = {c.name for c in checks if not c.passed}
    assert failed == {"propagated.logits.top1", "propagated.layer0.cosine"}
    write_junit(checks, tmp_path / "junit.xml", "suite")
    suite = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) == len(checks) and int(suite.get("failures")) == 2
    msgs = [f.get("message") for f in suite.iter("failure")]
    assert any("top1 = 0.9 (limit >= 0.95)" in m for m in msgs)
    bad = tmp_path / "bad.yaml"
    bad.write_text("logits: {max_fun: 1}\n")
    with pytest.raises(CkptBridgeError, match="max_fun"):
        load_thresholds("fp32", bad)


def test_every_swap_restores_both_models(tmp_path):
    """Apply each ablation to real HF and MCore models: inside, the swap is in place (an ablation that
    swaps nothing would measure nothing); after, both models are untouched."""
    import megatron.core.transformer.attention as mattn
    from transformers.models.qwen3 import modeling_qwen3

    from ckptbridge.align.hf_side import fill_context, load_hf, run_hf
    from ckptbridge.align.mcore_side import McorePass, McoreRunner, McoreSpec, checkpoint_args
    from ckptbridge.convert import Target, convert
    from ckptbridge.layout import ParallelLayout
    from ckptbridge.presets import build_tiny_hf

    hf_dir = build_tiny_hf("qwen3-8b", tmp_path / "hf", layers=2, dtype=torch.bfloat16)
    convert(hf_dir, tmp_path / "mc", None, Target("mcore", ParallelLayout(), "torch_dist", "te", torch.bfloat16))
    iter_dir = tmp_path / "mc" / "release"
    hf = load_hf(hf_dir, torch.bfloat16, "cpu")
    ctx = fill_context(hf, VariantContext(torch.bfloat16))
    ctx.mcore_args = vars(checkpoint_args(iter_dir))
    runner = McoreRunner(McoreSpec(str(iter_dir), dtype=torch.bfloat16))
    tokens = torch.arange(3, 19).unsqueeze(0)
    before_hf = run_hf(hf, tokens, ctx)["logits"]
    before_mc = runner.run([McorePass("x", tokens)], ctx)["x"]["logits"]
    originals = (mattn.apply_rotary_pos_emb, modeling_qwen3.apply_rotary_pos_emb, hf.config._attn_implementation)

    def swaps() -> tuple:
        """Everything an ablation may swap: patched forwards, rotary functions, HF attention, MCore softmax dtype."""
        patched = {(i, n) for i, model in enumerate([hf, *runner._models])
                   for n, m in model.named_modules() if "forward" in vars(m)}
        softmax = tuple(c.scale_mask_softmax.softmax_in_fp32 for c in runner._models[0].modules()
                        if hasattr(c, "scale_mask_softmax"))
        return (patched, mattn.apply_rotary_pos_emb, modeling_qwen3.apply_rotary_pos_emb, hf.config._attn_implementation,
                softmax)

    untouched = swaps()
    reg = load_ablations()
    unchanged: list[str] = []
    for ab in reg.values():
        if not ab.impl:
            continue
        target = runner._models if ab.side == "mcore" else hf
        with applied((ab.name,), ab.side, target, ctx, reg):
            if swaps() == untouched:
                unchanged.append(ab.name)
    assert not unchanged, f"ablations that swapped nothing in: {unchanged}"
    assert swaps() == untouched
    for model in [hf, *runner._models]:
        patched = [n for n, m in model.named_modules() if "forward" in vars(m)]
        assert not patched, patched
    assert (mattn.apply_rotary_pos_emb, modeling_qwen3.apply_rotary_pos_emb, hf.config._attn_implementation) == originals
    assert all(c.scale_mask_softmax.softmax_in_fp32 for c in runner._models[0].modules() if hasattr(c, "scale_mask_softmax"))
    assert torch.equal(run_hf(hf, tokens, ctx)["logits"], before_hf)
    assert torch.equal(runner.run([McorePass("y", tokens)], ctx)["y"]["logits"], before_mc)


def test_hf_attention_block_is_found_from_the_mapping():
    """align records each HF layer's attention where the mapping puts MCore's self_attention: Qwen3-Next's
    delta-net layers have ``linear_attn``, its full-attention layers ``self_attn`` (a hard-coded name missed them)."""
    import transformers as tf

    from ckptbridge.align.hf_sites import hf_attention_modules

    config = tf.Qwen3NextConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=1, head_dim=16, intermediate_size=32, num_experts=2,
                                num_experts_per_tok=1, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                                linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=8,
                                linear_value_head_dim=8, layer_types=["linear_attention", "full_attention"],
                                architectures=["Qwen3NextForCausalLM"])
    model = tf.Qwen3NextForCausalLM(config)
    layers = model.model.layers
    assert [m is a for m, a in zip(hf_attention_modules(model, layers), (layers[0].linear_attn, layers[1].self_attn))] == [True, True]
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=32, architectures=["LlamaForCausalLM"]))
    assert hf_attention_modules(llama, llama.model.layers) == [llama.model.layers[0].self_attn]
