"""Mapping files are checked against megatron-core's own model before anything is written.

* every shipped mapping's plan (torch_dist keys + global shapes, legacy per-stage keys + local shapes,
  TE and local spec) equals megatron-core's ``GPTModel`` built on the meta device at TP1 and TP2 x PP2
  (dense) or EP2 (MoE);
* a wrong MCore name, a wrong shape expression or an unknown Megatron key is refused naming it, and
  ``convert --check-megatron`` writes nothing;
* every key of a mapping's ``config:`` section reaches megatron: args -> TransformerConfig / GPTModel
  arguments hold each declared value (the passthrough test);
* megatron's opaque ``CheckpointException`` reaches the user with its cause.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ckptbridge.spec as spec_module
from ckptbridge.cli import main
from ckptbridge.convert import Target, convert
from ckptbridge.errors import MappingError, PlanError
from ckptbridge.layout import ParallelLayout
from ckptbridge.mapping.registry import MappingRegistry, default_registry, mappings_dir
from ckptbridge.megatron_args import full_megatron_lm_args, to_megatron_lm
from ckptbridge.megatron_settings import CHECKING_FIELDS, MODEL_ARGS, RENAMED_FIELDS, core_fields
from ckptbridge.mcore import config as mconfig
from ckptbridge.mcore.plan_check import check_plans
from ckptbridge.presets import build_tiny_hf, convertible_config, load_preset, shrink_config
from ckptbridge.spec import ModelSpec
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

#: a preset per shipped mapping family
FAMILY_PRESETS = {"llama": "llama3.1-8b", "mistral": "mistral-7b", "ministral": "ministral-8b", "qwen2": "qwen2.5-0.5b",
                  "qwen3": "qwen3-8b", "mixtral": "mixtral-8x7b", "qwen3_moe": "qwen3-30b-a3b",
                  "qwen2_moe": "qwen1.5-moe-a2.7b", "deepseek_v3": "deepseek-v3", "phi3": "phi3-mini",
                  "seed_oss": "seed-oss-36b", "ernie4_5": "ernie4.5-0.3b", "gpt_oss": "gpt-oss-20b",
                  "llama4": "llama4-maverick", "deepseek_v2": "deepseek-v2-lite", "glm4_moe": "glm-4.5",
                  "qwen3_next": "qwen3-next-80b-a3b", "qwen3_5": "qwen3.5-text", "qwen3_5_moe": "qwen3.5-moe-text",
                  "qwen2_5_vl": "qwen2.5-vl-7b", "llama4_vl": "llama4-maverick-vl"}


def tiny_spec(preset: str, registry: MappingRegistry | None = None) -> ModelSpec:
    return ModelSpec.from_hf_config(shrink_config(convertible_config(load_preset(preset)), layers=4), registry)


def test_every_family_has_a_preset() -> None:
    reg = default_registry()  # a family that refuses every config has nothing to plan
    assert set(FAMILY_PRESETS) == set(reg.families)  # refused families are no mapping (reg.refused)


def test_every_shipped_mapping_equals_megatrons_model() -> None:
    cases, names = [], []
    for family, preset in FAMILY_PRESETS.items():
        spec = tiny_spec(preset)
        moe = bool(spec.args.get("num_moe_experts"))
        etp = 1 if moe and spec.args.get("add_bias_linear") else None  # megatron-core: biased experts at ETP 1 only
        layouts = [ParallelLayout(1, 1, ep=2), ParallelLayout(2, 2, ep=2, etp=etp)] if moe else [ParallelLayout(), ParallelLayout(2, 2)]
        for layout in layouts:
            for fmt in ("torch_dist", "torch"):
                for layer_spec in ("te", "local"):
                    cases.append((spec, spec.megatron_args(layout, torch.bfloat16, layer_spec, fmt), fmt, layer_spec))
                    names.append(f"{family} {layout.describe()} {fmt} {layer_spec}")
    problems = {name: p for name, p in zip(names, check_plans(cases)) if p}
    assert not problems, problems


def broken_registry(folder: Path, old: str, new: str) -> MappingRegistry:
    """A registry of llama.yaml alone, with ``old`` replaced by ``new``."""
    text = (mappings_dir() / "llama.yaml").read_text()
    assert old in text
    folder.mkdir(exist_ok=True)
    (folder / "llama.yaml").write_text(text.replace(old, new))
    return MappingRegistry(folder)


@pytest.mark.parametrize("old, new, named", [
    ("mcore: decoder.layers.{L}.mlp.linear_fc2.weight", "mcore: decoder.layers.{L}.mlp.linear_fc2.weights",
     "decoder.layers.mlp.linear_fc2.weights"),
    ("shapes: [[hidden_size, ffn_hidden_size]]", "shapes: [[hidden_size, ffn_hidden_size // 2]]",
     "decoder.layers.mlp.linear_fc2.weight"),
])
def test_wrong_name_or_shape_refused_naming_it(tmp_path: Path, old: str, new: str, named: str) -> None:
    spec = tiny_spec("llama3.1-8b", broken_registry(tmp_path, old, new))
    margs = spec.megatron_args(ParallelLayout(2, 2), torch.float32, "te", "torch_dist")
    (problem,) = check_plans([(spec, margs, "torch_dist", "te")])
    assert named in problem and "llama.yaml" in problem, problem


def test_unknown_megatron_key_refused_at_load(tmp_path: Path) -> None:
    # a broken file is kept aside when the registry loads; using its family raises its error
    registry = broken_registry(tmp_path, "  vocab_size: vocab_size\n", "  vocab_size: vocab_size\n  window_attn_skip_frequency: '2'\n")
    with pytest.raises(MappingError, match=r"llama\.yaml: config key 'window_attn_skip_frequency'"):
        registry.family("llama")
    registry = broken_registry(tmp_path, "  swiglu: \"True\"\n", "  gated_linear_unit: \"True\"\n")
    with pytest.raises(MappingError, match=r"'gated_linear_unit'.*swiglu"):
        registry.family("llama")


def test_convert_check_megatron_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hf = build_tiny_hf("llama3.2-1b", tmp_path / "hf", layers=2)
    target = Target("mcore", ParallelLayout(2, 1), check_megatron=True)
    convert(hf, tmp_path / "good", None, target)  # the shipped mapping passes
    assert (tmp_path / "good" / "release" / "common.pt").exists()
    registry = broken_registry(tmp_path / "maps", "mcore: decoder.layers.{L}.mlp.linear_fc2.weight",
                               "mcore: decoder.layers.{L}.mlp.linear_fc2.weights")
    monkeypatch.setattr(spec_module, "default_registry", lambda: registry)
    with pytest.raises(PlanError, match="linear_fc2.weights"):
        convert(hf, tmp_path / "bad", None, target)
    assert not (tmp_path / "bad").exists() and not any(p.name.startswith(".bad") for p in tmp_path.iterdir())


def test_check_mapping_cli(tmp_path: Path) -> None:
    ok = CliRunner().invoke(main, ["check-mapping", "--tp", "2", "--pp", "2", "--format", "torch_dist",
                                   str(mappings_dir() / "ministral.yaml")])
    assert ok.exit_code == 0 and ok.output.count("ok   megatron-core") == 2, ok.output
    maps = tmp_path / "maps"
    broken_registry(maps, "shapes: [[hidden_size, ffn_hidden_size]]", "shapes: [[hidden_size, ffn_hidden_size // 2]]")
    bad = CliRunner().invoke(main, ["--mappings", str(maps), "check-mapping", "--tp", "1", "--pp", "1",
                                    str(maps / "llama.yaml")])
    assert bad.exit_code == 1 and "FAIL" in bad.output and "linear_fc2.weight" in bad.output, bad.output


# ------------------------------------------------------------------------------------------------
# every Megatron setting reaches megatron
# ------------------------------------------------------------------------------------------------


def test_core_field_names_are_the_installed_megatron_cores() -> None:
    names = core_fields()
    assert names["TransformerConfig"] == tuple(f.name for f in dataclasses.fields(TransformerConfig))
    tc = set(names["TransformerConfig"])
    assert names["MLATransformerConfig"] == tuple(f.name for f in dataclasses.fields(MLATransformerConfig) if f.name not in tc)
    assert set(CHECKING_FIELDS) <= tc and set(RENAMED_FIELDS) <= tc


def _same(a: object, b: object) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return list(a) == list(b)  # type: ignore[arg-type]
    return a == b


@pytest.mark.parametrize("family", list(FAMILY_PRESETS))
def test_every_config_key_reaches_megatron(family: str) -> None:
    spec = ModelSpec.from_hf_config(convertible_config(load_preset(FAMILY_PRESETS[family])))
    margs = spec.megatron_args(ParallelLayout(), torch.bfloat16, "te", "torch_dist")
    args = full_megatron_lm_args(margs)
    config = mconfig.transformer_config_from_args(args, dtype=torch.bfloat16)
    model_kw = mconfig.gpt_model_kwargs(args)
    from_arg = {arg: field for field, (arg, _) in RENAMED_FIELDS.items()}
    for key in spec.mapping.config:
        value, name = spec.args[key], next(iter(to_megatron_lm({key: None})))
        if name in ("swiglu", "quick_geglu"):  # both gated; quick_geglu's activation is x * sigmoid(1.702 x)
            assert (config.activation_func is torch.nn.functional.silu) == bool(spec.args.get("swiglu"))
            assert config.gated_linear_unit == bool(spec.args.get("swiglu") or spec.args.get("quick_geglu"))
        elif name == "group_query_attention":
            assert (config.num_query_groups is not None) == bool(value) or config.num_query_groups == config.num_attention_heads
        elif name in MODEL_ARGS and not hasattr(config, name):
            got = model_kw[MODEL_ARGS[name]]
            if name == "vocab_size":
                assert got >= value
            elif name == "untie_embeddings_and_output_weights":
                assert got == (not value)
            else:
                assert _same(got, value), (key, got, value)
        else:
            field = from_arg.get(name, name)
            assert _same(getattr(config, field), value), (key, getattr(config, field), value)


def test_runs_beside_a_process_group() -> None:
    """Inside a process that already has a group (a test session, a training job) the check forks a worker."""
    from ckptbridge.mcore.launch import ensure_single_rank_group

    ensure_single_rank_group()
    spec = tiny_spec("qwen3-8b")
    margs = spec.megatron_args(ParallelLayout(2, 2), torch.float32, "te", "torch_dist")
    assert check_plans([(spec, margs, "torch_dist", "te")]) == [""]
    assert torch.distributed.get_world_size() == 1


def test_checkpoint_exception_gets_its_cause() -> None:
    """torch's CheckpointException prints ``CheckpointException ranks:dict_keys([0])`` first; the loader's
    error carries each rank's exception on one line instead."""
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    from ckptbridge.mcore.load import _cause

    exc = CheckpointException("load", {0: (ValueError("Size mismatch for decoder.layers.mlp.linear_fc2.weight: "
                                                      "(2, 64, 128) vs (2, 64, 256)"), traceback.StackSummary())})
    assert _cause(exc) == ("rank 0: ValueError: Size mismatch for decoder.layers.mlp.linear_fc2.weight: "
                           "(2, 64, 128) vs (2, 64, 256)")
