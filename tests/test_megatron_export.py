"""The loop users run: import -> train with megatron-core as Megatron-LM does -> export. Checkpoints here are
written by real training (GPTModel + DDP + ``get_megatron_optimizer``, a few steps, megatron-core's own save
of model *and* optimizer with Megatron-LM's args; tests/megatron_training.py), never by ckptbridge's writers.

For each: ``inspect`` explains it; ``convert --src mcore --dst hf`` with ``--hf-config`` and without it (the
config synthesized from the args) gives an HF folder whose fp32 logits in transformers equal the trained
megatron model's; ``convert --src mcore --dst mcore`` to another layout loads into megatron-core at that
layout with the same logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from ckptbridge.cli import main
from ckptbridge.presets import build_tiny_hf
from megatron_training import train_and_save
from mcore_runner import run_distributed

ATOL = 1e-4

#: (name, preset, training layout, format, distributed optimizer, layout to reshard to)
CASES = [
    ("llama-td-tp2pp2-distopt", "llama3.1-8b", dict(tp=2, pp=2), "torch_dist", True, dict(tp=1, pp=2)),
    ("qwen3-td-tp2pp2-plainopt", "qwen3-8b", dict(tp=2, pp=2), "torch_dist", False, dict(tp=1, pp=1)),
    ("qwen3moe-td-ep2-distopt", "qwen3-30b-a3b", dict(ep=2), "torch_dist", True, dict(tp=2, pp=1)),
    ("llama-legacy-tp2pp2-distopt", "llama3.1-8b", dict(tp=2, pp=2), "torch", True, dict(tp=2, pp=1)),
    ("qwen3-legacy-tp2pp2-plainopt", "qwen3-8b", dict(tp=2, pp=2), "torch", False, dict(tp=1, pp=2)),
    ("qwen3moe-legacy-ep2-distopt", "qwen3-30b-a3b", dict(ep=2), "torch", True, dict(tp=1, pp=2)),
]


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {p: build_tiny_hf(p, root / p, layers=2, seed=11) for p in {c[1] for c in CASES}}


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def trained(request, hf_models, tmp_path_factory):
    name, preset, layout, fmt, dist_opt, reshard = request.param
    out = train_and_save(hf_models[preset], tmp_path_factory.mktemp(name) / "run", fmt=fmt,
                         distributed_optimizer=dist_opt, steps=2, **layout)
    return {**out, "hf": hf_models[preset], "fmt": fmt, "reshard": reshard, "layout": layout}


def _cli(*args) -> str:
    """Run the CLI; its standard output (notes go to standard error)."""
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.stdout


def _hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        return model(tokens).logits


def test_inspect(trained):
    info = json.loads(_cli("inspect", "--json", "--no-tensors", trained["root"]))
    assert info["producer"] == "Megatron-LM" and info["iteration"] == trained["iteration"]
    assert info["format"] == trained["fmt"]
    assert "optimizer" in info["training_state"] and "not read" in info["training_state"]
    assert info["layout"]["tp"] == trained["layout"].get("tp", 1) and info["layout"]["ep"] == trained["layout"].get("ep", 1)


@pytest.mark.parametrize("with_hf_config", [True, False], ids=["hf-config", "synthesized"])
def test_export_matches_the_trained_model(trained, tmp_path, with_hf_config):
    out = tmp_path / "hf"
    flags = ["--hf-config", trained["hf"]] if with_hf_config else []
    _cli("convert", "--src", "mcore", "--dst", "hf", "-q", *flags, trained["root"], out)
    logits = _hf_logits(out, trained["tokens"])
    diff = (logits - trained["logits"]).abs().max().item()
    assert diff <= ATOL, diff
    before = _hf_logits(trained["hf"], trained["tokens"])
    assert (before - trained["logits"]).abs().max().item() > 100 * ATOL  # training moved the weights


def _mcore_logits(rank: int, world: int, iter_dir: str, tp: int, pp: int, tokens: torch.Tensor, vocab: int):
    from ckptbridge.harness.checkpoint_args import checkpoint_args
    from ckptbridge.mcore import model as mm

    args = checkpoint_args(iter_dir, tp, pp)
    mm.init_parallel(tp, pp, seed=100 + rank)
    models = mm.build_gpt_model(args, dtype=torch.float32)
    mm.load_torch_dist(models, iter_dir)
    return mm.forward_logits(models, tokens, vocab_size=vocab)


def test_reshard_loads_in_megatron_with_the_same_logits(trained, tmp_path):
    out = tmp_path / "resharded"
    tp, pp = trained["reshard"]["tp"], trained["reshard"]["pp"]
    _cli("convert", "--src", "mcore", "--dst", "mcore", "-q", "--tp", tp, "--pp", pp, trained["root"], out)
    iter_dir = out / "release"
    vocab = trained["logits"].shape[-1]
    results = run_distributed(_mcore_logits, tp * pp, str(iter_dir), tp, pp, trained["tokens"], vocab)
    logits = next(r for r in results if r is not None)
    diff = (logits.float() - trained["logits"]).abs().max().item()
    assert diff <= ATOL, diff
