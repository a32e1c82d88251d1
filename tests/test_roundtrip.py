"""HF -> MCore -> HF is bit-exact for every architecture, layout and MCore format."""

from __future__ import annotations

import pytest
import torch

from ckptbridge.formats.detect import open_source
from ckptbridge.formats.legacy import FILE
from ckptbridge.formats.mcore_common import safe_load

from helpers import DENSE_PRESETS, assert_bit_exact, hf_config, hf_tensors, to_hf, to_mcore

LAYOUTS = {
    "tp1pp1": dict(tp=1, pp=1),
    "tp2pp1": dict(tp=2, pp=1),
    "tp4pp1": dict(tp=4, pp=1),
    "tp1pp2": dict(tp=1, pp=2),
    "tp2pp2": dict(tp=2, pp=2),
    "tp4pp2": dict(tp=4, pp=2),
    "tp2pp2vpp2": dict(tp=2, pp=2, vpp=2),
    "tp1pp3uneven": dict(tp=1, pp=3, pp_first=1, pp_last=1),
}


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("preset", DENSE_PRESETS)
def test_hf_mcore_hf_bit_exact(tiny_hf, tmp_path, preset, layout, fmt):
    src = tiny_hf[preset]
    mcore = to_mcore(src, tmp_path / "mcore", fmt, **LAYOUTS[layout])
    back = to_hf(mcore, tmp_path / "hf")
    assert_bit_exact(hf_tensors(src), hf_tensors(back))
    assert hf_config(back) == hf_config(src)


def test_local_spec_names_round_trip(tiny_hf, tmp_path):
    src = tiny_hf["qwen3-8b"]
    mcore = to_mcore(src, tmp_path / "mcore", "torch", spec="local", tp=2, pp=2)
    keys = safe_load(mcore / "release" / "mp_rank_00_000" / FILE, map_location="meta")["model"]
    assert "decoder.layers.0.input_layernorm.weight" in keys
    assert "decoder.layers.0.pre_mlp_layernorm.weight" in keys
    assert not any("layer_norm_weight" in k for k in keys)
    assert_bit_exact(hf_tensors(src), hf_tensors(to_hf(mcore, tmp_path / "hf")))


def test_bf16_cast_round_trip(tiny_hf, tmp_path):
    from ckptbridge.convert import Target, convert

    src = tiny_hf["llama3.2-1b"]
    convert(src, tmp_path / "bf16", None, Target("mcore", dtype=torch.bfloat16))
    back = to_hf(tmp_path / "bf16", tmp_path / "hf")
    expected = {k: v.to(torch.bfloat16) for k, v in hf_tensors(src).items()}
    assert_bit_exact(expected, hf_tensors(back))
    assert hf_config(back)["dtype"] == "bfloat16"


def _canonical(path):
    source = open_source(path)
    try:
        return {pt.mcore_name: source.read(pt) for pt in source.spec.planned()}, source.margs
    finally:
        source.close()


def test_reshard_legacy_to_torch_dist_equals_direct(tiny_hf, tmp_path):
    src = tiny_hf["llama3.1-8b"]
    legacy = to_mcore(src, tmp_path / "legacy", "torch", tp=2, pp=2)
    resharded = to_mcore(legacy, tmp_path / "resharded", "torch_dist", tp=1, pp=1)
    direct = to_mcore(src, tmp_path / "direct", "torch_dist", tp=1, pp=1)
    a, margs_a = _canonical(resharded)
    b, margs_b = _canonical(direct)
    assert_bit_exact(a, b)
    assert margs_a == margs_b
    ma = open_source(resharded).metadata.state_dict_metadata
    mb = open_source(direct).metadata.state_dict_metadata

    def layout_of(md):
        return {k: (v.size, [c.offsets for c in v.chunks]) if hasattr(v, "chunks") else "bytes" for k, v in md.items()}

    assert layout_of(ma) == layout_of(mb)
    assert "decoder.layers.mlp.linear_fc1._extra_state/shard_3_4" in ma


def test_reshard_torch_dist_to_legacy_vpp_equals_direct(tiny_hf, tmp_path):
    src = tiny_hf["qwen2.5-0.5b"]
    dist = to_mcore(src, tmp_path / "dist", "torch_dist", tp=2, pp=2)
    resharded = to_mcore(dist, tmp_path / "resharded", "torch", tp=1, pp=2, vpp=2)
    direct = to_mcore(src, tmp_path / "direct", "torch", tp=1, pp=2, vpp=2)
    files = sorted(p.relative_to(direct) for p in direct.rglob(FILE))
    assert files == sorted(p.relative_to(resharded) for p in resharded.rglob(FILE)) and len(files) == 2
    for rel in files:
        a, b = safe_load(resharded / rel), safe_load(direct / rel)
        assert sorted(k for k in a if k.startswith("model")) == ["model0", "model1"]
        for mk in ("model0", "model1"):
            assert_bit_exact(a[mk], b[mk])
        assert vars(a["args"]) == vars(b["args"])
