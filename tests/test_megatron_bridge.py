"""Megatron-Bridge's checkpoints (no ``args`` in common.pt; the model in ``run_config.yaml``) read, and the
``run_config.yaml`` ckptbridge writes for Megatron-Bridge's ``export_ckpt``.

Megatron-Bridge cannot be installed here (its dependencies need CUDA builds), so its files are made the
way its 0.3.1 source writes them: the model provider is a megatron-core ``TransformerConfig`` subclass
dumped field by field with ``yaml.safe_dump`` (functions and dtypes as ``{_target_, _call_: false}``,
enums as ``{_target_, _call_: true, _args_}``, other objects as ``{_target_, _call_: true}``); the
``TransformerConfig`` here is megatron-core's real one, built for the model by ckptbridge's builder.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from ckptbridge.compare import compare
from ckptbridge.config_source import ConfigOptions
from ckptbridge.convert import Target, convert
from ckptbridge.formats.bridge_config import MLA_PROVIDER, RUN_CONFIG, run_config
from ckptbridge.formats.detect import open_source
from ckptbridge.layout import ParallelLayout
from ckptbridge.presets import build_tiny_hf
from helpers import hf_tensors

#: GPTModelProvider's own fields besides TransformerConfig's (Megatron-Bridge v0.3.1 models/gpt_provider.py)
PROVIDER_FIELDS = {"share_embeddings_and_output_weights", "make_vocab_size_divisible_by", "position_embedding_type",
                   "rotary_base", "rotary_percent", "rope_scaling", "rope_scaling_factor", "rotary_scaling_factor",
                   "seq_length", "vocab_size", "should_pad_vocab", "virtual_pipeline_model_parallel_size"}


def _bridge_value(value):
    """A value as Megatron-Bridge's YAML representers write it."""
    if isinstance(value, enum.Enum):
        return {"_target_": f"{type(value).__module__}.{type(value).__qualname__}", "_call_": True, "_args_": [value.value]}
    if isinstance(value, torch.dtype):
        return {"_target_": str(value), "_call_": False}
    if callable(value) and hasattr(value, "__qualname__"):
        return {"_target_": f"{inspect.getmodule(value).__name__}.{value.__qualname__}", "_call_": False}
    if isinstance(value, (list, tuple)):
        return [_bridge_value(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return {"_target_": f"{type(value).__module__}.{type(value).__qualname__}", "_call_": True}


def _as_bridge(mcore: Path, hf: Path) -> Path:
    """Turn a ckptbridge torch_dist output into what Megatron-Bridge writes: tracker 0, iter_0000000/, a
    common.pt without args, run_config.yaml with the full provider, the HF tokenizer under tokenizer/."""
    from ckptbridge.harness.checkpoint_args import checkpoint_args
    from ckptbridge.mcore.model import transformer_config_from_args

    it = mcore / "iter_0000000"
    args = checkpoint_args(it)
    tc = transformer_config_from_args(args, dtype=torch.float32)
    model = {"_target_": MLA_PROVIDER if args.multi_latent_attention else "megatron.bridge.models.gpt_provider.GPTModelProvider"}
    model.update({f.name: _bridge_value(getattr(tc, f.name)) for f in dataclasses.fields(tc) if not f.name.startswith("_")})
    model.update(share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                 position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
                 rotary_percent=args.rotary_percent, rope_scaling=bool(args.use_rope_scaling),
                 rope_scaling_factor=args.rope_scaling_factor, seq_length=args.max_position_embeddings,
                 vocab_size=args.vocab_size, should_pad_vocab=False, make_vocab_size_divisible_by=1)
    (it / RUN_CONFIG).write_text(yaml.safe_dump({"_target_": "megatron.bridge.training.config.ConfigContainer",
                                                 "model": model}))
    torch.save({"checkpoint_version": 3.0, "iteration": 0,
                "content_metadata": {"distrib_optim_sharding_type": "dp_reshardable"}}, it / "common.pt")
    (it / "tokenizer").mkdir()
    (it / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    shutil.rmtree(mcore / "hf_assets", ignore_errors=True)
    return mcore


@pytest.mark.parametrize("preset", ["llama3.1-8b", "qwen3-30b-a3b", "deepseek-v3"])
def test_megatron_bridge_checkpoint_exports(tmp_path, preset):
    hf = build_tiny_hf(preset, tmp_path / "hf", layers=2, seed=5)
    mcore = tmp_path / "bridge"
    convert(hf, mcore, "hf", Target("mcore", ParallelLayout(), vocab_divisible_by=1, iteration=0))
    _as_bridge(mcore, hf)
    source = open_source(mcore)
    assert source.common.producer == "Megatron-Bridge" and source.common.iteration == 0
    source.close()
    assert all(d.bit_exact for d in compare(hf, mcore))
    out = tmp_path / "out"
    convert(mcore, out, "mcore", Target("hf"), config=ConfigOptions())
    ref, got = hf_tensors(hf), hf_tensors(out)
    assert sorted(ref) == sorted(got) and all(torch.equal(ref[k], got[k]) for k in ref)
    assert (out / "tokenizer_config.json").exists()  # Megatron-Bridge's tokenizer/ travels with the export


def test_written_run_config_names_only_provider_fields(tmp_path):
    """Megatron-Bridge instantiates the ``model:`` section as a provider dataclass: an unknown keyword fails."""
    from megatron.core.transformer import MLATransformerConfig, TransformerConfig

    known = {f.name for f in dataclasses.fields(TransformerConfig)} | PROVIDER_FIELDS
    mla_known = known | {f.name for f in dataclasses.fields(MLATransformerConfig)}
    for preset in ("llama3.1-8b", "qwen3-30b-a3b", "deepseek-v3"):
        hf = build_tiny_hf(preset, tmp_path / preset, layers=2)
        out = tmp_path / f"{preset}-m"
        convert(hf, out, "hf", Target("mcore", iteration=0))
        model = yaml.safe_load((out / "iter_0000000" / RUN_CONFIG).read_text())["model"]
        fields = {k for k in model if not k.startswith("_")}
        assert fields <= (mla_known if model["_target_"] == MLA_PROVIDER else known), fields - known
        assert model["activation_func"]["_target_"] == "torch.nn.functional.silu"


def test_run_config_round_trip_reads_as_the_same_model(tmp_path):
    """What ckptbridge writes for Megatron-Bridge, read back alone (args and record removed), describes the
    same model: the synthesized HF config converts the checkpoint bit-exactly."""
    hf = build_tiny_hf("llama3.1-8b", tmp_path / "hf", layers=2)
    mcore = tmp_path / "m"
    convert(hf, mcore, "hf", Target("mcore", ParallelLayout(tp=2), iteration=0))
    torch.save({"checkpoint_version": 3.0, "iteration": 0}, mcore / "iter_0000000" / "common.pt")
    assert run_config({"swiglu": True, "padded_vocab_size": 8, "vocab_size": 8})["model"]["gated_linear_unit"]
    assert all(d.bit_exact for d in compare(hf, mcore))
