"""Sources are read as they were checked (issue: no exit 0 with wrong weights): a file replaced or modified
while a conversion reads it fails the conversion; headers and indexes that lie, overlap or point outside the
checkpoint are refused naming the file and tensor; only regular files are read (a FIFO never hangs); asset
symlinks stay inside the folder. Nothing is written in each case."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from ckptbridge.convert import Target, convert
from ckptbridge.errors import FormatError
from ckptbridge.formats import dcp_metadata
from ckptbridge.presets import build_tiny_hf
from helpers import to_mcore


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_hf("llama3.1-8b", tmp_path_factory.mktemp("hf") / "llama", layers=2)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _convert_refused(src: Path, dst: Path, match: str, kind: str = "mcore", **kw) -> None:
    with pytest.raises(FormatError, match=match):
        convert(src, dst, None, Target(kind), **kw)
    assert not dst.exists()


@pytest.mark.parametrize("how", ["replaced", "modified"])
def test_source_changed_during_conversion_is_an_error(tiny, tmp_path, how):
    src = _copy(tiny, tmp_path / "src")
    shard = src / "model.safetensors"
    done = []

    def progress_factory(total, label):
        def advance(n):
            if not done:  # first tensor written: change the source under the converter
                done.append(True)
                if how == "replaced":
                    shutil.copy2(shard, tmp_path / "new")
                    os.replace(tmp_path / "new", shard)
                else:
                    with open(shard, "r+b") as f:
                        f.seek(-4, os.SEEK_END)
                        f.write(b"\x00\x00\x80\x3f")  # 1.0: finite, only the change can tell
        return advance

    _convert_refused(src, tmp_path / "out", "changed while it was being converted", progress_factory=progress_factory)


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


@pytest.mark.parametrize("lie,match", [
    ("negative", "invalid offsets"),
    ("overlap", "overlaps the tensor before it"),
    ("gap", "leaves a gap"),
])
def test_lying_safetensors_header_is_refused(tiny, tmp_path, lie, match):
    src = _copy(tiny, tmp_path / "src")

    def edit(header):
        names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
        a, b = header[names[0]], header[names[1]]
        if lie == "negative":
            a["data_offsets"] = [-8, a["data_offsets"][1] - 8]
        elif lie == "overlap":  # b starts 4 bytes early, and the file's end moves with it
            b["data_offsets"] = [b["data_offsets"][0] - 4, b["data_offsets"][1] - 4]
        else:
            b["data_offsets"] = [b["data_offsets"][0] + 4, b["data_offsets"][1] + 4]

    _rewrite_header(src / "model.safetensors", edit)
    _convert_refused(src, tmp_path / "out", match)


def test_overlapping_torch_dist_chunks_are_refused(tiny, tmp_path):
    mcore = to_mcore(tiny, tmp_path / "m", tp=2)
    it = mcore / "release"
    with open(it / ".metadata", "rb") as f:
        md = dcp_metadata.load(f)
    key = "decoder.layers.self_attention.linear_proj.weight"  # row-parallel: two chunks per layer on dim 2
    chunks = md.state_dict_metadata[key].chunks
    first = next(i for i, c in enumerate(chunks) if c.offsets[2] > 0)
    # the second half's chunk claims the first half's offsets: sizes still sum to the tensor's
    moved = type(chunks[first])(offsets=type(chunks[first].offsets)((chunks[first].offsets[0], 0, 0)), sizes=chunks[first].sizes)
    index = next(i for i in md.storage_data if i.fqn == key and tuple(i.offset) == tuple(chunks[first].offsets))
    info = md.storage_data.pop(index)
    md.storage_data[type(index)(key, moved.offsets)] = info
    chunks[first] = moved
    with open(it / ".metadata", "wb") as f:
        dcp_metadata.dump(md, f)
    _convert_refused(mcore, tmp_path / "out", "overlap", kind="hf")


def test_index_and_metadata_naming_files_outside_are_refused(tiny, tmp_path):
    src = _copy(tiny, tmp_path / "src")
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy2(src / "model.safetensors", outside)
    names = json.loads(json.dumps({k: str(outside) for k in _tensor_names(src / "model.safetensors")}))
    (src / "model.safetensors").unlink()
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": names}))
    _convert_refused(src, tmp_path / "out", "not a file inside the checkpoint folder")

    mcore = to_mcore(tiny, tmp_path / "m")
    it = mcore / "release"
    with open(it / ".metadata", "rb") as f:
        md = dcp_metadata.load(f)
    for index, info in list(md.storage_data.items()):
        md.storage_data[index] = type(info)("../" + info.relative_path, info.offset, info.length)
    with open(it / ".metadata", "wb") as f:
        dcp_metadata.dump(md, f)
    _convert_refused(mcore, tmp_path / "out2", "not a file inside", kind="hf")


def _tensor_names(path: Path) -> list[str]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return [k for k in json.loads(raw[8:8 + n]) if k != "__metadata__"]


@pytest.mark.timeout(60)
def test_fifo_or_directory_as_a_shard_is_refused_without_hanging(tiny, tmp_path):
    for kind in ("fifo", "dir"):
        src = _copy(tiny, tmp_path / f"src-{kind}")
        (src / "model.safetensors").unlink()
        if kind == "fifo":
            os.mkfifo(src / "model.safetensors")
        else:
            (src / "model.safetensors").mkdir()
        _convert_refused(src, tmp_path / f"out-{kind}", "a FIFO" if kind == "fifo" else "a directory")


def test_asset_symlink_leaving_the_folder_is_refused(tiny, tmp_path):
    src = _copy(tiny, tmp_path / "src")
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy me")
    (src / "tokenizer.json").symlink_to(secret)
    _convert_refused(src, tmp_path / "out", "outside the checkpoint folder")


@pytest.mark.parametrize("field,value,match", [
    ("num_hidden_layers", 100_000_000, "num_layers .*num_hidden_layers.* outside"),
    ("num_hidden_layers", 2.5, "must be an integer"),
    ("hidden_size", "64", "must be an integer"),
    ("num_attention_heads", 0, "outside"),
    ("rms_norm_eps", "tiny", "finite positive number"),
    ("rope_theta", float("inf"), "finite positive number"),
])
def test_hostile_config_values_are_refused_naming_the_field(tiny, tmp_path, field, value, match):
    from ckptbridge.errors import UnsupportedArchitectureError

    src = _copy(tiny, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg[field] = value
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match=match):
        convert(src, tmp_path / "out", None, Target("mcore"))
    assert not (tmp_path / "out").exists()


def _with_values(src: Path, dst: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_nan_is_an_error_unless_allowed(tiny, tmp_path):
    from ckptbridge.errors import PlanError

    name = "model.layers.1.mlp.down_proj.weight"
    src = _with_values(tiny, tmp_path / "src", lambda t: t[name].view(-1)[:3].fill_(float("nan")))
    with pytest.raises(PlanError, match=rf"{name}.*3 NaN"):
        convert(src, tmp_path / "out", None, Target("mcore"))
    assert not (tmp_path / "out").exists()
    result = convert(src, tmp_path / "out", None, Target("mcore"), allow_nonfinite=True)
    assert any("3 NaN" in n for n in result.notes)


def test_fp16_overflow_and_mixed_dtypes_are_errors(tiny, tmp_path):
    import torch

    from ckptbridge.errors import PlanError

    name = "model.layers.0.self_attn.o_proj.weight"
    big = _with_values(tiny, tmp_path / "big", lambda t: t[name].view(-1)[:1].fill_(1e6))
    with pytest.raises(PlanError, match=rf"casting tensor {name!r} to float16 overflows"):
        convert(big, tmp_path / "out", None, Target("mcore", dtype=torch.float16))
    assert not (tmp_path / "out").exists()

    def to_bf16(t):
        t[name] = t[name].to(torch.bfloat16)
    mixed = _with_values(tiny, tmp_path / "mixed", to_bf16)
    with pytest.raises(PlanError, match=rf"{name!r} is bfloat16 in the source.*pass --dtype"):
        convert(mixed, tmp_path / "out", None, Target("mcore"))
    convert(mixed, tmp_path / "out", None, Target("mcore", dtype=torch.float32))  # chosen explicitly: fine


def test_bad_inputs_are_one_line_errors(tiny, tmp_path):
    from click.testing import CliRunner

    from ckptbridge.cli import main

    bad = _copy(tiny, tmp_path / "bad")
    (bad / "config.json").write_text("[1, 2]")
    res = CliRunner().invoke(main, ["convert", "-q", "--src", "hf", "--dst", "mcore", str(bad), str(tmp_path / "o")])
    assert res.exit_code == 2 and "holds a JSON list, not an object" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["convert", "-q", "--src", "hf", "--dst", "mcore", "--vocab-divisible-by", "0",
                                    str(tiny), str(tmp_path / "o")])
    assert res.exit_code == 2 and "--vocab-divisible-by" in res.output
    assert not (tmp_path / "o").exists()
