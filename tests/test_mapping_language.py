"""The mapping language: operations that declare their reverse (proven at load), bounded
expressions, per-family defaults, isolation of broken files, user mapping folders, check-mapping."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ckptbridge import expr
from ckptbridge.cli import main
from ckptbridge.errors import MappingError, UnsupportedArchitectureError
from ckptbridge.hf_config import normalise
from ckptbridge.mapping.registry import ENV_VAR, MappingRegistry, mappings_dir, set_user_folders
from ckptbridge.presets import build_tiny_hf
from ckptbridge.spec import ModelSpec
from ckptbridge.transforms import check_round_trip, parse_transform

CFG = {"num_attention_heads": 4, "num_query_groups": 2, "kv_channels": 3, "hidden_size": 8, "E": 0}
PHI3 = (mappings_dir() / "phi3.yaml").read_text()
QKV_STEPS = """        - split: [num_attention_heads * kv_channels, num_query_groups * kv_channels, num_query_groups * kv_channels]
        - qkv_interleave
"""


@pytest.fixture(autouse=True)
def _no_user_folders(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    yield
    set_user_folders([])


@pytest.fixture(scope="module")
def phi3(tmp_path_factory) -> Path:
    return build_tiny_hf("phi3-mini", tmp_path_factory.mktemp("phi3") / "hf", layers=2, seed=1)


@pytest.mark.parametrize("steps, shapes", [
    (["identity"], [(5, 8)]),
    (["concat"], [(4, 8), (6, 8)]),
    ([{"concat": {"dim": 1}}], [(4, 3), (4, 5)]),
    ([{"split": ["num_attention_heads * kv_channels", "num_query_groups * kv_channels",
                 "num_query_groups * kv_channels"]}, "qkv_interleave"], [(24, 8)]),
    ([{"chunk": 2}, "concat"], [(6, 8)]),
    ([{"transpose": [0, 1]}], [(3, 8)]),
    ([{"reshape": ["hidden_size", -1]}], [(4, 2, 8)]),
    ([{"scale": "2 ** -3"}], [(4, 4)]),
    ([{"interleave": {"groups": "num_query_groups"}}], [(4, 8), (2, 8)]),
    (["qkv_interleave"], [(12,), (6,), (6,)]),
    ([{"deinterleave": {"groups": 2, "parts": [[4, 4, 8], [2, 2]]}}, "concat"], [(16, 8), (4, 8)]),
    ([{"offset": -1}], [(4, 4)]),
])
def test_operations_round_trip(steps, shapes):
    pipeline = parse_transform(steps, "test")
    check_round_trip(pipeline, shapes, CFG, "test")


def test_split_then_interleave_is_mcore_qkv():
    """Phi-3's pipeline equals the three-tensor qkv_interleave on the split parts."""
    fused = torch.randn(24, 8)
    q, k, v = fused.split([12, 6, 6])
    phi3 = parse_transform([{"split": [12, 6, 6]}, "qkv_interleave"], "t").to_mcore([fused], CFG)
    assert torch.equal(phi3, parse_transform("qkv_interleave", "t").to_mcore([q, k, v], CFG))


def test_deinterleave_takes_each_part_whole_and_parts_shard_per_part():
    """Per group [a_g; b_g] -> [a_all; b_all]; a ``parts`` shard gives each rank its 1/TP of every part."""
    from ckptbridge.sharding import get_kind, merge, split

    per_group = torch.arange(12.0).reshape(12, 1)  # 3 groups of [a (2 rows); b (2 rows)]
    steps = parse_transform({"deinterleave": {"groups": 3, "parts": [6, 6]}}, "t")
    a, b = steps.steps[0].forward([per_group], CFG)
    assert a.flatten().tolist() == [0, 1, 4, 5, 8, 9] and b.flatten().tolist() == [2, 3, 6, 7, 10, 11]
    kind = get_kind({"parts": ["hidden_size", 4]}).resolved(CFG)  # hidden_size is 8 in CFG: parts of 8 and 4 rows
    whole = torch.arange(12.0)
    shards = split(whole, kind, 2)
    assert [t.tolist() for t in shards] == [[0, 1, 2, 3, 8, 9], [4, 5, 6, 7, 10, 11]]
    assert torch.equal(merge(shards, kind), whole)


@pytest.mark.parametrize("steps, message", [
    ([{"scale": 0.1}], "not invertible"),
    ([{"chunk": 2}], "end in 2 tensors"),
    ([{"split": [10, 6, 6]}, "qkv_interleave"], "do not add up to 24"),
    (["frobnicate"], "unknown operation 'frobnicate'"),
    ([{"identity": 3}], "takes no parameters"),
    (["identity", "take_expert"], "take_expert can only be the first"),
    ([{"offset": 0.1}], "not exact"),
    ([{"deinterleave": {"groups": 5, "parts": [12, 12]}}, "concat"], "not multiples of groups=5"),
])
def test_bad_pipelines_refused(steps, message):
    with pytest.raises(MappingError, match=message):
        check_round_trip(parse_transform(steps, "rule x"), [(24, 8)], CFG, "rule x")


def _user_folder(tmp_path: Path, files: dict[str, str]) -> Path:
    folder = tmp_path / "user-mappings"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize("steps, message", [
    ("        - scale: 0.1\n", "is not invertible"),
    ("        - frobnicate\n", "unknown operation 'frobnicate'"),
])
def test_bad_rule_refused_before_writing_naming_it(phi3, tmp_path, steps, message):
    folder = _user_folder(tmp_path, {"phi3.yaml": PHI3.replace(QKV_STEPS, steps)})
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["--mappings", str(folder), "convert", "--src", "hf", "--dst", "mcore", str(phi3), str(out)])
    assert r.exit_code == 2, r.output
    assert "decoder.layers.{L}.self_attention.linear_qkv.weight" in r.output and message in r.output, r.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "ckptbridge-tmp" in p.name]


def test_broken_user_file_leaves_the_others_working(tiny_hf, tmp_path, monkeypatch):
    folder = _user_folder(tmp_path, {"gemma.yaml": "family: gemma\narchitectures: [GemmaForCausalLM]\ntensors: [\n"})
    r = CliRunner().invoke(main, ["--mappings", str(folder), "list-architectures"])
    assert r.exit_code == 0, r.output
    assert "BROKEN" in r.output and "gemma.yaml" in r.output and "not valid YAML" in r.output
    assert "Qwen3ForCausalLM" in r.output and "Phi3ForCausalLM" in r.output
    r = CliRunner().invoke(main, ["--mappings", str(folder), "convert", "--src", "hf", "--dst", "mcore",
                                  str(tiny_hf["qwen3-8b"]), str(tmp_path / "qwen3")])
    assert r.exit_code == 0, r.output
    monkeypatch.setenv(ENV_VAR, str(folder))  # the same through the environment; using it names the file
    with pytest.raises(MappingError, match="mapping for GemmaForCausalLM is broken: .*gemma.yaml: not valid YAML"):
        ModelSpec.from_hf_config({"architectures": ["GemmaForCausalLM"]})


def test_family_including_a_broken_one_is_reported(tmp_path):
    folder = _user_folder(tmp_path, {"llama.yaml": (mappings_dir() / "llama.yaml").read_text()
                                     .replace("transform: concat", "transform: [frobnicate]")})
    reg = MappingRegistry([mappings_dir(), folder])
    assert "phi3" not in reg.families and "llama" not in reg.families and "deepseek_v3" in reg.families
    with pytest.raises(MappingError, match="includes 'llama', which is broken"):
        reg.family("qwen3")


@pytest.mark.parametrize("name", sorted(p.name for p in mappings_dir().glob("*.yaml")))
def test_check_mapping_passes_on_shipped(name):
    r = CliRunner().invoke(main, ["check-mapping", "--no-megatron", str(mappings_dir() / name)])  # megatron: test_plan_check
    assert r.exit_code == 0, r.output
    assert "passes" in r.output
    assert "hf_config (Megatron -> HF) reproduces" in r.output or "ok: refusal of" in r.output


@pytest.mark.parametrize("old, new, message", [
    ("  rms_norm_eps: norm_epsilon\n  rope_theta", "  rms_norm_eps: 1.0e-6\n  rope_theta",
     "hf_config does not invert config: norm_epsilon is 1e-05"),
    (QKV_STEPS, "        - scale: 0.1\n", "rule decoder.layers.{L}.self_attention.linear_qkv.weight: transform 'scale(0.1)' is not invertible"),
    ("shapes: [[2 * ffn_hidden_size, hidden_size]]", "shapes: [[2 * ffn_hidden, hidden_size]]", "unknown config field(s) ['ffn_hidden']"),
])
def test_check_mapping_names_the_problem(tmp_path, phi3, old, new, message):
    assert old in PHI3
    path = tmp_path / "phi3.yaml"
    path.write_text(PHI3.replace(old, new))
    r = CliRunner().invoke(main, ["check-mapping", "--no-megatron", str(path), "--hf", str(phi3)])
    assert r.exit_code == 2 and message in r.output, r.output


def test_no_default_masks_a_missing_field(tmp_path):
    """A family that includes Llama's sections but not its hf_defaults does not get hidden_act=silu."""
    folder = _user_folder(tmp_path, {"gemma.yaml": "family: gemma_test\narchitectures: [GemmaForCausalLM]\n"
                                     "config: {include: llama}\nchecks: {include: llama}\ntensors: {include: llama}\n"})
    reg = MappingRegistry([mappings_dir(), folder])
    raw = {"architectures": ["GemmaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
           "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True, "rope_theta": 1e4}
    with pytest.raises(UnsupportedArchitectureError, match="no field 'hidden_act'"):
        ModelSpec.from_hf_config(raw, reg)
    assert ModelSpec.from_hf_config({**raw, "hidden_act": "silu"}, reg).args["swiglu"] is True


def test_per_layer_type_settings_are_readable():
    raw = {"layer_types": ["sliding_attention", "full_attention"],
           "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    cfg = normalise(raw)
    assert "rope_theta" not in cfg  # not guessed from one of the types
    assert expr.evaluate("rope_parameters['full_attention']['rope_theta']", cfg) == 1e6
    assert expr.evaluate("rope_parameters.get('sliding_attention', {}).get('rope_theta')", cfg) == 1e4
    assert expr.evaluate("[i for i, t in [(0, layer_types[0]), (1, layer_types[1])] if t == 'full_attention']", cfg) == (1,)
    assert expr.evaluate("any(t != 'full_attention' for t in layer_types) and len(layer_types) == 2", cfg) is True
    assert expr.names_in("all(t == x for t in layer_types)") == {"x", "layer_types"}


@pytest.mark.parametrize("source", [
    "'a' * 10 ** 8", "[0] * 10 ** 7", "2 ** 10 ** 10", "9 ** 99999", "[[0] * 1000 for a in [0] * 2000]",
    "[0] * 200000 + [0] * 200000", "sum(1 for a in [0] * 100000 for b in [0] * 100000)", "1" + " + 1" * 5000, "range(10 ** 9)",
])
def test_expression_bounds(source):
    with pytest.raises(expr.LimitExceeded):
        expr.evaluate(source, {})


@pytest.mark.parametrize("source", ["n.__class__", "(lambda: 1)()", "open('x')", "layer_types.count(1)", "f'{n}'",
                                    "[n for n in sorted([3])]"])
def test_expression_refuses_code(source):
    with pytest.raises(MappingError):
        expr.evaluate(source, {"n": 1, "layer_types": [1]})


def test_a_broken_user_file_shadows_the_shipped_family_it_replaces(tmp_path):
    """A user's llama.yaml with a YAML typo must not let conversions fall back to the shipped llama silently."""
    user = tmp_path / "user"
    user.mkdir()
    (user / "llama.yaml").write_text("family: llama\narchitectures: [LlamaForCausalLM]\nconfig: {oops: [\n")
    reg = MappingRegistry([mappings_dir(), user])
    assert any(b.path == user / "llama.yaml" for b in reg.broken)
    with pytest.raises(MappingError, match="broken"):
        reg.for_architecture("LlamaForCausalLM")
    assert reg.family("deepseek_v3").family == "deepseek_v3"  # families that do not include llama keep working
