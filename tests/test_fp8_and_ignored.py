"""Tensors that are known but not weights: rotary inv_freq buffers and a tied model's stored head are
dropped only once proven redundant; block-scaled FP8 sources (DeepSeek-V3 layout) are dequantized
exactly as the reference does, refused when their layout is broken or unknown, and exported back
to FP8 byte for byte."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ckptbridge.cli import main
from ckptbridge.convert import Target, convert
from ckptbridge.errors import PlanError, UnsupportedArchitectureError
from ckptbridge.presets import build_tiny_hf

from helpers import assert_bit_exact, hf_tensors, tree_digest

# ---------------------------------------------------------------------------------------------
# helpers: edit a saved folder by hand, as older exports and FP8 releases look
# ---------------------------------------------------------------------------------------------


def _edit(folder: Path, tensors=None, config=None) -> None:
    path = folder / "model.safetensors"
    data = load_file(path)
    if tensors:
        tensors(data)
    save_file(data, path, metadata={"format": "pt"})
    if config:
        cfg = json.loads((folder / "config.json").read_text())
        config(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))


def _convert(src: Path, dst: Path, kind: str = "hf", **kw) -> None:
    convert(src, dst, None, Target(kind, **kw))


def _cli(*args: str):
    return CliRunner().invoke(main, ["convert", *args])


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory) -> Path:
    """A tiny Llama with tied embeddings and default rope (a Llama-2-era export, as rope goes)."""
    folder = build_tiny_hf("llama3.2-1b", tmp_path_factory.mktemp("llama") / "m", layers=2)
    _edit(folder, config=lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    return folder


def _real_inv_freq(folder: Path) -> torch.Tensor:
    """inv_freq as transformers' own LlamaRotaryEmbedding computes it for this config."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding(AutoConfig.from_pretrained(folder)).inv_freq.clone()


def _with_inv_freq(src: Path, dst: Path, value: torch.Tensor) -> Path:
    shutil.copytree(src, dst)
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    _edit(dst, tensors=lambda t: t.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": value.clone()
                                           for i in range(layers)}))
    return dst


# ---------------------------------------------------------------------------------------------
# inv_freq and a stored tied head
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inv_freq_that_matches_the_config_is_dropped(tied_llama, tmp_path, dtype):
    src = _with_inv_freq(tied_llama, tmp_path / "src", _real_inv_freq(tied_llama).to(dtype))
    _convert(src, tmp_path / "mc", "mcore")
    _convert(tmp_path / "mc", tmp_path / "back")
    assert_bit_exact(hf_tensors(tmp_path / "back"), hf_tensors(tied_llama))


def test_wrong_inv_freq_is_refused(tied_llama, tmp_path):
    from ckptbridge.formats.hf_ignored import rope_inv_freq

    cfg = json.loads((tied_llama / "config.json").read_text())
    wrong = rope_inv_freq(cfg["rope_parameters"]["rope_theta"] * 2, cfg["head_dim"])  # another rope base
    src = _with_inv_freq(tied_llama, tmp_path / "src", wrong)
    r = _cli("--src", "hf", "--dst", "mcore", str(src), str(tmp_path / "out"))
    assert r.exit_code == 2, r.output
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in r.output and "max abs diff" in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_stored_tied_head_that_equals_the_embedding_is_dropped(tied_llama, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tied_llama, src)
    _edit(src, tensors=lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    _convert(src, tmp_path / "mc", "mcore")
    _convert(tmp_path / "mc", tmp_path / "back")
    back = hf_tensors(tmp_path / "back")
    assert "lm_head.weight" not in back  # as transformers' save_pretrained writes a tied model
    assert_bit_exact(back, hf_tensors(tied_llama))


def test_stored_tied_head_that_differs_is_refused(tied_llama, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tied_llama, src)

    def head(t):
        h = t["model.embed_tokens.weight"].clone()
        h[7, 3] += 0.25
        t["lm_head.weight"] = h

    _edit(src, tensors=head)
    before = tree_digest(src)
    r = _cli("--src", "hf", "--dst", "mcore", str(src), str(tmp_path / "out"))
    assert r.exit_code == 2, r.output
    assert "lm_head.weight" in r.output and "not a bit-exact copy of 'model.embed_tokens.weight'" in r.output, r.output
    assert "max abs diff 0.25" in r.output, r.output
    assert tree_digest(src) == before and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# FP8 block-scaled sources
# ---------------------------------------------------------------------------------------------


def _reference_quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block quantization as DeepSeek's FP8 releases use it: scale = block amax / 448, codes = w / scale."""
    rows, cols = w.shape
    w = w.float()
    scale = torch.empty(math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    codes = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            part = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
            scale[i, j] = part.abs().max() / 448.0
            codes[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] = (part / scale[i, j]).to(torch.float8_e4m3fn)
    return codes, scale


def _reference_dequantize(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """A straightforward fp32 reference: each block's codes times its scale."""
    out = torch.empty(codes.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            out[rows, cols] = codes[rows, cols].float() * scale[i, j]
    return out


def _quantized(name: str, t: torch.Tensor) -> bool:
    """What DeepSeek's FP8 release quantizes: the 2-D linear weights of the layers, not the router."""
    return name.startswith("model.layers.") and name.endswith(".weight") and t.dim() == 2 and not name.endswith("mlp.gate.weight")


@pytest.fixture(scope="module", params=[(128, 128), (16, 16)], ids=["block128", "block16"])
def fp8_model(request, tmp_path_factory) -> tuple[Path, tuple[int, int]]:
    """A tiny DeepSeek-V3 (bf16, 2 layers: one dense, one MoE) with its linear weights as e4m3 + block scales.
    Tiny widths are under 128, so block128 is one partial block per tensor; block16 has many, partial at the edges."""
    block = request.param
    folder = build_tiny_hf("deepseek-v3", tmp_path_factory.mktemp("fp8") / "m", layers=2, dtype=torch.bfloat16)

    def quantize_all(t):
        for name in [n for n in t if _quantized(n, t[n])]:
            t[name], t[name + "_scale_inv"] = _reference_quantize(t[name], block)
        for name in [n for n in t if n.endswith("e_score_correction_bias")]:
            t[name] = t[name].float()  # fp32 in the hub's files (and in MCore)

    _edit(folder, tensors=quantize_all, config=lambda c: c.update(quantization_config={
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}))
    return folder, block


def test_fp8_dequantizes_bit_exactly_as_the_reference(fp8_model, tmp_path):
    src, block = fp8_model
    raw = hf_tensors(src)
    for dtype in (torch.float32, torch.bfloat16):
        out = tmp_path / str(dtype)
        _convert(src, out, "hf", dtype=dtype)
        got = hf_tensors(out)
        assert not any(n.endswith("_scale_inv") for n in got)
        assert "quantization_config" not in json.loads((out / "config.json").read_text())
        for name, t in got.items():
            if name + "_scale_inv" in raw:
                expected = _reference_dequantize(raw[name], raw[name + "_scale_inv"], block).to(dtype)
            else:
                expected = raw[name].to(t.dtype)  # a pinned-fp32 tensor (router bias) keeps its dtype
            assert torch.equal(t.view(torch.uint8), expected.view(torch.uint8)), name


def test_fp8_round_trip_through_mcore_is_byte_exact(fp8_model, tmp_path):
    src, block = fp8_model
    _convert(src, tmp_path / "mc", "mcore", dtype=torch.float32)
    _convert(tmp_path / "mc", tmp_path / "back", "hf", dtype=torch.bfloat16, hf_fp8=True)
    assert_bit_exact(hf_tensors(tmp_path / "back"), hf_tensors(src))
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["quantization_config"] == json.loads((src / "config.json").read_text())["quantization_config"]


def test_fp8_through_bf16_mcore_keeps_codes_and_bounds_scales(fp8_model, tmp_path):
    """bf16 inside MCore: e4m3 codes come back identical; a scale moves by at most 2^-8 relative (one bf16
    rounding of the block maximum; none at all here, as the weights were bf16 before quantization)."""
    src, _ = fp8_model
    _convert(src, tmp_path / "mc", "mcore", dtype=torch.bfloat16)
    _convert(tmp_path / "mc", tmp_path / "back", "hf", hf_fp8=True)
    a, b = hf_tensors(src), hf_tensors(tmp_path / "back")
    assert sorted(a) == sorted(b)
    for name in a:
        if a[name].dtype == torch.float8_e4m3fn:
            assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name
        elif name.endswith("_scale_inv"):
            assert ((a[name] - b[name]).abs() <= 2**-8 * a[name].abs()).all(), name


def test_requantizing_recovers_scales_that_amax_over_448_misses():
    """A quantizer that multiplies by 1/448 (as fused kernels do) instead of dividing: amax / 448 of the
    dequantized block misses its scale by an fp32 step in about one block in eight; the quantizer finds
    the scale that reproduces the block, so codes and scales come back exactly."""
    from ckptbridge.formats.fp8_block import dequantize, quantize

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(256, 320, generator=gen) * torch.rand(256, 1, generator=gen).exp2() * 0.02
    blocks = w.reshape(32, 8, 40, 8)
    scale = blocks.abs().amax(dim=(1, 3)) * (1 / 448)
    codes = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).reshape(256, 320)
    values = dequantize(codes, scale, (8, 8))
    assert torch.equal(values, _reference_dequantize(codes, scale, (8, 8)))
    assert (values.reshape(32, 8, 40, 8).abs().amax(dim=(1, 3)) / 448 != scale).sum() > 50  # the plain rule misses
    codes2, scale2 = quantize(values, (8, 8))
    assert torch.equal(codes2.view(torch.uint8), codes.view(torch.uint8)) and torch.equal(scale2, scale)


def test_fp8_source_with_bf16_scales_round_trips_values(fp8_model, tmp_path):
    """Qwen3's dense FP8 releases store bf16 scales: read as they are; exported back as fp32 scales
    (the hub's DeepSeek layout) holding the same values, with the same codes."""
    src = tmp_path / "src"
    shutil.copytree(fp8_model[0], src)
    _edit(src, tensors=lambda t: t.update({n: v.bfloat16() for n, v in t.items() if n.endswith("_scale_inv")}))
    _convert(src, tmp_path / "mc", "mcore", dtype=torch.float32)
    _convert(tmp_path / "mc", tmp_path / "back", "hf", dtype=torch.bfloat16, hf_fp8=True)
    a, b = hf_tensors(src), hf_tensors(tmp_path / "back")
    assert sorted(a) == sorted(b)
    for name in a:
        if name.endswith("_scale_inv"):
            assert b[name].dtype == torch.float32 and torch.equal(b[name], a[name].float()), name
        else:
            assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name


def test_bf16_model_exported_as_fp8_has_the_hub_layout(tmp_path):
    src = build_tiny_hf("qwen3-8b", tmp_path / "q", layers=1, dtype=torch.bfloat16)
    r = _cli("--src", "hf", "--dst", "hf", "--hf-dtype", "fp8-block", str(src), str(tmp_path / "out"))
    assert r.exit_code == 0, r.output
    got, cfg = hf_tensors(tmp_path / "out"), json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    assert got["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert got["model.layers.0.self_attn.q_proj.weight_scale_inv"].shape == (1, 1)
    assert got["model.embed_tokens.weight"].dtype == torch.bfloat16
    # and it reads back: values within e4m3's half step (2^-4 relative) of the bf16 originals
    _convert(tmp_path / "out", tmp_path / "again", "hf", dtype=torch.float32)
    orig, again = hf_tensors(src), hf_tensors(tmp_path / "again")
    w0, w1 = orig["model.layers.0.mlp.up_proj.weight"].float(), again["model.layers.0.mlp.up_proj.weight"]
    assert ((w0 - w1).abs() <= 2**-4 * w0.abs() + 2**-9 * w0.abs().max() / 448).all()


def test_fp8_corrupt_scale_shape_is_refused(fp8_model, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(fp8_model[0], src)
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"
    _edit(src, tensors=lambda t: t.__setitem__(name, torch.ones(5, 5)))
    r = _cli("--src", "hf", "--dst", "mcore", str(src), str(tmp_path / "out"))
    assert r.exit_code == 2, r.output
    assert name in r.output and "has shape [5, 5]" in r.output and "weight_block_size" in r.output, r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("qc, fragment", [
    ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq' is not handled"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}, "['scale_fmt'] are not handled"),
    ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]}, "'static' is not handled"),
])
def test_unhandled_quantization_is_refused(fp8_model, tmp_path, qc, fragment):
    src = tmp_path / "src"
    shutil.copytree(fp8_model[0], src)
    _edit(src, config=lambda c: c.update(quantization_config=qc))
    with pytest.raises(UnsupportedArchitectureError, match="quantization_config") as info:
        _convert(src, tmp_path / "out", "mcore")
    assert fragment in str(info.value)


def test_fp8_weights_without_quantization_config_are_refused(fp8_model, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(fp8_model[0], src)
    _edit(src, config=lambda c: c.pop("quantization_config"))
    with pytest.raises(PlanError, match="declares no quantization_config"):
        _convert(src, tmp_path / "out", "mcore")


def test_hf_dtype_needs_an_hf_output(tmp_path):
    r = _cli("--src", "hf", "--dst", "mcore", "--hf-dtype", "fp8-block", str(tmp_path / "a"), str(tmp_path / "b"))
    assert r.exit_code == 2 and "--hf-dtype would have no effect with --dst mcore" in r.output, r.output


# ---------------------------------------------------------------------------------------------
# the mapping files' ignore / fp8_keep sections are checked when they load
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, old, new, fragment", [
    ("llama", "check: rope_inv_freq", "check: whatever", "needs hf and check"),
    ("llama", "base: rotary_base", "base: rope_base_typo", "uses ['rope_base_typo']"),
    ("llama", "of: model.embed_tokens.weight", "of: model.embedding.weight", "which no tensor rule maps"),
    ("llama", "    dim: kv_channels\n", "    dim: kv_channels\n    of: lm_head.weight\n", "unknown ['of']"),
    ("deepseek_v3", "  - model.layers.{L}.mlp.gate.weight", "  - model.layers.{L}.mlp.router.weight", "fp8_keep names"),
])
def test_bad_ignore_sections_are_refused_when_the_file_loads(tmp_path, family, old, new, fragment):
    from ckptbridge.errors import MappingError
    from ckptbridge.mapping.registry import MappingRegistry, mappings_dir

    folder = tmp_path / "mappings"
    shutil.copytree(mappings_dir(), folder)
    path = folder / f"{family}.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    registry = MappingRegistry(folder)  # a broken file is kept aside; using its family raises its error
    with pytest.raises(MappingError, match="ignore|fp8_keep") as info:
        registry.family(family)
    assert fragment in str(info.value) and str(path) in str(info.value)
