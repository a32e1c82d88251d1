"""DeepSeek-V3 checkpoints we write load into megatron-core's own MLA GPTModel (CPU, gloo) and match HF.

The model is megatron's: ``MLATransformerConfig``, the per-layer block spec of a first-k-dense MoE
stack (``moe_layer_freq=[0, 1, 1, 1]``), MLA with and without q-LoRA and yarn rope, MTP blocks on
the last stage. torch_dist outputs go through ``dist_checkpointing.load`` at another TP/PP/EP than
they were written with; legacy local-spec outputs load with a plain strict ``load_state_dict``;
and megatron's own ``dist_checkpointing.save`` of the loaded model writes exactly our files'
structure (keys, per-layer key form, shapes, chunks, ``_extra_state`` entries byte for byte).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ckptbridge.harness.checkpoint_args import checkpoint_args
from ckptbridge.formats.legacy import FILE, rank_dir_name
from ckptbridge.formats.mcore_common import safe_load
from ckptbridge.layout import ParallelLayout
from ckptbridge.mcore import model as mm
from ckptbridge.presets import load_preset, shrink_config
from helpers import add_mtp_blocks, resave_with_megatron, to_mcore, torch_dist_structure
from mcore_runner import run_distributed

ATOL = 1e-4
TOKENS = torch.randint(0, 1001, (2, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def deepseek(tiny_moe, tmp_path_factory) -> dict[str, Path]:
    """``mtp``: 1 dense + 3 MoE layers, q-LoRA, yarn, one MTP block; ``no_q_lora``: 2 layers, q_proj."""
    root = tmp_path_factory.mktemp("mla")
    raw = shrink_config(load_preset("deepseek-v3")["hf_config"], layers=2)
    raw["q_lora_rank"] = None
    model_type = raw.pop("model_type")
    raw.pop("architectures")
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **raw), dtype=torch.float32).save_pretrained(
        root / "no_q_lora")
    return {"mtp": add_mtp_blocks(tiny_moe["deepseek-v3"], root / "mtp", depth=1), "no_q_lora": root / "no_q_lora"}


def hf_logits(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(TOKENS).logits


def _load_torch_dist(rank: int, world: int, iter_dir: str, tp: int, pp: int, ep: int):
    args = checkpoint_args(iter_dir, tp, pp, ep, 1)
    mm.init_parallel(tp, pp, seed=100 + rank, ep=ep, etp=1)  # weights differ until the load
    models = mm.build_gpt_model(args, dtype=torch.float32)
    result = mm.load_torch_dist(models, iter_dir)  # strict: every model tensor, every checkpoint tensor
    with mm.main_logits_only(models):
        logits = mm.forward_logits(models, TOKENS, vocab_size=args.vocab_size)
    mtp = sorted(k for k in models[-1].state_dict() if k.startswith("mtp.") and not k.endswith("_extra_state"))
    return logits, mtp, sorted(result["unexpected"]), sorted(result["missing"])


CASES = {  # model: (written layout, loaded (tp, pp, ep))
    "mtp": (dict(tp=2, ep=2), (1, 2, 2)),
    "no_q_lora": (dict(tp=1, ep=2), (2, 1, 1)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_torch_dist_loads_into_megatron_mla_and_matches_hf(deepseek, tmp_path, name):
    written, (tp, pp, ep) = CASES[name]
    mcore = to_mcore(deepseek[name], tmp_path / "m", "torch_dist", **written)
    expected = hf_logits(deepseek[name])
    world = math.lcm(tp, ep) * pp
    results = run_distributed(_load_torch_dist, world, str(mcore / "release"), tp, pp, ep, timeout=240)
    last = [r for r in results if r[0] is not None]
    assert len(last) == world // pp
    for logits, mtp, unexpected, missing in last:
        assert (logits - expected).abs().max() <= ATOL
        assert unexpected == [] and missing == []  # _extra_state entries too: both sides name the same ones
        if name == "mtp":
            assert "mtp.layers.0.eh_proj.weight" in mtp and "mtp.layers.0.transformer_layer.mlp.router.expert_bias" in mtp


def _load_legacy_strict(rank: int, world: int, iter_dir: str):
    from megatron.core import parallel_state as ps

    first = next(p for p in sorted(Path(iter_dir).iterdir()) if p.name.startswith("mp_rank_"))
    args = safe_load(first / FILE, map_location="meta")["args"]
    layout = ParallelLayout.from_args(vars(args))
    mm.init_parallel(layout.tp, layout.pp, seed=100 + rank, ep=layout.ep, etp=layout.expert_tp)
    name = rank_dir_name(ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(), layout,
                         ps.get_expert_model_parallel_rank())
    state = safe_load(Path(iter_dir) / name / FILE)
    models = mm.build_gpt_model(args, dtype=torch.float32)
    models[0].load_state_dict(state["model"], strict=True)  # local-spec names, _extra_state included
    with mm.main_logits_only(models):
        return mm.forward_logits(models, TOKENS, vocab_size=args.vocab_size)


@pytest.mark.parametrize("layout", [dict(pp=2), dict(tp=2)], ids=["pp2", "tp2"])
def test_legacy_local_spec_loads_strictly_per_rank(deepseek, tmp_path, layout):
    """PP 2: the MTP block and the embedding it uses sit on the last stage, as megatron builds them.
    TP 2: the local spec splits MLA's down-projections (column-parallel), the TE spec does not."""
    mcore = to_mcore(deepseek["mtp"], tmp_path / "m", "torch", spec="local", **layout)
    expected = hf_logits(deepseek["mtp"])
    results = [r for r in run_distributed(_load_legacy_strict, 2, str(mcore / "release"), timeout=240) if r is not None]
    assert len(results) == 2 // layout.get("pp", 1)
    for logits in results:
        assert (logits - expected).abs().max() <= ATOL


def test_torch_dist_layout_equals_megatrons_own_save(deepseek, tmp_path):
    """First-k-dense keeps per-layer keys (``decoder.layers.0.mlp.linear_fc1.weight``, no layer axis),
    MLA projections and MTP linears carry ``_extra_state`` entries: all exactly as megatron writes."""
    tp, ep = 2, 2
    # --spec local: chunked as the local model saves (its MLA down-projections are TP-split); names are TE's
    ours = to_mcore(deepseek["mtp"], tmp_path / "ours", "torch_dist", spec="local", tp=tp, ep=ep, etp=1) / "release"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    run_distributed(resave_with_megatron, 2, str(ours), str(theirs), tp, ep, 1, timeout=240)
    (a, a_bytes), (b, b_bytes) = torch_dist_structure(ours), torch_dist_structure(theirs)
    assert sorted(set(a) ^ set(b)) == []
    assert a == b and a_bytes == b_bytes
    assert a["decoder.layers.0.mlp.linear_fc1.weight"][0] == (256, 64)  # dense layer 0: [gate; up], no layer axis
    assert a["decoder.layers.2.mlp.experts.experts.linear_fc1.weight"][0] == (8, 64, 64)
    for key in ("decoder.layers.3.self_attention.linear_q_down_proj._extra_state/shard_0_1",
                "decoder.layers.0.self_attention.linear_kv_up_proj._extra_state/shard_0_1",
                "mtp.layers.0.eh_proj._extra_state/shard_0_1",
                "mtp.layers.0.transformer_layer.mlp.experts.experts.linear_fc1._extra_state/shard_7_8"):
        assert a[key] == "bytes"
    assert not any(k.startswith("decoder.layers.self_attention") for k in a)  # nothing stacked
