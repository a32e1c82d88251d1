"""Every bad input fails before anything is written, names the tensor and file,
leaves no destination and no temporary folder, and never touches the source."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ckptbridge.cli import main
from ckptbridge.errors import MappingError
from ckptbridge.mapping.registry import MappingRegistry, mappings_dir
from ckptbridge.transform_op import Transform
from ckptbridge.transforms import TRANSFORMS

from helpers import to_mcore, tree_digest


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _run(src: Path, dst: Path, *args: str):
    before = tree_digest(src)
    result = CliRunner().invoke(main, ["convert", *args, str(src), str(dst)])
    assert tree_digest(src) == before, "the source was modified"
    return result


def _assert_failed_clean(result, dst: Path, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if "ckptbridge-tmp" in p.name]


@pytest.fixture
def llama(tiny_hf, tmp_path) -> Path:
    return _copy(tiny_hf["llama3.1-8b"], tmp_path / "src")


def _rewrite_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_unmapped_tensor(llama, tmp_path):
    _rewrite_weights(llama, lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(4)))
    r = _run(llama, tmp_path / "out", "--src", "hf", "--dst", "mcore")
    _assert_failed_clean(r, tmp_path / "out", "unmapped source tensor", "model.layers.0.self_attn.rotary_emb.inv_freq",
                         str(llama / "model.safetensors"))


def test_missing_tensor(llama, tmp_path):
    _rewrite_weights(llama, lambda t: t.pop("model.layers.3.mlp.up_proj.weight"))
    r = _run(llama, tmp_path / "out", "--src", "hf", "--dst", "mcore")
    _assert_failed_clean(r, tmp_path / "out", "missing tensor", "model.layers.3.mlp.up_proj.weight")


def test_shape_disagrees_with_config(llama, tmp_path):
    cfg = json.loads((llama / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (llama / "config.json").write_text(json.dumps(cfg))
    r = _run(llama, tmp_path / "out", "--src", "hf", "--dst", "mcore")
    _assert_failed_clean(r, tmp_path / "out", "model.layers.0.mlp.down_proj.weight", str(llama / "model.safetensors"),
                         "has shape [64, 128], the config implies [64, 96]")


@pytest.mark.parametrize("tp, field", [(3, "num_attention_heads"), (8, "num_query_groups")])
def test_tp_does_not_divide(llama, tmp_path, tp, field):
    r = _run(llama, tmp_path / "out", "--src", "hf", "--dst", "mcore", "--tp", str(tp))
    _assert_failed_clean(r, tmp_path / "out", f"--tp {tp} does not divide {field}")


def test_pp_does_not_fit(llama, tmp_path):
    r = _run(llama, tmp_path / "out", "--src", "hf", "--dst", "mcore", "--pp", "3")
    _assert_failed_clean(r, tmp_path / "out", "4 layers cannot be split over 3 pipeline stages")


def test_unsupported_architecture(llama, tmp_path):
    cfg = json.loads((llama / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (llama / "config.json").write_text(json.dumps(cfg))
    r = _run(llama, tmp_path / "out", "--src", "hf", "--dst", "mcore")
    _assert_failed_clean(r, tmp_path / "out", "unsupported architecture 'GPT2LMHeadModel'", "supported: ", "DeepseekV3ForCausalLM", "LlamaForCausalLM",
                         "Qwen3ForCausalLM")


def test_unsupported_rope_feature(llama, tmp_path):
    cfg = json.loads((llama / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (llama / "config.json").write_text(json.dumps(cfg))
    r = _run(llama, tmp_path / "out", "--src", "hf", "--dst", "mcore")
    _assert_failed_clean(r, tmp_path / "out", "rope_scaling type 'yarn' is not supported")


def test_truncated_safetensors(llama, tmp_path):
    path = llama / "model.safetensors"
    os.truncate(path, path.stat().st_size - 100)
    r = _run(llama, tmp_path / "out", "--src", "hf", "--dst", "mcore")
    _assert_failed_clean(r, tmp_path / "out", str(path), "truncated")


def test_corrupt_safetensors_header(llama, tmp_path):
    path = llama / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"#garbage####"
    path.write_bytes(bytes(data))
    r = _run(llama, tmp_path / "out", "--src", "hf", "--dst", "mcore")
    _assert_failed_clean(r, tmp_path / "out", str(path), "corrupt safetensors header")


def test_truncated_torch_dist(tiny_hf, tmp_path):
    mcore = to_mcore(tiny_hf["llama3.1-8b"], tmp_path / "mcore", "torch_dist", tp=2)
    data = mcore / "release" / "__1_0.distcp"
    os.truncate(data, data.stat().st_size // 2)
    r = _run(mcore, tmp_path / "out", "--src", "mcore", "--dst", "hf")
    _assert_failed_clean(r, tmp_path / "out", str(data), "truncated")


def test_truncated_legacy(tiny_hf, tmp_path):
    mcore = to_mcore(tiny_hf["llama3.1-8b"], tmp_path / "mcore", "torch", tp=2, pp=2)
    data = mcore / "release" / "mp_rank_01_001" / "model_optim_rng.pt"
    os.truncate(data, data.stat().st_size - 4000)
    r = _run(mcore, tmp_path / "out", "--src", "mcore", "--dst", "hf")
    _assert_failed_clean(r, tmp_path / "out", str(data))


def test_missing_legacy_rank(tiny_hf, tmp_path):
    mcore = to_mcore(tiny_hf["llama3.1-8b"], tmp_path / "mcore", "torch", tp=2, pp=2)
    shutil.rmtree(mcore / "release" / "mp_rank_01_000")
    r = _run(mcore, tmp_path / "out", "--src", "mcore", "--dst", "hf")
    _assert_failed_clean(r, tmp_path / "out", "missing ['mp_rank_01_000']")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_legacy_pickle_allow_list(tiny_hf, tmp_path):
    mcore = to_mcore(tiny_hf["llama3.1-8b"], tmp_path / "mcore", "torch")
    path = mcore / "release" / "mp_rank_00" / "model_optim_rng.pt"
    torch.save({"model": {}, "args": _Evil()}, path)
    r = _run(mcore, tmp_path / "out", "--src", "mcore", "--dst", "hf")
    _assert_failed_clean(r, tmp_path / "out", str(path), "refused or corrupt pickle")


def test_unsafe_dcp_metadata(tiny_hf, tmp_path):
    mcore = to_mcore(tiny_hf["llama3.1-8b"], tmp_path / "mcore")
    with open(mcore / "release" / ".metadata", "wb") as f:
        pickle.dump(_Evil(), f)
    r = _run(mcore, tmp_path / "out", "--src", "mcore", "--dst", "hf")
    _assert_failed_clean(r, tmp_path / "out", "unsafe metadata", "posix.system")


def test_mcore_tensor_unmapped_in_legacy(tiny_hf, tmp_path):
    mcore = to_mcore(tiny_hf["llama3.1-8b"], tmp_path / "mcore", "torch")
    path = mcore / "release" / "mp_rank_00" / "model_optim_rng.pt"
    sd = torch.load(path, weights_only=False)
    sd["model"]["decoder.layers.0.mlp.router.weight"] = torch.zeros(2, 64)
    torch.save(sd, path)
    r = _run(mcore, tmp_path / "out", "--src", "mcore", "--dst", "hf")
    _assert_failed_clean(r, tmp_path / "out", "unmapped source tensor 'decoder.layers.0.mlp.router.weight'", str(path))


def test_existing_destination_needs_force(llama, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    r = _run(llama, dst, "--src", "hf", "--dst", "mcore")
    assert r.exit_code == 2 and "exists; pass --force" in r.output
    assert (dst / "keep.txt").read_text() == "mine"
    r = _run(llama, dst, "--src", "hf", "--dst", "mcore", "--force")
    assert r.exit_code == 0, r.output
    assert not (dst / "keep.txt").exists() and (dst / "latest_checkpointed_iteration.txt").exists()
    assert not [p for p in tmp_path.iterdir() if "ckptbridge" in p.name]


def test_destination_inside_source(llama):
    r = _run(llama, llama / "sub", "--src", "hf", "--dst", "mcore")
    assert r.exit_code == 2 and "overlaps the source" in r.output
    assert not (llama / "sub").exists()


def test_wrong_src_kind(llama, tmp_path):
    r = _run(llama, tmp_path / "out", "--src", "mcore", "--dst", "hf")
    _assert_failed_clean(r, tmp_path / "out", "--src mcore given", "hf checkpoint")


def test_failure_mid_write_leaves_nothing(llama, tmp_path, monkeypatch):
    """A crash after writing started removes the temp folder; no half checkpoint remains."""
    from ckptbridge.formats import hf as hf_format

    calls = {"n": 0}
    real = hf_format.HFSource.read

    def flaky(self, pt):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk on fire")
        return real(self, pt)

    monkeypatch.setattr(hf_format.HFSource, "read", flaky)
    r = _run(llama, tmp_path / "out", "--src", "hf", "--dst", "mcore", "--no-fast-copy")  # tensors go through read()
    assert r.exit_code != 0 and calls["n"] == 5
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "ckptbridge" in p.name]


class _Lossy(Transform):
    """Keeps only the first tensor's values: not invertible."""

    name = "lossy_test"
    arity = 2

    def to_mcore(self, hf, cfg):
        return hf[0] + hf[1]

    def to_hf(self, mcore, cfg, hf_shapes):
        return [mcore, torch.zeros_like(mcore)]

    def mcore_shape(self, hf_shapes, cfg):
        return hf_shapes[0]


def test_non_invertible_mapping_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(TRANSFORMS, "lossy_test", _Lossy())
    text = (mappings_dir() / "llama.yaml").read_text().replace("transform: concat", "transform: lossy_test")
    (tmp_path / "llama.yaml").write_text(text)
    reg = MappingRegistry(tmp_path)  # a broken file is kept aside; using it raises its error, naming the rule
    with pytest.raises(MappingError, match="rule decoder.layers.{L}.mlp.linear_fc1.weight: transform 'lossy_test' is not invertible"):
        reg.for_architecture("LlamaForCausalLM")


def test_mapping_with_duplicate_name_refused(tmp_path):
    text = (mappings_dir() / "llama.yaml").read_text().replace("hf: model.layers.{L}.mlp.down_proj.weight",
                                                                "hf: model.layers.{L}.self_attn.o_proj.weight")
    (tmp_path / "llama.yaml").write_text(text)
    with pytest.raises(MappingError, match="mapped twice"):
        MappingRegistry(tmp_path).family("llama")


def test_tied_output_replica_must_equal_embedding(tiny_hf, tmp_path):
    mcore = to_mcore(tiny_hf["llama3.2-1b"], tmp_path / "mcore", "torch", pp=2)
    path = mcore / "release" / "mp_rank_00_001" / "model_optim_rng.pt"
    sd = torch.load(path, weights_only=False)
    sd["model"]["output_layer.weight"][3, 3] += 1
    torch.save(sd, path)
    r = _run(mcore, tmp_path / "out", "--src", "mcore", "--dst", "hf")
    _assert_failed_clean(r, tmp_path / "out", "'output_layer.weight' on stage 1 is not an exact replica")
