"""DeepSeek-V3 multi-token-prediction (MTP) blocks: mapped declaratively, round-tripped bit-exactly.

The hub checkpoint numbers MTP blocks after the decoder (``model.layers.{n + d}.*``); megatron-core
keeps them under ``mtp.layers.{d}.*`` on the last pipeline stage and shares the model's embedding
and output layer with them, so the blocks' ``embed_tokens`` / ``shared_head.head`` copies must be
exact and are written back as copies.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from ckptbridge.cli import main
from ckptbridge.formats.detect import open_source
from ckptbridge.formats.legacy import FILE
from ckptbridge.formats.mcore_common import safe_load
from helpers import add_mtp_blocks, assert_bit_exact, hf_config, hf_tensors, to_hf, to_mcore


@pytest.fixture(scope="module")
def mtp_model(tiny_moe, tmp_path_factory) -> Path:
    """The 4-layer tiny DeepSeek-V3 (1 dense + 3 MoE layers) with two MTP blocks (layers 4 and 5)."""
    return add_mtp_blocks(tiny_moe["deepseek-v3"], tmp_path_factory.mktemp("mtp") / "hf", depth=2)


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
@pytest.mark.parametrize("layout", [
    dict(),
    dict(tp=2, pp=2, ep=2),
    dict(tp=2, pp=2, vpp=2, ep=4, etp=1),
], ids=["single", "tp2pp2ep2", "tp2pp2vpp2ep4etp1"])
def test_mtp_round_trip_bit_exact(mtp_model, tmp_path, fmt, layout):
    mcore = to_mcore(mtp_model, tmp_path / "m", fmt, **layout)
    back = to_hf(mcore, tmp_path / "hf")
    assert_bit_exact(hf_tensors(mtp_model), hf_tensors(back))  # the embed/head copies included
    assert hf_config(back) == hf_config(mtp_model)


def test_mtp_torch_dist_keys(mtp_model, tmp_path):
    """Per-block keys without a layer axis (megatron passes MTP layers no layer offset), experts with
    an expert axis, TE-spec names, the empty extra states of every linear, no copy of the embedding."""
    mcore = to_mcore(mtp_model, tmp_path / "m", "torch_dist", tp=2, ep=2)
    md = open_source(mcore).metadata.state_dict_metadata
    mtp = sorted(k for k in md if k.startswith("mtp."))
    assert {k.split(".")[2] for k in mtp} == {"0", "1"}
    assert tuple(md["mtp.layers.1.eh_proj.weight"].size) == (64, 128)
    assert tuple(md["mtp.layers.0.transformer_layer.mlp.experts.experts.linear_fc1.weight"].size) == (8, 64, 64)
    assert "mtp.layers.0.transformer_layer.self_attention.linear_q_up_proj.layer_norm_weight" in md
    assert "mtp.layers.1.transformer_layer.pre_mlp_layernorm.weight" in md  # built like the last (MoE) layer
    assert "mtp.layers.0.final_layernorm.weight" in md and "mtp.layers.0.enorm.weight" in md
    assert "mtp.layers.0.eh_proj._extra_state/shard_0_1" in md
    assert "mtp.layers.1.transformer_layer.mlp.experts.experts.linear_fc2._extra_state/shard_7_8" in md
    assert not any("embed_tokens" in k or "shared_head" in k for k in md)
    assert safe_load(mcore / "release" / "common.pt")["args"].mtp_num_layers == 2


def test_mtp_legacy_last_stage_and_embedding_replica(mtp_model, tmp_path):
    mcore = to_mcore(mtp_model, tmp_path / "m", "torch", tp=2, pp=2, ep=2)
    first = safe_load(mcore / "release" / "mp_rank_01_000_001" / FILE)["model"]  # TP rank 1, stage 0
    last = safe_load(mcore / "release" / "mp_rank_01_001_001" / FILE)["model"]
    assert not any(k.startswith("mtp.") for k in first)
    # EP rank 1 holds global experts 4..7 as local 0..3, in MTP blocks as in decoder layers
    assert "mtp.layers.1.transformer_layer.mlp.experts.local_experts.3.linear_fc2.weight" in last
    assert "mtp.layers.1.transformer_layer.mlp.experts.local_experts.4.linear_fc2.weight" not in last
    assert last["mtp.layers.0.eh_proj.weight"].shape == (32, 128)  # column-parallel over TP 2
    assert "mtp.layers.0.eh_proj._extra_state" in last
    # the last stage keeps the embedding its MTP blocks use: the same shard as the first stage's
    assert last["embedding.word_embeddings.weight"].equal(first["embedding.word_embeddings.weight"])
    src = hf_tensors(mtp_model)
    e7 = last["mtp.layers.1.transformer_layer.mlp.experts.local_experts.3.linear_fc2.weight"]
    assert e7.equal(src["model.layers.5.mlp.experts.7.down_proj.weight"][:, 16:])  # row-parallel, TP rank 1


def test_mtp_relayout_mcore_to_mcore(mtp_model, tmp_path):
    dist = to_mcore(mtp_model, tmp_path / "d", "torch_dist", tp=2, ep=2)
    legacy = to_mcore(dist, tmp_path / "l", "torch", tp=1, pp=2, ep=4, spec="local")
    assert "mtp.layers.0.transformer_layer.self_attention.q_layernorm.weight" in safe_load(
        legacy / "release" / "mp_rank_00_001_003" / FILE)["model"]
    assert_bit_exact(hf_tensors(mtp_model), hf_tensors(to_hf(legacy, tmp_path / "hf")))


def _rewrite(src: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dst)
    tensors = hf_tensors(src)
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _convert_error(src: Path, out: Path) -> str:
    r = CliRunner().invoke(main, ["convert", "--src", "hf", "--dst", "mcore", str(src), str(out)])
    assert r.exit_code == 2, r.output
    assert not out.exists()
    return r.output


def test_mtp_copy_that_differs_is_refused(mtp_model, tmp_path):
    def edit(t):
        t["model.layers.5.shared_head.head.weight"][3, 3] += 1

    out = _convert_error(_rewrite(mtp_model, tmp_path / "src", edit), tmp_path / "o")
    assert "'model.layers.5.shared_head.head.weight'" in out and "not an exact copy of 'lm_head.weight'" in out


def test_partial_mtp_block_is_missing_tensor(mtp_model, tmp_path):
    out = _convert_error(_rewrite(mtp_model, tmp_path / "src", lambda t: t.pop("model.layers.4.hnorm.weight")),
                         tmp_path / "o")
    assert "missing tensor 'model.layers.4.hnorm.weight'" in out


def test_mtp_tensors_beyond_the_config_are_unmapped(mtp_model, tmp_path):
    src = _rewrite(mtp_model, tmp_path / "src", lambda t: None)
    config = hf_config(src)
    config["num_nextn_predict_layers"] = 1  # the file holds two blocks
    (src / "config.json").write_text(json.dumps(config))
    assert "unmapped source tensor 'model.layers.5." in _convert_error(src, tmp_path / "o")


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_checkpoint_without_mtp_tensors_converts_without_mtp(tiny_moe, tmp_path, fmt):
    """transformers' save_pretrained keeps num_nextn_predict_layers (1) and drops the blocks: no MTP in
    MCore (mtp_num_layers None, recorded so that the way back writes none), config unchanged."""
    src = tiny_moe["deepseek-v3"]
    assert hf_config(src)["num_nextn_predict_layers"] == 1
    mcore = to_mcore(src, tmp_path / "m", fmt, pp=2)
    source = open_source(mcore)
    assert source.margs["mtp_num_layers"] is None and source.spec.mtp_depth == 0
    assert not any(pt.mcore_name.startswith("mtp.") for pt in source.spec.planned())
    back = to_hf(mcore, tmp_path / "hf")
    assert_bit_exact(hf_tensors(src), hf_tensors(back))
    assert hf_config(back) == hf_config(src)


def test_no_mtp_field_changes_nothing(tiny_moe, tmp_path):
    src = _rewrite(tiny_moe["deepseek-v3"], tmp_path / "src", lambda t: None)
    config = hf_config(src)
    del config["num_nextn_predict_layers"]
    (src / "config.json").write_text(json.dumps(config))
    mcore = to_mcore(src, tmp_path / "m", "torch_dist")
    common = safe_load(mcore / "release" / "common.pt")
    assert common["args"].mtp_num_layers is None and "overrides" not in common["ckptbridge"]
    assert_bit_exact(hf_tensors(src), hf_tensors(to_hf(mcore, tmp_path / "hf")))


def test_mtp_embedding_replica_drift_is_an_error(mtp_model, tmp_path):
    mcore = to_mcore(mtp_model, tmp_path / "m", "torch", pp=2)
    path = mcore / "release" / "mp_rank_00_001" / FILE
    state = torch.load(path, weights_only=False)
    state["model"]["embedding.word_embeddings.weight"][0, 0] += 1
    torch.save(state, path)
    r = CliRunner().invoke(main, ["convert", "--src", "mcore", "--dst", "hf", str(mcore), str(tmp_path / "o")])
    assert r.exit_code == 2 and "is not an exact replica of embedding.word_embeddings.weight" in r.output, r.output
