"""Robust runs (issue 11): an ablation that does not apply to the model is skipped with its reason,
HF falls back to eager attention for a model class without SDPA, a layout megatron refuses is a
usage error (exit 2, one line), and library warnings stay out of the terminal."""

from __future__ import annotations

import json

from click.testing import CliRunner
from transformers import AutoConfig

from ckptbridge.align.ablations import load_ablations, not_applicable
from ckptbridge.align.cli import align
from ckptbridge.align.hf_side import attention_implementation
from ckptbridge.presets import build_tiny_hf


def test_nine_heads_ablate_all_skips_tp2_with_its_reason(tmp_path):
    hf = build_tiny_hf("llama3.2-1b", tmp_path / "hf", layers=2, seed=0, hidden=72, heads=9, groups=3)
    res = CliRunner().invoke(align, ["--hf", str(hf), "--ablate", "all", "--seq-len", "16", "--no-probe",
                                     "--out", str(tmp_path / "r"), "--run", "nine"])
    assert res.exit_code == 0, res.output
    assert "skipped parallel/tp2: num_attention_heads (9) is not a multiple of TP=2" in res.output
    assert "Warning:" not in res.output and ("warnings collected" in res.output or "no warnings" in res.output)
    summary = json.loads((tmp_path / "r" / "nine" / "summary.json").read_text())
    assert [s["name"] for s in summary["skipped"]] == ["parallel/tp2"]
    ran = {s["name"] for s in summary["settings"]}
    assert "combo/hf_order" in ran and "qkv/separate" in ran  # every other recipe applies to a dense Llama
    report = (tmp_path / "r" / "nine" / "report.md").read_text()
    assert "`parallel/tp2` skipped: num_attention_heads (9) is not a multiple of TP=2" in report
    # asking for that layout outright is a usage error: exit 2 and one line naming the cause
    res = CliRunner().invoke(align, ["--hf", str(hf), "--tp", "2", "--seq-len", "16", "--no-probe",
                                     "--out", str(tmp_path / "r"), "--run", "tp2"])
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines()[-1] == \
        "error: --tp 2 --pp 1: num_attention_heads (9) is not a multiple of TP=2; num_query_groups (3) is not a multiple of TP=2"


def test_model_without_sdpa_runs_hf_eager_and_skips_the_eager_ablation(tmp_path):
    """Gemma 2 (softcapping) is a transformers class without SDPA support; its config is enough to decide."""
    AutoConfig.for_model("gemma2", hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, num_hidden_layers=2, vocab_size=128).save_pretrained(tmp_path)
    attention, why = attention_implementation(tmp_path)
    assert attention == "eager" and why == "Gemma2ForCausalLM does not support SDPA, so HF runs eager attention"
    reg = load_ablations()
    llama_args = {"normalization": "RMSNorm", "swiglu": True, "position_embedding_type": "rope", "num_attention_heads": 8}
    assert not_applicable(reg["attention/hf_eager"], reg, llama_args, "sdpa", 1, 1) is None
    assert "already runs HF eager attention" in not_applicable(reg["attention/hf_eager"], reg, llama_args, attention, 1, 1)
    assert attention_implementation(build_tiny_hf("qwen3-8b", tmp_path / "q", layers=1)) == ("sdpa", "")


def test_feature_checks_name_what_the_model_lacks():
    reg = load_ablations()
    mla_moe = {"multi_latent_attention": True, "num_moe_experts": 8, "normalization": "RMSNorm", "swiglu": True,
               "num_attention_heads": 8, "position_embedding_type": "rope"}
    assert not_applicable(reg["rmsnorm/hf_order"], reg, mla_moe, "sdpa", 1, 1) is None
    assert "no fused linear_qkv" in not_applicable(reg["qkv/separate"], reg, mla_moe, "sdpa", 1, 1)
    assert "MoE model" in not_applicable(reg["swiglu/two_gemms"], reg, mla_moe, "sdpa", 1, 1)
    assert not_applicable(reg["combo/hf_order"], reg, mla_moe, "sdpa", 1, 1).startswith("member ")
    layer_norm = {"normalization": "LayerNorm", "num_attention_heads": 8}
    assert "LayerNorm" in not_applicable(reg["rmsnorm/torch"], reg, layer_norm, "sdpa", 1, 1)


def test_rope_sentence_is_true_for_the_model_at_hand():
    from ckptbridge.align.report import rope_words

    text = load_ablations()["rope/mcore_unfused"].same_because
    plain = text.format_map({"rope": rope_words({"rope_scaling": {"rope_type": "default", "rope_theta": 1e4}}), "dtype": "fp32"})
    assert "plain RoPE without scaling" in plain and "llama3" not in plain
    llama3 = rope_words({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert llama3.startswith("llama3 scaling, factor 8.0") and "megatron's fixed values" in llama3
