"""A checkpoint written by Megatron-LM's own ``save_checkpoint`` (tag core_v0.16.1, TP2 x PP2 torch_dist,
distributed-optimizer state, ``iter_0000100``; tests/fixtures/megatron-lm/README.md) read as a user would:
``inspect``, ``compare``, ``convert --src mcore --dst hf`` with and without the HF folder, and a reshard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from ckptbridge.cli import main
from ckptbridge.compare import compare
from ckptbridge.config_source import ConfigOptions
from ckptbridge.convert import Target, convert
from ckptbridge.formats.detect import open_source
from ckptbridge.formats.mcore_common import is_training_state
from ckptbridge.layout import ParallelLayout
from helpers import hf_tensors

FIXTURES = Path(__file__).parent / "fixtures" / "megatron-lm"
HF = FIXTURES / "llama-hf"
MLM = FIXTURES / "llama-td-tp2pp2"
TOKENS = torch.randint(0, 1001, (2, 16), generator=torch.Generator().manual_seed(3))


def _logits(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(TOKENS).logits


def _run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_inspect_explains_a_megatron_lm_checkpoint():
    res = _run("inspect", "--json", MLM)
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["format"] == "torch_dist" and info["producer"] == "Megatron-LM" and info["iteration"] == 100
    assert info["layout"]["tp"] == 2 and info["layout"]["pp"] == 2
    assert info["architecture"] == "LlamaForCausalLM" and info["hf_config"] == "synthesized from Megatron args (llama)"
    assert "optimizer state" in info["training_state"] and "not read" in info["training_state"]


def test_every_tensor_is_the_hf_models():
    diffs = compare(HF, MLM)
    assert len(diffs) == 15 and all(d.bit_exact for d in diffs)


@pytest.mark.parametrize("with_hf_config", [False, True])
def test_export_to_hf_loads_in_transformers_with_the_same_logits(tmp_path, with_hf_config):
    flags = ["--hf-config", HF] if with_hf_config else []
    res = _run("convert", "--src", "mcore", "--dst", "hf", *flags, MLM, tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert "dropped training state: optimizer state" in res.output
    out = tmp_path / "out"
    ref = hf_tensors(HF)
    got = hf_tensors(out)
    assert sorted(ref) == sorted(got) and all(torch.equal(ref[k], got[k]) for k in ref)
    assert (out / "generation_config.json").exists() == with_hf_config
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling" if "rope_scaling" in cfg else "rope_parameters"]["rope_type"] == "llama3"
    assert torch.equal(_logits(out), _logits(HF))


def test_a_disagreeing_hf_config_is_refused_naming_the_field(tmp_path):
    for field, value, arg in [("num_hidden_layers", 3, "num_layers"), ("rope_theta", 10000.0, "rotary_base")]:
        bad = tmp_path / f"bad-{field}"
        shutil.copytree(HF, bad)
        cfg = json.loads((bad / "config.json").read_text())
        cfg.pop("rope_parameters", None) if field == "rope_theta" else None
        if field == "rope_theta":
            cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}
        cfg[field] = value
        (bad / "config.json").write_text(json.dumps(cfg))
        res = _run("convert", "--src", "mcore", "--dst", "hf", "--hf-config", bad, MLM, tmp_path / "out")
        assert res.exit_code == 2 and f"{arg} is" in res.output and field in res.output, res.output
        assert not (tmp_path / "out").exists()


def test_iteration_flag_and_tracker(tmp_path):
    root = tmp_path / "run"
    shutil.copytree(MLM, root)
    res = _run("inspect", "--json", "--no-tensors", "--iteration", "100", root)
    assert res.exit_code == 0 and json.loads(res.output)["iteration"] == 100
    res = _run("inspect", "--iteration", "7", root)
    assert res.exit_code == 2 and "iter_0000007" in res.output and "iter_0000100" in res.output


def test_export_reads_about_the_models_bytes_not_the_optimizers(tmp_path):
    """The optimizer state in the same .distcp files is never read: bytes read stay near the model's size."""
    io = Path("/proc/self/io")
    if not io.exists():
        pytest.skip("no /proc/self/io")

    def rchar() -> int:
        return int(next(line.split()[1] for line in io.read_text().splitlines() if line.startswith("rchar")))

    it = MLM / "iter_0000100"
    source_bytes = sum(p.stat().st_size for p in it.glob("*.distcp"))
    model_bytes = sum(t.numel() * t.element_size() for t in hf_tensors(HF).values())
    source = open_source(MLM)
    model_chunks = [c for k, cs in source.chunks.items() if not is_training_state(k) for c in cs]
    skipped = source.training_state()
    source.close()
    before = rchar()
    convert(MLM, tmp_path / "out", "mcore", Target("hf"), config=ConfigOptions())
    read = rchar() - before
    assert skipped.bytes > 4 * model_bytes  # the optimizer state dominates the data files
    # each model chunk's record (torch's zip reader re-reads its small directory a few times: < 40 KiB a record,
    # nothing next to a real model's chunks), common.pt and .metadata
    budget = (sum(c.info.length + 40 * 1024 for c in model_chunks) + (it / "common.pt").stat().st_size
              + (it / ".metadata").stat().st_size)
    assert read < budget < source_bytes, (read, budget, source_bytes)


def test_reshard_megatron_lm_checkpoint_to_another_layout(tmp_path):
    for fmt, layout in [("torch_dist", ParallelLayout(tp=1, pp=1)), ("torch", ParallelLayout(tp=2, pp=1))]:
        out = tmp_path / fmt
        convert(MLM, out, "mcore", Target("mcore", layout, fmt), config=ConfigOptions())
        diffs = compare(HF, out)
        assert diffs and all(d.bit_exact for d in diffs)


def test_local_spec_moe_pre_mlp_norm_name_is_read(tmp_path):
    """megatron-core's local MoE layer saves its pre-MLP norm as ``mlp.linear_fc1.layer_norm_weight`` in
    torch_dist (the TE MoE layer as ``pre_mlp_layernorm.weight``): a Megatron-LM run with
    ``--transformer-impl local`` writes that name; it reads as the same tensor."""
    from ckptbridge.formats import dcp_metadata
    from ckptbridge.formats.dcp_metadata import MetadataIndex
    from ckptbridge.presets import build_tiny_hf
    from helpers import to_mcore

    hf = build_tiny_hf("qwen3-30b-a3b", tmp_path / "hf")
    it = to_mcore(hf, tmp_path / "m") / "release"
    te, local = "decoder.layers.pre_mlp_layernorm.weight", "decoder.layers.mlp.linear_fc1.layer_norm_weight"
    with open(it / ".metadata", "rb") as f:
        md = dcp_metadata.load(f)
    assert te in md.state_dict_metadata and local not in md.state_dict_metadata
    md.state_dict_metadata[local] = md.state_dict_metadata.pop(te)
    md.storage_data = {(MetadataIndex(local, i.offset, i.index) if i.fqn == te else i): v for i, v in md.storage_data.items()}
    md.planner_data = {(local if k == te else k): v for k, v in md.planner_data.items()}
    with open(it / ".metadata", "wb") as f:
        dcp_metadata.dump(md, f)
    diffs = compare(hf, tmp_path / "m")
    assert diffs and all(d.bit_exact for d in diffs)


def test_legacy_file_with_te_extra_states_numpy_rng_and_optimizer(tmp_path):
    """What a Megatron-LM legacy rank file holds besides the model: TransformerEngine ``_extra_state``
    entries as BytesIO (``core_attention._extra_state`` too), numpy RNG states, optimizer tensors: read
    with ``weights_only`` and the allow-list, the optimizer counted and never read."""
    import io

    import numpy as np

    from ckptbridge.formats.legacy import FILE
    from helpers import to_mcore

    mcore = to_mcore(HF, tmp_path / "m", fmt="torch")
    path = mcore / "release" / "mp_rank_00" / FILE
    state = torch.load(path, weights_only=False)
    state["model"]["decoder.layers.0.self_attention.core_attention._extra_state"] = io.BytesIO(b"te-state")
    state["rng_state"] = [{"random_rng_state": ("MT19937", np.arange(624, dtype=np.uint32), 624, 0, 0.0),
                           "np_rng_state": ("MT19937", np.arange(624, dtype=np.uint32), 624, 0, 0.0),
                           "torch_rng_state": torch.zeros(16, dtype=torch.uint8)}]
    state["optimizer"] = {"optimizer": {"state": {0: {"exp_avg": torch.ones(64, 64)}}, "param_groups": []}}
    torch.save(state, path)
    source = open_source(mcore)
    skipped = source.training_state()
    source.close()
    assert "optimizer state" in skipped.kinds and skipped.bytes >= 64 * 64 * 4
    diffs = compare(HF, mcore)
    assert diffs and all(d.bit_exact for d in diffs)
