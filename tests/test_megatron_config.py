"""Megatron args -> HF config (each mapping's ``hf_config`` section) and the checks around it.

For every architecture, HF -> Megatron args -> HF must give back the original config's architectural
fields; a supplied config that disagrees with a checkpoint, or args no mapping can say, are refused
naming the field. Checkpoint-level tests (a real Megatron-LM checkpoint) are in test_megatron_export.py.
"""

from __future__ import annotations

import pytest

from ckptbridge.config_source import TRAINING_CHOICES, ConfigOptions, check_agrees, checkpoint_args, resolve
from ckptbridge.errors import PlanError, UnsupportedArchitectureError
from ckptbridge.hf_config import language_model, normalise
from ckptbridge.mapping import default_registry
from ckptbridge.megatron_args import to_megatron_lm
from ckptbridge.presets import convertible_config, load_preset, preset_names
from ckptbridge.spec import ModelSpec

#: fields a synthesized config writes that the original may not carry (or carries under another dialect)
_NOT_COMPARED = {"bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype", "architectures", "model_type"}


def _configs() -> list[tuple[str, dict]]:
    out = [(name, convertible_config(load_preset(name))) for name in preset_names()]
    ds = dict(load_preset("deepseek-v3")["hf_config"])  # DeepSeek-V2-Lite style: no q-LoRA, no MTP, no yarn
    ds.update(q_lora_rank=None, num_nextn_predict_layers=0, rope_scaling=None)
    out.append(("deepseek-v3-no-qlora", ds))
    return out


def _megatron_lm_args(spec: ModelSpec) -> dict:
    """What a Megatron-LM run of this model stores (its names; what validate_args fills in)."""
    return {**to_megatron_lm(spec.args), "padded_vocab_size": spec.args["vocab_size"], "params_dtype": None}


@pytest.mark.parametrize("name,raw", _configs(), ids=[n for n, _ in _configs()])
def test_hf_megatron_hf_reproduces_architectural_fields(name, raw):
    spec = ModelSpec.from_hf_config(raw)
    arch = raw["architectures"][0]
    options = ConfigOptions(arch=arch, vocab_size=language_model(raw)["vocab_size"])
    back = resolve(_megatron_lm_args(spec), None, "args", options).spec
    assert back.mapping.family == spec.mapping.family
    assert back.hf_config["architectures"] == [arch]
    # the synthesized config translates into exactly the same Megatron args ...
    assert back.args == spec.args
    # ... and each field it writes is the original's (both read through the same normaliser)
    orig, synth = normalise(raw), normalise(back.hf_config)
    nested = back.hf_config.get("text_config", {})  # a VLM's language model (Llama 4): its fields, not the dict
    for key in (set(back.hf_config) | set(nested)) - _NOT_COMPARED - {"text_config"}:
        if key in ("rope_scaling",):
            continue  # compared through the flattened rope_* fields below
        assert synth[key] == orig.get(key, synth[key]), key
    for key in [k for k in orig if k.startswith("rope_")]:
        assert synth.get(key) == orig[key] or (orig[key] is None and synth.get(key) is None), key


@pytest.mark.parametrize("name,raw", _configs(), ids=[n for n, _ in _configs()])
def test_family_is_detected_from_args(name, raw):
    spec = ModelSpec.from_hf_config(raw)
    resolved = resolve(_megatron_lm_args(spec), None, "args", ConfigOptions(vocab_size=language_model(raw)["vocab_size"]))
    # Mistral and Phi-3 models are Llama models in Megatron's args (no detect of their own): Llama is picked;
    # Seed-OSS's are Qwen2's (q/k/v biases, explicit head_dim): Qwen2 is picked
    # Qwen3.5-MoE's are Qwen3-Next's (split delta-net projections are a checkpoint layout): Qwen3-Next is picked
    # Llama 4 with its vision model (llama4_vl) is Llama 4 text's args: llama4 is picked
    expected = {"mistral": "llama", "phi3": "llama", "seed_oss": "qwen2", "qwen3_5_moe": "qwen3_next",
                "llama4_vl": "llama4"}.get(spec.mapping.family, spec.mapping.family)
    assert resolved.spec.mapping.family == expected
    assert resolved.origin == f"synthesized from Megatron args ({expected})"


def test_supplied_config_that_disagrees_is_refused_naming_the_field():
    raw = load_preset("llama3.1-8b")["hf_config"]
    args = _megatron_lm_args(ModelSpec.from_hf_config(raw))
    for field, value, name in [("num_hidden_layers", 31, "num_layers"), ("rope_theta", 10000.0, "rotary_base"),
                               ("num_key_value_heads", 4, "num_query_groups"), ("rms_norm_eps", 1e-6, "norm_epsilon")]:
        wrong = ModelSpec.from_hf_config({**raw, field: value})
        with pytest.raises(PlanError, match=rf"{name} is .* but --hf-config x implies .*{field}"):
            check_agrees(wrong, checkpoint_args(args), "ckpt", "--hf-config x")


def test_rope_scaling_off_in_config_but_on_in_checkpoint_is_refused():
    raw = load_preset("llama3.1-8b")["hf_config"]
    args = _megatron_lm_args(ModelSpec.from_hf_config(raw))
    plain = ModelSpec.from_hf_config({**raw, "rope_scaling": None})
    with pytest.raises(PlanError, match="use_rope_scaling"):
        check_agrees(plain, checkpoint_args(args), "ckpt", "--hf-config x")


def test_unknown_architecture_is_refused_listing_what_is_supported():
    raw = load_preset("llama3.1-8b")["hf_config"]
    args = _megatron_lm_args(ModelSpec.from_hf_config(raw))
    args["multi_latent_attention"] = True  # MLA without experts: no mapping says it
    with pytest.raises(UnsupportedArchitectureError, match="supported: .*LlamaForCausalLM.*Qwen3ForCausalLM"):
        resolve(args, None, "ckpt", ConfigOptions(vocab_size=128256))


def test_feature_no_mapping_expresses_is_refused():
    raw = load_preset("llama3.1-8b")["hf_config"]
    args = {**_megatron_lm_args(ModelSpec.from_hf_config(raw)), "layernorm_zero_centered_gamma": True}
    with pytest.raises(UnsupportedArchitectureError, match="layernorm_zero_centered_gamma=True"):
        resolve(args, None, "ckpt", ConfigOptions(vocab_size=128256))


def test_padded_vocab_alone_needs_the_flag():
    raw = load_preset("qwen3-8b")["hf_config"]
    args = {**_megatron_lm_args(ModelSpec.from_hf_config(raw)), "vocab_size": None, "tokenizer_type": "HuggingFaceTokenizer"}
    with pytest.raises(PlanError, match="--vocab-size"):
        resolve(args, None, "ckpt", ConfigOptions())
    spec = resolve(args, None, "ckpt", ConfigOptions(vocab_size=raw["vocab_size"], hf_set=(("eos_token_id", 7),))).spec
    assert spec.hf_config["vocab_size"] == raw["vocab_size"] and spec.hf_config["eos_token_id"] == 7


def test_training_choices_are_not_compared():
    assert "moe_aux_loss_coeff" in TRAINING_CHOICES
    raw = load_preset("qwen3-30b-a3b")["hf_config"]
    args = {**_megatron_lm_args(ModelSpec.from_hf_config(raw)), "moe_aux_loss_coeff": 0.5, "moe_token_dispatcher_type": "allgather"}
    assert resolve(args, None, "ckpt", ConfigOptions(vocab_size=raw["vocab_size"])).spec.mapping.family == "qwen3_moe"


def test_every_mapping_with_detect_has_an_hf_config_section():
    reg = default_registry()
    for family in reg.families:
        assert reg.family(family).hf_config, family
