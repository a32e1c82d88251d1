"""MiniMax-M2 is refused (``mappings/minimax_m2.yaml``): its q/k norm spans the whole projection, megatron-core's
spans one head. A tiny real MiniMax-M2 checkpoint is refused by ``convert`` with that reason, and the
reason is checked against the real modules: transformers' norm and a per-head norm with the same weights
give different results."""

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner
from transformers import AutoConfig, AutoModelForCausalLM

from ckptbridge.cli import main
from ckptbridge.mapping.registry import MappingRegistry, mappings_dir


def _tiny_minimax(out: Path) -> Path:
    config = AutoConfig.for_model("minimax_m2", vocab_size=101, hidden_size=64, intermediate_size=32,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  num_local_experts=4, num_experts_per_tok=2, rotary_dim=8)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def test_convert_refuses_with_the_reason(tmp_path: Path) -> None:
    src = _tiny_minimax(tmp_path / "hf")
    r = CliRunner().invoke(main, ["convert", "--src", "hf", "--dst", "mcore", str(src), str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    assert "MiniMaxM2ForCausalLM is refused" in r.output and "normalises each head separately" in r.output
    assert not (tmp_path / "out").exists()


def test_the_norm_is_not_per_head(tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(_tiny_minimax(tmp_path / "hf"), dtype=torch.float32)
    attn = model.model.layers[0].self_attn
    heads, dim = 4, 16
    with torch.no_grad():
        attn.q_norm.weight.copy_(torch.linspace(0.5, 1.5, heads * dim))
        x = torch.randn(3, heads * dim) * torch.repeat_interleave(torch.tensor([0.1, 1.0, 3.0, 10.0]), dim)
        whole = attn.q_norm(x)
        per_head = x.view(3, heads, dim)
        per_head = per_head * torch.rsqrt(per_head.pow(2).mean(-1, keepdim=True) + attn.q_norm.variance_epsilon)
        per_head = per_head.reshape(3, heads * dim) * attn.q_norm.weight
    assert attn.q_norm.weight.shape == (heads * dim,)  # one norm over every head, not [head_dim]
    assert (whole - per_head).abs().max() > 0.1


def test_refused_file_holds_nothing_else(tmp_path: Path) -> None:
    text = (mappings_dir() / "minimax_m2.yaml").read_text() + "config: {num_layers: num_hidden_layers}\n"
    (tmp_path / "minimax_m2.yaml").write_text(text)
    reg = MappingRegistry([mappings_dir(), tmp_path])
    assert any("remove ['config']" in b.error for b in reg.broken)
