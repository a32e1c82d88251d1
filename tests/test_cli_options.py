"""Every option either does something or is refused naming it; ``inspect``'s summary; ``--max-shard-size``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors import safe_open

from ckptbridge.cli import main
from ckptbridge.presets import build_tiny_hf

from helpers import to_mcore


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory, tiny_hf: dict[str, Path], tiny_moe: dict[str, Path]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("options")
    hf = tiny_hf["llama3.2-1b"]
    return {"hf": hf, "mcore": to_mcore(hf, root / "mcore"), "root": root,
            "moe": to_mcore(tiny_moe["mixtral-8x7b"], root / "moe", tp=2, ep=2, etp=1)}


def _run(*argv: object) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in argv])
    return r.exit_code, r.output


#: each --dst hf conversion given one MCore-output option
MCORE_OUTPUT = [["--tp", "1"], ["--pp", "2"], ["--vpp", "2"], ["--pp-first", "1"], ["--pp-last", "1"], ["--ep", "1"],
                ["--etp", "1"], ["--format", "torch"], ["--spec", "local"], ["--moe-grouped-gemm"],
                ["--vocab-divisible-by", "64"], ["--dst-iteration", "5"]]


@pytest.mark.parametrize("option", MCORE_OUTPUT, ids=lambda o: o[0])
def test_mcore_output_options_refused_with_dst_hf(ckpts: dict[str, Path], option: list[str], tmp_path: Path) -> None:
    code, out = _run("convert", "--src", "mcore", "--dst", "hf", *option, ckpts["mcore"], tmp_path / "out")
    assert code == 2 and f"{option[0]} would have no effect with --dst hf" in out, out
    assert not (tmp_path / "out").exists()


def test_max_shard_size_refused_with_dst_mcore(ckpts: dict[str, Path], tmp_path: Path) -> None:
    code, out = _run("convert", "--src", "hf", "--dst", "mcore", "--max-shard-size", "1GB", ckpts["hf"], tmp_path / "o")
    assert code == 2 and "--max-shard-size would have no effect with --dst mcore" in out, out


READ_OPTIONS = [["--iteration", "0"], ["--hf-config", "HF"], ["--arch", "llama"], ["--vocab-size", "1000"],
                ["--hf-set", "eos_token_id=2"]]


@pytest.mark.parametrize("option", READ_OPTIONS, ids=lambda o: o[0])
def test_read_options_refused_on_an_hf_source(ckpts: dict[str, Path], option: list[str], tmp_path: Path) -> None:
    option = [str(ckpts["hf"]) if a == "HF" else a for a in option]
    for argv in (["convert", "--src", "hf", "--dst", "mcore", *option, ckpts["hf"], tmp_path / "o"],
                 ["inspect", *option, ckpts["hf"]],
                 ["compare", *option, ckpts["hf"], ckpts["hf"]]):
        code, out = _run(*argv)
        assert code == 2 and f"{option[0]} would have no effect" in out and "is an HF folder" in out, (argv, out)


@pytest.mark.parametrize("option", [["--arch", "llama"], ["--vocab-size", "1000"], ["--hf-set", "eos_token_id=2"]],
                         ids=lambda o: o[0])
def test_synthesis_options_refused_on_a_ckptbridge_checkpoint(ckpts: dict[str, Path], option: list[str], tmp_path: Path) -> None:
    """ckptbridge's record is the config: flags that shape a synthesized one would do nothing."""
    code, out = _run("convert", "--src", "mcore", "--dst", "hf", *option, ckpts["mcore"], tmp_path / "o")
    assert code == 2 and f"{option[0]} would have no effect" in out and "ckptbridge record" in out, out


def test_arch_refused_beside_hf_config(ckpts: dict[str, Path], tmp_path: Path) -> None:
    code, out = _run("inspect", "--hf-config", ckpts["hf"], "--arch", "llama", ckpts["mcore"])
    assert code == 2 and "--arch would have no effect" in out and "--hf-set" not in out, out


def test_read_options_accepted_where_they_apply(ckpts: dict[str, Path]) -> None:
    """--hf-config (with --hf-set) replaces the record of an MCore checkpoint compared with an HF folder."""
    code, out = _run("compare", "--hf-config", ckpts["hf"], "--hf-set", "eos_token_id=2", ckpts["hf"], ckpts["mcore"])
    assert code == 0, out


@pytest.mark.parametrize("option", [["--etp", "1"], ["--moe-grouped-gemm"]], ids=lambda o: o[0])
def test_expert_options_refused_on_a_dense_model(ckpts: dict[str, Path], option: list[str], tmp_path: Path) -> None:
    code, out = _run("convert", "--src", "hf", "--dst", "mcore", "--format", "torch", *option, ckpts["hf"], tmp_path / "o")
    assert code == 2 and f"{option[0]} applies to mixture-of-experts models" in out, out


@pytest.mark.parametrize("argv", [
    ["align", "--hf", "HF", "--seed", "1"],
    ["align", "--model", "llama3.2-1b", "--random-init", "--no-probe", "--probe-positions", "8192"],
    ["converge", "--hf", "HF", "--seed", "1"],
    ["converge", "--hf", "HF", "--save-format", "torch"],
], ids=["align-seed", "align-probe-positions", "converge-seed", "converge-save-format"])
def test_align_and_converge_options_refused(ckpts: dict[str, Path], argv: list[str]) -> None:
    code, out = _run(*[str(ckpts["hf"]) if a == "HF" else a for a in argv])
    flag = argv[-2] if not argv[-1].startswith("--") else argv[-1]
    assert code == 2 and f"{flag} would have no effect" in out, out


def test_inspect_summarises_extra_state(ckpts: dict[str, Path]) -> None:
    """30 layers of TransformerEngine modules: one _extra_state line, no _extra_state rows."""
    hf = build_tiny_hf("llama3.2-1b", ckpts["root"] / "hf30", layers=30, seed=3)
    for fmt in ("torch_dist", "torch"):
        mcore = to_mcore(hf, ckpts["root"] / f"deep-{fmt}", fmt=fmt, tp=2)
        code, out = _run("inspect", mcore)
        assert code == 0, out
        lines = [line for line in out.splitlines() if "_extra_state" in line]
        assert len(lines) == 1 and lines[0].strip().startswith("_extra_state:"), lines
        info = json.loads(_run("inspect", "--json", mcore)[1])
        assert not [t for t in info["tensors"] if "_extra_state" in t["name"]]
        assert info["extra_state"]["entries"] >= 30 * 4 and len(info["extra_state"]["modules"]) <= 5


def test_inspect_shows_expert_parallel_layout(ckpts: dict[str, Path]) -> None:
    code, out = _run("inspect", "--no-tensors", ckpts["moe"])
    assert code == 0 and "layout tp2 pp1 ep2 etp1" in out.splitlines()[0], out
    assert json.loads(_run("inspect", "--json", ckpts["moe"])[1])["layout"]["ep"] == 2
    dense = _run("inspect", "--no-tensors", ckpts["mcore"])[1].splitlines()[0]
    assert "layout tp1 pp1 (te spec)" in dense, dense  # a dense model: no expert layout to show


def _index_and_files(folder: Path) -> tuple[dict, dict[str, int]]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    sizes: dict[str, int] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            sizes[f.name] = sum(st.get_tensor(k).numel() * st.get_tensor(k).element_size() for k in st.keys())
    return index, sizes


def test_max_shard_size(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """A limit below the model's size gives several shards under it, an index whose weight_map lists every
    tensor and whose total_size is the tensors' bytes; a sharded HF source's layout is the default."""
    out = tmp_path / "sharded"
    code, text = _run("convert", "--src", "mcore", "--dst", "hf", "--max-shard-size", "300KB", ckpts["mcore"], out)
    assert code == 0, text
    index, sizes = _index_and_files(out)
    n = len(sizes)
    assert n > 1 and all(s <= 300_000 for s in sizes.values()), sizes
    assert sorted(sizes) == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert index["metadata"]["total_size"] == sum(sizes.values())
    assert set(index["weight_map"].values()) == set(sizes)
    again = tmp_path / "again"
    assert _run("convert", "--src", "hf", "--dst", "hf", out, again)[0] == 0  # default: the source's shard layout
    assert _index_and_files(again)[1] == sizes
    single = tmp_path / "single"
    assert _run("convert", "--src", "mcore", "--dst", "hf", ckpts["mcore"], single)[0] == 0  # default 5 GB
    assert [p.name for p in single.glob("*.safetensors")] == ["model.safetensors"]
    assert not (single / "model.safetensors.index.json").exists()
    code, text = _run("convert", "--src", "mcore", "--dst", "hf", "--max-shard-size", "5XB", ckpts["mcore"], tmp_path / "x")
    assert code == 2 and "--max-shard-size" in text
