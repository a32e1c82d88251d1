"""Mixture-of-experts models round-trip HF -> MCore -> HF bit-exactly under EP x TP x PP x ETP, both formats."""

from __future__ import annotations

import itertools

import pytest
from click.testing import CliRunner

from ckptbridge.cli import main
from ckptbridge.formats.detect import open_source
from ckptbridge.formats.legacy import FILE
from ckptbridge.formats.mcore_common import safe_load
from helpers import MOE_PRESETS, assert_bit_exact, hf_config, hf_tensors, to_hf, to_mcore

LAYOUTS = sorted({
    (ep, tp, pp, etp if tp > 1 else 1)
    for ep, tp, pp, etp in itertools.product([1, 2, 4], [1, 2], [1, 2], [1, 2])
})


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
@pytest.mark.parametrize("ep, tp, pp, etp", LAYOUTS)
@pytest.mark.parametrize("preset", MOE_PRESETS)
def test_moe_round_trip_bit_exact(tiny_moe, tmp_path, preset, ep, tp, pp, etp, fmt):
    src = tiny_moe[preset]
    mcore = to_mcore(src, tmp_path / "mcore", fmt, tp=tp, pp=pp, ep=ep, etp=etp)
    back = to_hf(mcore, tmp_path / "hf")
    assert_bit_exact(hf_tensors(src), hf_tensors(back))
    assert hf_config(back) == hf_config(src)


def test_legacy_expert_folders_and_local_numbering(tiny_moe, tmp_path):
    mcore = to_mcore(tiny_moe["mixtral-8x7b"], tmp_path / "m", "torch", tp=2, pp=2, ep=4, etp=1)
    dirs = sorted(p.name for p in (mcore / "release").iterdir())
    assert len(dirs) == 16 and dirs[0] == "mp_rank_00_000_000" and dirs[-1] == "mp_rank_01_001_003"
    sd = safe_load(mcore / "release" / "mp_rank_01_000_003" / FILE)["model"]
    experts = sorted(k for k in sd if "local_experts" in k and k.endswith(".weight"))
    # 8 experts over EP 4: two local experts, numbered 0 and 1 on every EP rank; ETP 1 keeps them whole
    assert experts == [f"decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc{i}.weight" for e in (0, 1) for i in (1, 2)]
    assert sd["decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight"].shape == (256, 64)  # [gate; up] of 128
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in sd  # dense weights on every EP rank
    src = hf_tensors(tiny_moe["mixtral-8x7b"])
    ep3_expert1 = sd["decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight"]
    assert ep3_expert1.equal(src["model.layers.0.block_sparse_moe.experts.7.w2.weight"])


def test_torch_dist_expert_axis(tiny_moe, tmp_path):
    mcore = to_mcore(tiny_moe["qwen3-30b-a3b"], tmp_path / "m", "torch_dist", tp=2, ep=2)
    md = open_source(mcore).metadata.state_dict_metadata
    fc1 = md["decoder.layers.mlp.experts.experts.linear_fc1.weight"]
    assert tuple(fc1.size) == (2, 8, 64, 64)  # (layers, experts, [gate; up], hidden)
    assert len(fc1.chunks) == 2 * 8 * 4  # per layer, expert and (gate, up) x ETP 2 region
    assert "decoder.layers.pre_mlp_layernorm.weight" in md and "decoder.layers.mlp.router.weight" in md


@pytest.mark.parametrize("args, message", [
    (["--ep", "3"], "--ep 3 does not divide num_moe_experts=8"),
    (["--format", "torch", "--tp", "4", "--etp", "2"], "legacy format supports --etp 1 or --etp 4"),
])
def test_moe_layout_errors(tiny_moe, tmp_path, args, message):
    r = CliRunner().invoke(main, ["convert", "--src", "hf", "--dst", "mcore", *args, str(tiny_moe["mixtral-8x7b"]), str(tmp_path / "o")])
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_ep_on_dense_model_refused(tiny_hf, tmp_path):
    r = CliRunner().invoke(main, ["convert", "--src", "hf", "--dst", "mcore", "--ep", "2", str(tiny_hf["llama3.1-8b"]), str(tmp_path / "o")])
    assert r.exit_code == 2 and "--ep 2 needs a mixture-of-experts model" in r.output


def test_dense_replica_mismatch_across_ep_ranks_is_an_error(tiny_moe, tmp_path):
    import torch

    mcore = to_mcore(tiny_moe["qwen3-30b-a3b"], tmp_path / "m", "torch", ep=2)
    path = mcore / "release" / "mp_rank_00_001" / FILE
    state = torch.load(path, weights_only=False)
    state["model"]["decoder.layers.1.self_attention.linear_proj.weight"][0, 0] += 1
    torch.save(state, path)
    r = CliRunner().invoke(main, ["convert", "--src", "mcore", "--dst", "hf", str(mcore), str(tmp_path / "o")])
    assert r.exit_code == 2 and "differs between EP rank 0 and EP rank 1" in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_deepseek_non_homogeneous_layers_and_fp32_router_bias(tiny_moe, tmp_path):
    """First-k-dense layers keep per-layer torch_dist keys; the expert-score bias stays fp32 under --dtype bf16."""
    import torch

    from ckptbridge.convert import Target, convert
    from ckptbridge.layout import ParallelLayout

    src = tiny_moe["deepseek-v3"]
    convert(src, tmp_path / "m", None, Target("mcore", ParallelLayout(tp=2, ep=2), dtype=torch.bfloat16))
    md = open_source(tmp_path / "m").metadata.state_dict_metadata
    assert "decoder.layers.0.mlp.linear_fc1.weight" in md and "decoder.layers.0.mlp.router.weight" not in md
    assert tuple(md["decoder.layers.1.mlp.experts.experts.linear_fc1.weight"].size) == (8, 64, 64)
    assert md["decoder.layers.3.mlp.router.expert_bias"].properties.dtype == torch.float32
    assert md["decoder.layers.3.mlp.router.weight"].properties.dtype == torch.bfloat16
    assert not any(k.startswith("decoder.layers.self_attention") for k in md)  # nothing stacked
    back = hf_tensors(to_hf(tmp_path / "m", tmp_path / "hf"))
    original = hf_tensors(src)
    bias = "model.layers.2.mlp.gate.e_score_correction_bias"
    assert back[bias].dtype == torch.float32 and back[bias].equal(original[bias])
    assert back["model.layers.2.mlp.gate.weight"].equal(original["model.layers.2.mlp.gate.weight"].to(torch.bfloat16))


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_deepseek_mla_without_q_lora(tmp_path, fmt):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ckptbridge.presets import load_preset, shrink_config

    raw = shrink_config(load_preset("deepseek-v3")["hf_config"], layers=2)
    raw["q_lora_rank"] = None
    model_type = raw.pop("model_type")
    raw.pop("architectures")
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **raw)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path / "src")
    mcore = to_mcore(tmp_path / "src", tmp_path / "m", fmt, tp=2, ep=2)
    back = to_hf(mcore, tmp_path / "hf")
    original = hf_tensors(tmp_path / "src")
    assert "model.layers.1.self_attn.q_proj.weight" in original
    assert_bit_exact(original, hf_tensors(back))


def test_grouped_gemm_legacy_names(tiny_moe, tmp_path):
    from ckptbridge.convert import Target, convert
    from ckptbridge.layout import ParallelLayout

    src = tiny_moe["qwen3-30b-a3b"]
    convert(src, tmp_path / "g", None, Target("mcore", ParallelLayout(tp=2, ep=2), "torch", grouped_gemm=True))
    sd = safe_load(tmp_path / "g" / "release" / "mp_rank_01_001" / FILE)
    assert sd["args"].moe_grouped_gemm is True
    keys = sorted(k for k in sd["model"] if ".experts." in k)
    assert keys[:2] == ["decoder.layers.0.mlp.experts.linear_fc1.weight0", "decoder.layers.0.mlp.experts.linear_fc1.weight1"]
    assert not any("local_experts" in k for k in sd["model"])
    sequential = to_mcore(tmp_path / "g", tmp_path / "s", "torch", tp=1, ep=4)  # regroup and re-layout
    assert_bit_exact(hf_tensors(src), hf_tensors(to_hf(sequential, tmp_path / "hf")))
    assert_bit_exact(hf_tensors(src), hf_tensors(to_hf(tmp_path / "g", tmp_path / "hf2")))


@pytest.mark.parametrize("preset", ["mixtral-8x7b", "qwen1.5-moe-a2.7b", "deepseek-v3"])
def test_reads_transformers5_fused_expert_layout(tiny_moe, tmp_path, preset):
    """``save_pretrained(save_original_format=False)`` stores experts fused; we read it and write per-expert."""
    from transformers import AutoModelForCausalLM

    src = tiny_moe[preset]
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(tmp_path / "fused", save_original_format=False)
    fused = hf_tensors(tmp_path / "fused")
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in fused)
    mcore = to_mcore(tmp_path / "fused", tmp_path / "m", "torch", tp=2, ep=2)
    back = hf_tensors(to_hf(mcore, tmp_path / "hf"))
    assert_bit_exact(hf_tensors(src), back)  # the per-expert on-disk layout, bit for bit


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_moe_with_virtual_pipeline(tiny_moe, tmp_path, fmt):
    src = tiny_moe["deepseek-v3"]  # 4 layers: PP 2 x VPP 2, one layer per chunk, dense layer 0 in chunk 0
    mcore = to_mcore(src, tmp_path / "m", fmt, tp=2, pp=2, vpp=2, ep=2, etp=1)
    assert_bit_exact(hf_tensors(src), hf_tensors(to_hf(mcore, tmp_path / "hf")))
