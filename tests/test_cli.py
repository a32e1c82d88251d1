"""The command line as a user meets it: example, inspect, compare, help."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ckptbridge.cli import main

from helpers import to_mcore


def test_example_inspect_compare(tmp_path):
    runner = CliRunner()
    hf = tmp_path / "hf"
    r = runner.invoke(main, ["example", "qwen2.5-0.5b", str(hf), "--layers", "2"])
    assert r.exit_code == 0, r.output
    mcore = to_mcore(hf, tmp_path / "mcore", "torch", tp=2, pp=2)
    r = runner.invoke(main, ["inspect", "--json", str(mcore)])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["format"] == "torch" and info["family"] == "qwen2" and info["architecture"] == "Qwen2ForCausalLM"
    assert info["layout"]["tp"] == 2 and info["layout"]["pp"] == 2 and info["num_layers"] == 2
    assert info["dtype"] == "float32"
    hf_info = json.loads(runner.invoke(main, ["inspect", "--json", str(hf)]).output)
    assert info["parameters"] == hf_info["parameters"] == sum(v.numel() for v in load_file(hf / "model.safetensors").values())
    # stage-local layer numbers: global layer 1 is layer 0 of pipeline stage 1
    assert any(t["name"] == "decoder.layers.0.self_attention.linear_qkv.bias" and t["file"] == "mp_rank_01_001/model_optim_rng.pt"
               for t in info["tensors"])

    r = runner.invoke(main, ["compare", str(hf), str(mcore)])
    assert r.exit_code == 0 and "bit-identical" in r.output, r.output
    tensors = load_file(hf / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] += 1.0
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    r = runner.invoke(main, ["compare", str(hf), str(mcore)])
    assert r.exit_code == 1 and "DIFF decoder.layers.1.mlp.linear_fc1.weight: max abs 1" in r.output, r.output


def test_help_explains_every_command():
    runner = CliRunner()
    top = runner.invoke(main, ["--help"]).output
    for cmd in ("convert", "inspect", "compare", "example", "list-architectures"):
        assert cmd in top
    conv = runner.invoke(main, ["convert", "--help"]).output
    for opt in ("--tp", "--pp", "--vpp", "--pp-first", "--pp-last", "--format", "--spec", "--dtype", "--force"):
        assert opt in conv
    r = runner.invoke(main, ["convert", "--src", "mcore", "--dst", "hf", "--tp", "2", "a", "b"])
    assert r.exit_code != 0 and "--tp would have no effect with --dst hf" in r.output


def test_help_needs_no_torch():
    """``ckptbridge --help`` and every command's ``--help`` answer without importing torch (1-2 s on a
    small machine): the command line imports what a command runs only when it runs."""
    import subprocess
    import sys

    commands = [c for c in main.commands] + [None]
    code = ("import sys\nfrom ckptbridge.cli import main\nfor c in sys.argv[1:]:\n"
            "    try:\n        main([*([c] if c != '-' else []), '--help'])\n    except SystemExit as e:\n"
            "        assert not e.code, (c, e.code)\nprint('torch' in sys.modules, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code, *(c or "-" for c in commands)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "False", done.stderr
    assert "convert" in commands and "check-mapping" in commands
