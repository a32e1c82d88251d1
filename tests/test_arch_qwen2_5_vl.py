"""Qwen2.5-VL is data: ``mappings/qwen2_5_vl.yaml`` converts its language model (Qwen2's layer with multimodal rope,
megatron-core's ``position_embedding_type: mrope`` + ``mrope_section``) and *carries* its vision tower (``carry:
[visual.*]``), which GPTModel has no place for, through the MCore checkpoint unchanged
(``iter_*/ckptbridge_carried.safetensors``) and back bit-exactly on export. Qwen3-VL (interleaved mrope, deepstack
visual features added inside the language model) is refused, naming both.

A tiny model saved by transformers' Qwen2_5_VLForConditionalGeneration (vision tower included) round-trips
bit-exactly at TP1/TP2/PP2/TP2xPP2 in both formats; its torch_dist output loads into megatron-core's own GPTModel
at other layouts with fp32 logits equal to transformers' on text-only tokens, at short and long positions. The
signature bug is a carried tensor dropped or altered: a changed byte comes back changed (the round trip sees it), a
checkpoint without the carried file is refused on export unless the original HF folder is given, and a mapping
without ``carry`` refuses the vision tower as unmapped instead of dropping it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from arch_checks import ATOL, LAYOUTS, assert_align_gate_passes, broken_copy, round_trip
from ckptbridge.cli import main
from ckptbridge.config_source import ConfigOptions
from ckptbridge.convert import Target, convert
from ckptbridge.errors import CkptBridgeError, PlanError
from ckptbridge.formats.carried import CARRIED_FILE
from ckptbridge.formats.mcore_common import safe_load
from ckptbridge.layout import ParallelLayout
from ckptbridge.mapping.registry import MappingRegistry, mappings_dir
from ckptbridge.mcore import model as mm
from ckptbridge.presets import build_tiny_hf, convertible_config, load_preset
from ckptbridge.spec import ModelSpec
from helpers import assert_bit_exact, hf_config, hf_tensors, to_hf, to_mcore
from mcore_runner import run_distributed
from refusals import assert_refused

TOKENS = torch.randint(0, 1001, (2, 16), generator=torch.Generator().manual_seed(25))
LONG = 30000  # far past the short sequences: every mrope section's frequencies wrap many times


@pytest.fixture(scope="module")
def vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_hf("qwen2.5-vl-7b", tmp_path_factory.mktemp("qwen2_5_vl") / "hf", layers=2, seed=52)


@pytest.fixture(scope="module")
def dist(vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as torch_dist at TP2 x PP2."""
    return to_mcore(vl, tmp_path_factory.mktemp("qwen2_5_vl_dist") / "mcore", "torch_dist", tp=2, pp=2)


def visual(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k.startswith("visual.")}


def hf_logits(folder: Path, offset: int = 0) -> torch.Tensor:
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    pos = (offset + torch.arange(TOKENS.shape[1])).expand(3, TOKENS.shape[0], -1)  # text only: three equal rows
    with torch.no_grad():
        return model(input_ids=TOKENS, position_ids=pos).logits


def _logits(rank: int, world: int, iter_dir: str, tp: int, offsets: tuple[int, ...]) -> list[torch.Tensor] | None:
    """megatron-core's GPTModel from the checkpoint's args at TP ``tp`` (PP 1), logits at each offset: 0 through
    ``forward_logits``, else called directly with [3, b, s] position ids starting there (TP 1 only)."""
    args = safe_load(Path(iter_dir) / "common.pt")["args"]
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size = tp, 1
    mm.init_parallel(tp, 1, seed=100 + rank)
    models = mm.build_gpt_model(args, dtype=torch.float32)
    mm.load_torch_dist(models, iter_dir)
    (model,) = models
    assert model.position_embedding_type == "mrope" and list(model.mrope_section) == list(args.mrope_section)
    out = []
    for offset in offsets:
        if not offset:
            out.append(mm.forward_logits(models, TOKENS, vocab_size=args.vocab_size))
            continue
        assert tp == 1
        s = TOKENS.shape[1]
        pos = (offset + torch.arange(s)).expand(3, TOKENS.shape[0], -1)
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
        with torch.no_grad():
            out.append(model.eval()(input_ids=TOKENS, position_ids=pos, attention_mask=mask)[..., : args.vocab_size])
    return out


def test_real_config_translates_to_mrope() -> None:
    args = ModelSpec.from_hf_config(convertible_config(load_preset("qwen2.5-vl-7b"))).args
    assert args["position_embedding_type"] == "mrope" and list(args["mrope_section"]) == [16, 24, 24]
    assert args["add_qkv_bias"] and args["kv_channels"] == 128 and args["num_query_groups"] == 4


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24], "mrope_interleaved": True}}, "interleaved"),
    ({"rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 16]}}, "does not cover"),
    ({"rope_scaling": None}, "without an mrope_section"),
])
def test_what_megatron_cannot_express_is_refused(change: dict, message: str) -> None:
    with pytest.raises(CkptBridgeError, match=message):
        ModelSpec.from_hf_config({**load_preset("qwen2.5-vl-7b")["hf_config"], **change})


def test_qwen3_vl_is_refused_naming_interleaved_mrope_and_deepstack() -> None:
    raw = {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl"}
    assert_refused(raw, r"refused \(qwen3_vl\.yaml\): .*interleaved.*deepstack")


@pytest.mark.parametrize("tp, pp", LAYOUTS)
@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_round_trip_bit_exact_vision_tower_included(vl: Path, tmp_path: Path, fmt: str, tp: int, pp: int) -> None:
    from safetensors.torch import load_file

    mcore = round_trip(vl, tmp_path, fmt, tp, pp)
    assert_bit_exact(visual(hf_tensors(vl)), load_file(mcore / "release" / CARRIED_FILE))


def test_reshard_carries_the_vision_tower(dist: Path, vl: Path, tmp_path: Path) -> None:
    """MCore -> MCore (torch_dist TP2xPP2 -> legacy TP1) keeps the carried file; HF comes back whole."""
    legacy = tmp_path / "legacy"
    convert(dist, legacy, None, Target("mcore", ParallelLayout(tp=1, pp=2), "torch"))
    back = to_hf(legacy, tmp_path / "hf")
    assert_bit_exact(hf_tensors(vl), hf_tensors(back))


@pytest.mark.parametrize("tp, offsets", [(1, (0, LONG)), (2, (0,))])
def test_megatron_loads_the_language_model_with_hf_logits(dist: Path, vl: Path, tp: int, offsets: tuple) -> None:
    """Written at TP2 x PP2, loaded at TP1 and TP2 (PP1) next to the carried file: text-only logits within 1e-4 of
    transformers' Qwen2_5_VLForConditionalGeneration, at positions from 0 and (TP1) from 30000."""
    expected = [hf_logits(vl, offset) for offset in offsets]
    results = run_distributed(_logits, tp, str(dist / "release"), tp, offsets, timeout=180)
    for got in results:
        assert all((g - e).abs().max() <= ATOL for g, e in zip(got, expected)), (tp, offsets)


def test_a_changed_carried_byte_comes_back_changed(dist: Path, vl: Path, tmp_path: Path) -> None:
    """The carried tensors are the bytes in the MCore checkpoint, not a copy from elsewhere: one byte changed there
    is the one difference in the export."""
    altered = tmp_path / "mcore"
    shutil.copytree(dist, altered)
    path = altered / "release" / CARRIED_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40  # the last byte: inside the last tensor's data
    path.write_bytes(bytes(data))
    want, got = hf_tensors(vl), hf_tensors(to_hf(altered, tmp_path / "hf"))
    assert sorted(want) == sorted(got)
    changed = [k for k in want if not torch.equal(want[k].view(torch.uint8), got[k].view(torch.uint8))]
    assert changed == [max(visual(want))]


def test_export_without_the_carried_file_is_refused_unless_the_hf_folder_is_given(dist: Path, vl: Path,
                                                                                  tmp_path: Path) -> None:
    """A checkpoint of this family without its carried file (as one trained by Megatron-LM would be) would export
    without a vision tower: refused, naming it; with --hf-config ORIGINAL it is taken from there, bit-exactly."""
    bare = tmp_path / "mcore"
    shutil.copytree(dist, bare)
    (bare / "release" / CARRIED_FILE).unlink()
    with pytest.raises(PlanError, match=r"without its carried tensors .*visual\.\*.*--hf-config"):
        to_hf(bare, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "hf"
    convert(bare, out, None, Target("hf"), config=ConfigOptions(hf_config=vl))
    assert_bit_exact(hf_tensors(vl), hf_tensors(out))
    assert hf_config(out) == hf_config(vl)


def test_a_mapping_without_carry_refuses_the_vision_tower(vl: Path, tmp_path: Path) -> None:
    """Without ``carry`` the vision tower is not silently dropped: the conversion stops, naming a visual tensor."""
    maps = broken_copy("qwen2_5_vl", tmp_path / "maps", "carry:\n  - visual.*\n", "")
    r = CliRunner().invoke(main, ["--mappings", str(maps), "convert", "--src", "hf", "--dst", "mcore", str(vl),
                                  str(tmp_path / "mcore")])
    assert r.exit_code == 2 and "unmapped source tensor 'visual." in r.output, r.output
    assert not (tmp_path / "mcore").exists()


def test_a_stray_tensor_in_the_carried_file_is_refused(dist: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    stray = tmp_path / "mcore"
    shutil.copytree(dist, stray)
    path = stray / "release" / CARRIED_FILE
    save_file({**load_file(path), "model.layers.0.mlp.extra": torch.zeros(2)}, path)
    with pytest.raises(CkptBridgeError, match="holds 'model.layers.0.mlp.extra', which the mapping's carry patterns"):
        to_hf(stray, tmp_path / "hf")


def test_inspect_shows_the_carried_tensors(vl: Path, dist: Path) -> None:
    n = len(visual(hf_tensors(vl)))
    for folder in (vl, dist):
        r = CliRunner().invoke(main, ["inspect", str(folder)])
        assert r.exit_code == 0 and f"carried: {n} tensors," in r.output and "not in GPTModel" in r.output, r.output


def test_list_architectures_shows_it() -> None:
    lines = {line.split()[0]: line for line in CliRunner().invoke(main, ["list-architectures"]).output.splitlines()
             if line.strip()}
    assert "REFUSED" not in lines["qwen2_5_vl"] and "REFUSED" not in lines["llama4_vl"] and "REFUSED" in lines["qwen3_vl"]


def test_align_gate_passes(tmp_path: Path) -> None:
    """``align --model qwen2.5-vl-7b --random-init --layers 2 --shrink``: the HF side is the VLM class the config
    names, run on text only; every point and the long-position probes within the gate."""
    assert_align_gate_passes("qwen2.5-vl-7b", tmp_path / "align")


@pytest.mark.parametrize("old, new, says", [
    ("  - visual.*\n", "  - model.layers.*\n", "carry pattern 'model.layers.*' names 'model.layers.{L}."),
    ("  - visual.*\n", "  visual: all\n", "carry must be a list of HF tensor name patterns"),
    ("carry:\n", "hf_prefix: 7\ncarry:\n", "hf_prefix must be a non-empty string"),
])
def test_a_carry_or_prefix_that_cannot_be_right_is_refused_when_the_file_loads(tmp_path: Path, old: str, new: str,
                                                                                says: str) -> None:
    for family in ("llama", "qwen2"):  # what it includes, and nothing else (each file's proofs take time)
        shutil.copy(mappings_dir() / f"{family}.yaml", tmp_path)
    text = (mappings_dir() / "qwen2_5_vl.yaml").read_text()
    assert text.count(old) == 1
    (tmp_path / "qwen2_5_vl.yaml").write_text(text.replace(old, new))
    broken = MappingRegistry(tmp_path).broken
    assert len(broken) == 1 and says in broken[0].error, broken
