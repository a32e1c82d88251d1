"""Qwen3-Next (mappings/qwen3_next.yaml): a tiny model of the real config (delta-net layer, then a gated full-attention
layer, 8 experts + a gated shared expert) round-trips HF -> MCore -> HF bit-exactly at TP1, TP2, PP2, TP2xPP2 and EP2 in
both formats; the torch_dist keys of a delta-net layer are those megatron-core's own GatedDeltaNet.sharded_state_dict
saves (in_proj.weight.query ... .alpha, conv1d.weight.query/.key/.value, shapes and offsets at TP2); the config
translates both ways; a hub checkpoint's MTP block (mtp.*) round-trips as megatron-core's MTP block. (Qwen3.5: tests/test_arch_qwen3_5.py.)

The signature bug: megatron-core's GatedDeltaNet, given the in_proj/conv1d shards ckptbridge writes at TP2, computes
what transformers' Qwen3NextGatedDeltaNet computes (per-part split), and with a mapping that splits in_proj as one
tensor (``shard: column``) it computes nonsense while that mapping's round trip is still bit-exact. megatron-core's
SelfAttention with attention_output_gate splits the gated linear_qkv shards into HF's query, gate, key and value.

The whole model: ckptbridge's torch_dist (TP2 x PP2 x EP2) loads into megatron-core's hybrid GPTModel (built from
local modules by ckptbridge/mcore/hybrid.py) at TP2 and TP1, legacy TP2 with TE and local names, fp32 logits equal
transformers' at 160 positions; a trained zero-centred out_norm exports exactly at --dtype float32, rounded only
with --allow-rounding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from arch_checks import LAYOUTS, assert_align_gate_passes, assert_legacy_matches_hf, assert_megatron_matches_hf, broken_copy, round_trip
from ckptbridge.cli import main
from ckptbridge.formats.mcore_common import safe_load
from ckptbridge.formats.torch_dist import read_metadata
from ckptbridge.mapping.features import with_features
from ckptbridge.presets import build_tiny_hf, convertible_config, load_preset
from ckptbridge.spec import ModelSpec
from helpers import to_mcore
from mcore_runner import run_distributed
from refusals import list_architectures

PRESET = "qwen3-next-80b-a3b"
H, NK, NV, HK, HV, KERNEL = 64, 4, 8, 16, 16, 4  # the tiny preset's delta-net: 2 value heads per key head
GDN = "decoder.layers.0.self_attention."
#: the in_proj rule's TP split in mappings/qwen3_next.yaml, and the signature bug: one plain split of the tensor
PER_PART = """      shard:
        parts: [linear_num_key_heads * linear_key_head_dim, linear_num_key_heads * linear_key_head_dim,
                linear_num_value_heads * linear_value_head_dim, linear_num_value_heads * linear_value_head_dim,
                linear_num_value_heads, linear_num_value_heads]
      dist_parts: [query, key, value, z, beta, alpha]
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_hf(PRESET, tmp_path_factory.mktemp("qwen3_next") / "hf", layers=2)


def convert_cli(src: Path, dst: Path, *args: str, mappings: Path | None = None) -> None:
    extra = ["--mappings", str(mappings)] if mappings else []
    r = CliRunner().invoke(main, [*extra, "convert", "--src", "hf", "--dst", "mcore", *args, str(src), str(dst)])
    assert r.exit_code == 0, r.output


# --- conversion ------------------------------------------------------------------------------------------------
def test_tiny_model_has_both_kinds_of_layer(tiny: Path) -> None:
    spec = ModelSpec.from_hf_config(__import__("json").loads((tiny / "config.json").read_text()))
    assert list(spec.args["linear_attention_freq"]) == [1, 0]
    names = {pt.mcore_name for pt in spec.planned()}
    assert GDN + "in_proj.layer_norm_weight" in names and "decoder.layers.1.self_attention.linear_qkv.weight" in names


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_round_trip_bit_exact(tiny: Path, tmp_path: Path, fmt: str, tp: int, pp: int) -> None:
    round_trip(tiny, tmp_path, fmt, tp, pp)


@pytest.mark.parametrize("fmt,tp", [("torch_dist", 1), ("torch", 2)])
def test_round_trip_expert_parallel(tiny: Path, tmp_path: Path, fmt: str, tp: int) -> None:
    round_trip(tiny, tmp_path, fmt, tp, 1, ep=2)


def test_real_config_translates_both_ways() -> None:
    spec = ModelSpec.from_hf_config(convertible_config(load_preset(PRESET)))
    a = spec.args
    assert list(a["linear_attention_freq"]) == [1, 1, 1, 0] * 12
    assert a["experimental_attention_variant"] == "gated_delta_net" and a["attention_output_gate"]
    assert a["layernorm_zero_centered_gamma"] and a["rotary_percent"] == 0.25 and a["moe_shared_expert_gate"]
    assert (a["linear_num_key_heads"], a["linear_num_value_heads"], a["linear_key_head_dim"]) == (16, 32, 128)
    env = with_features({**a, "padded_vocab_size": a["vocab_size"]})
    hf = spec.mapping.synthesize_hf_config(env)
    assert hf["full_attention_interval"] == 4 and hf["layer_types"] is None  # as the hub writes it
    as_int = spec.mapping.synthesize_hf_config({**env, "linear_attention_freq": 4})  # Megatron-LM's --linear-attention-freq 4
    assert as_int["full_attention_interval"] == 4 and as_int["layer_types"] is None
    odd = spec.mapping.synthesize_hf_config({**env, "linear_attention_freq": [0] + [1] * 47})
    assert odd["layer_types"][:2] == ["full_attention", "linear_attention"]
    assert spec.mapping.describes(env)


def tokens_for(folder: Path, seq: int = 160) -> torch.Tensor:
    """``seq`` tokens of the model's vocabulary: 160 positions span three 64-token chunks of the delta-rule kernel."""
    vocab = __import__("json").loads((folder / "config.json").read_text())["vocab_size"]
    return torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(3))


def test_megatron_loads_converted_checkpoint_at_another_layout(tiny: Path, tmp_path: Path) -> None:
    """ckptbridge's torch_dist at TP2 x PP2 x EP2 loads into megatron-core's hybrid GPTModel at TP2 and TP1 (EP1):
    fp32 logits equal transformers' at every one of 160 positions (three delta-rule chunks)."""
    assert_megatron_matches_hf(tiny, tmp_path, tokens_for(tiny), tp=2, pp=2, ep=2)


@pytest.mark.parametrize("spec", ["te", "local"])
def test_legacy_tp2_loads_into_megatron(tiny: Path, tmp_path: Path, spec: str) -> None:
    assert_legacy_matches_hf(tiny, tmp_path, tokens_for(tiny), spec)


def test_align_gate_passes(tmp_path: Path) -> None:
    """``align --random-init --layers 2 --shrink`` (a delta-net and a full-attention layer) passes its default gate."""
    assert_align_gate_passes(PRESET, tmp_path)


def test_offset_that_would_round_a_norm_weight_is_refused(tiny: Path, tmp_path: Path) -> None:
    """megatron stores the delta-net output norm zero-centred (w - 1): a weight w - 1 cannot hold exactly is
    refused naming the tensor and the way out, not rounded; --allow-rounding rounds it with a note."""
    src = tmp_path / "hf"
    src.mkdir()
    for f in tiny.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.linear_attn.norm.weight"][0] = 1e-3  # w - 1 rounds in fp32
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    r = CliRunner().invoke(main, ["convert", "--src", "hf", "--dst", "mcore", str(src), str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    assert "model.layers.0.linear_attn.norm.weight" in r.output and "offset by -1 is not exact" in r.output
    assert "--allow-rounding" in r.output and not (tmp_path / "out").exists()
    r = CliRunner().invoke(main, ["convert", "--src", "hf", "--dst", "mcore", "--allow-rounding", str(src), str(tmp_path / "out")])
    assert r.exit_code == 0 and "1 value(s) in 1 tensor(s) rounded by an offset step" in r.output, r.output


def test_export_of_a_trained_out_norm_rounds_only_when_asked(tiny: Path, tmp_path: Path) -> None:
    """A Megatron-trained delta-net out_norm (zero-centred: small values w') exported to bf16 needs w' + 1, which
    bf16 cannot hold for most w': refused naming the tensor and the way out; exact at --dtype float32; rounded with
    --allow-rounding, with a note of how much."""
    mcore = tmp_path / "mcore"
    convert_cli(tiny, mcore, "--format", "torch", "--dtype", "bfloat16")
    path = mcore / "release" / "mp_rank_00" / "model_optim_rng.pt"
    ckpt = torch.load(path, weights_only=False)
    key = GDN + "out_norm.weight"
    trained = (torch.randn(ckpt["model"][key].shape, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    ckpt["model"][key] = trained
    torch.save(ckpt, path)

    def export(*args: str) -> tuple[int, str]:
        out = tmp_path / f"hf{len(args)}"
        r = CliRunner().invoke(main, ["convert", "--src", "mcore", "--dst", "hf", *args, str(mcore), str(out)])
        return r.exit_code, r.output

    code, output = export()
    assert code == 2 and key in output and "model.layers.0.linear_attn.norm.weight" in output, output
    assert "--allow-rounding" in output and "--dtype float32" in output, output
    code, output = export("--dtype", "float32")
    assert code == 0, output
    exact = load_file(tmp_path / "hf2" / "model.safetensors")["model.layers.0.linear_attn.norm.weight"]
    assert torch.equal(exact - 1, trained.float())  # every bf16 w' + 1 is a float32
    code, output = export("--allow-rounding")
    assert code == 0 and "rounded by an offset step" in output and "--allow-rounding" in output, output
    rounded = load_file(tmp_path / "hf1" / "model.safetensors")["model.layers.0.linear_attn.norm.weight"]
    assert rounded.dtype == torch.bfloat16 and torch.equal(rounded, (trained.float() + 1).bfloat16())
    assert (rounded.float() - 1 - trained.float()).abs().max() <= 2 ** -8  # half a bf16 step at 1


def hub_mtp_copy(src: Path, dst: Path, seed: int = 11) -> Path:
    """``src`` with the hub's MTP block added by hand (transformers builds none): mtp.fc, the pre-fc norms, mtp.norm
    and mtp.layers.0.* (a gated full-attention MoE layer, per-expert names), seeded; norms near 1 (zero-centred w)."""
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    dtype = tensors["model.embed_tokens.weight"].dtype
    spec = ModelSpec.from_hf_config(__import__("json").loads((src / "config.json").read_text()))
    gen = torch.Generator().manual_seed(seed)
    for pt in spec.planned():
        if pt.mtp is not None:
            for name, shape in zip(pt.hf_names, pt.hf_shapes):
                tensors[name] = (0.1 * torch.randn(tuple(shape), generator=gen)).to(dtype)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def tiny_mtp(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hub_mtp_copy(tiny, tmp_path_factory.mktemp("qwen3_next_mtp") / "hf")


def test_hub_mtp_names_are_the_hub_layout(tiny_mtp: Path) -> None:
    names = set(load_file(tiny_mtp / "model.safetensors"))
    mtp = {n for n in names if n.startswith("mtp.")}
    assert {"mtp.fc.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight",
            "mtp.layers.0.self_attn.q_proj.weight", "mtp.layers.0.self_attn.q_norm.weight",
            "mtp.layers.0.input_layernorm.weight", "mtp.layers.0.post_attention_layernorm.weight",
            "mtp.layers.0.mlp.gate.weight", "mtp.layers.0.mlp.experts.7.down_proj.weight",
            "mtp.layers.0.mlp.shared_expert.up_proj.weight", "mtp.layers.0.mlp.shared_expert_gate.weight"} <= mtp
    assert not any("linear_attn" in n for n in mtp)


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_hub_mtp_block_round_trips_bit_exact(tiny_mtp: Path, tmp_path: Path, fmt: str, tp: int, pp: int) -> None:
    """The hub's mtp.* become megatron-core's MTP block (mtp.layers.0.{enorm,hnorm,eh_proj,final_layernorm} and
    transformer_layer.*, on the last stage) and come back bit-exactly; a folder without them converts without."""
    mcore = round_trip(tiny_mtp, tmp_path, fmt, tp, pp)
    if fmt == "torch_dist":
        keys = set(read_metadata(mcore / "release").state_dict_metadata)
        assert {"mtp.layers.0.enorm.weight", "mtp.layers.0.hnorm.weight", "mtp.layers.0.eh_proj.weight",
                "mtp.layers.0.final_layernorm.weight", "mtp.layers.0.transformer_layer.self_attention.linear_qkv.weight",
                "mtp.layers.0.transformer_layer.mlp.router.weight"} <= keys


def test_mtp_plan_equals_megatrons_model() -> None:
    """The plan of a hub-like config (MTP kept: num_nextn_predict_layers defaults to 1) names and shapes what
    megatron-core's hybrid GPTModel with mtp_num_layers=1 holds, torch_dist and legacy, TE and local spec."""
    from ckptbridge.layout import ParallelLayout
    from ckptbridge.mcore.plan_check import check_plans
    from ckptbridge.presets import shrink_config

    spec = ModelSpec.from_hf_config(shrink_config(convertible_config(load_preset(PRESET)), layers=4))
    assert spec.mtp_depth == 1 and spec.args["mtp_num_layers"] == 1
    cases = [(spec, spec.megatron_args(layout, torch.bfloat16, name, fmt), fmt, name)
             for layout in (ParallelLayout(1, 1), ParallelLayout(2, 2, ep=2))
             for fmt in ("torch_dist", "torch") for name in ("te", "local")]
    assert check_plans(cases) == [""] * len(cases)


def test_folder_without_mtp_converts_without_mtp(tiny: Path, tmp_path: Path) -> None:
    mcore = to_mcore(tiny, tmp_path / "mcore", "torch_dist", tp=1, pp=1)
    assert not any(k.startswith("mtp.") for k in read_metadata(mcore / "release").state_dict_metadata)


def test_more_than_one_mtp_block_is_refused(tiny: Path, tmp_path: Path) -> None:
    src = tmp_path / "hf"
    src.mkdir()
    for f in tiny.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    config = __import__("json").loads((src / "config.json").read_text())
    (src / "config.json").write_text(__import__("json").dumps({**config, "num_nextn_predict_layers": 2}))
    r = CliRunner().invoke(main, ["convert", "--src", "hf", "--dst", "mcore", str(src), str(tmp_path / "out")])
    assert r.exit_code == 2 and "num_nextn_predict_layers=2" in r.output, r.output


def test_list_architectures() -> None:
    lines = {line.split()[0]: line for line in list_architectures().splitlines()}
    assert "Qwen3NextForCausalLM" in lines["qwen3_next"] and "REFUSED" not in lines["qwen3_next"]
    assert "REFUSED" in lines["qwen3_5_vl"] and "vision tower" in lines["qwen3_5_vl"]


# --- structure against megatron-core's own save ------------------------------------------------------------------
def _megatron_gdn(world: int, zero_centred: bool = False):
    """megatron-core's GatedDeltaNet at the tiny preset's sizes, TP ``world`` (in a worker). Built without
    flash-linear-attention by compat P14 (applied when ckptbridge.mcore.model is imported: its torch kernel, fla's
    l2norm in torch)."""
    import megatron.core.ssm.gated_delta_net as gdn
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from ckptbridge.mcore import model as mm

    mm.init_parallel(world, 1)
    cfg = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=4, normalization="RMSNorm",
                            layernorm_epsilon=1e-6, activation_func=F.silu, linear_conv_kernel_dim=KERNEL,
                            linear_key_head_dim=HK, linear_value_head_dim=HV, linear_num_key_heads=NK,
                            linear_num_value_heads=NV, experimental_attention_variant="gated_delta_net",
                            linear_attention_freq=1, deterministic_mode=True, tensor_model_parallel_size=world,
                            use_cpu_initialization=True, params_dtype=torch.float32)
    sub = gdn.GatedDeltaNetSubmodules(in_proj=ColumnParallelLinear, out_norm=WrappedTorchNorm, out_proj=RowParallelLinear)
    return gdn.GatedDeltaNet(cfg, sub, layer_number=1, pg_collection=ProcessGroupCollection.use_mpu_process_groups())


def _megatron_chunks(rank: int, world: int) -> set[tuple]:
    """(key, global shape, offset, shape) of every tensor this rank's GatedDeltaNet saves as its main replica."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories, is_main_replica

    sd = _megatron_gdn(world).sharded_state_dict(prefix=GDN)
    apply_factories(sd)  # in_proj.weight and conv1d.weight become lists of per-part tensors
    return {(t.key, tuple(t.global_shape), tuple(t.global_offset), tuple(t.local_shape))
            for t in nested_values(sd) if isinstance(t, ShardedTensor) and is_main_replica(t.replica_id)}


def test_torch_dist_keys_equal_megatron_gated_delta_net_save(tiny: Path, tmp_path: Path) -> None:
    """Every key, global shape and chunk ckptbridge writes for a delta-net layer at TP2 is one megatron-core's
    GatedDeltaNet.sharded_state_dict saves (_split_tensor_factory's per-part keys), and nothing is missing."""
    theirs = set().union(*run_distributed(_megatron_chunks, 2, timeout=300))
    md = read_metadata(to_mcore(tiny, tmp_path / "mcore", "torch_dist", tp=2) / "release")
    ours = {(k, tuple(m.size), tuple(c.offsets), tuple(c.sizes)) for k, m in md.state_dict_metadata.items()
            if k.startswith(GDN) and hasattr(m, "chunks") for c in m.chunks}
    fused_norm = {c for c in ours if c[0] == GDN + "in_proj.layer_norm_weight"}  # the TE spec's input norm
    assert ours - fused_norm == theirs
    assert {c[0] for c in theirs} >= {GDN + f"in_proj.weight.{p}" for p in ("query", "key", "value", "z", "beta", "alpha")}


# --- the signature bug, on megatron-core's real layer ------------------------------------------------------------
def _gdn_errors(rank: int, world: int, hf_dir: str, ckpts: dict[str, str]) -> dict[str, float]:
    """Max |megatron - HF| of the tiny model's delta-net layer at TP ``world``: in_proj and conv1d from each
    checkpoint's legacy rank file (as ckptbridge split them), the rest from HF split by hand."""
    from transformers import AutoModelForCausalLM

    layer = _megatron_gdn(world)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).model.layers[0].linear_attn.eval()
    x = torch.randn(2, 12, H, generator=torch.Generator().manual_seed(3))
    errors = {}
    for name, ckpt in ckpts.items():
        state = safe_load(Path(ckpt) / "release" / f"mp_rank_{rank:02d}" / "model_optim_rng.pt")["model"]
        with torch.no_grad():
            layer.in_proj.weight.copy_(state[GDN + "in_proj.weight"])
            layer.conv1d.weight.copy_(state[GDN + "conv1d.weight"])
            layer.dt_bias.copy_(hf.dt_bias.chunk(world)[rank])
            layer.A_log.copy_(hf.A_log.chunk(world)[rank])
            layer.out_norm.weight.copy_(hf.norm.weight)  # this layer's norm is plain x * w (not zero-centred)
            layer.out_proj.weight.copy_(hf.out_proj.weight.chunk(world, dim=1)[rank])
            out, _ = layer(x.transpose(0, 1).contiguous(), None)
            errors[name] = (out.transpose(0, 1) - hf(x)).abs().max().item()
    return errors


def test_signature_bug_gated_delta_net_tp2_split_is_per_part(tiny: Path, tmp_path: Path) -> None:
    """Qwen3-Next's signature bug: in_proj split across TP ranks as one tensor is right at TP1 and nonsense at TP>1,
    and the round trip cannot see it. megatron-core's layer at TP2 equals HF's with the shards the shipped mapping
    writes (each rank its heads of every part), not with those of a mapping that says ``shard: column``."""
    broken = broken_copy("qwen3_next", tmp_path / "maps", PER_PART, "      shard: column\n")
    ckpts = {"shipped": tmp_path / "shipped", "plain": tmp_path / "plain"}
    convert_cli(tiny, ckpts["shipped"], "--tp", "2", "--format", "torch")
    convert_cli(tiny, ckpts["plain"], "--tp", "2", "--format", "torch", mappings=broken)
    back = tmp_path / "plain_back"
    r = CliRunner().invoke(main, ["--mappings", str(broken), "convert", "--src", "mcore", "--dst", "hf",
                                  str(ckpts["plain"]), str(back)])
    assert r.exit_code == 0, r.output
    assert all(torch.equal(a, load_file(back / "model.safetensors")[k])
               for k, a in load_file(tiny / "model.safetensors").items())  # the broken mapping round-trips
    for errors in run_distributed(_gdn_errors, 2, str(tiny), {k: str(v) for k, v in ckpts.items()}, timeout=300):
        assert errors["shipped"] <= 1e-5, errors
        assert errors["plain"] > 0.1, errors


# --- the gated attention's fused projection, on megatron-core's real SelfAttention --------------------------------
def _gated_qkv_errors(rank: int, world: int, hf_dir: str, ckpt: str) -> float:
    """Max |megatron - HF| over query, gate, key and value of the tiny model's full-attention layer at TP ``world``:
    megatron-core's SelfAttention (attention_output_gate) splitting the linear_qkv shard ckptbridge wrote, against
    transformers' q_proj (per head [q; gate]), k_proj and v_proj, on this rank's heads."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.enums import AttnMaskType
    from transformers import AutoModelForCausalLM

    from ckptbridge.mcore import model as mm

    mm.init_parallel(world, 1)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).model.layers[1].self_attn
    heads, groups, dim = 8, 4, 16  # the tiny preset's attention
    cfg = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=heads, num_query_groups=groups,
                            kv_channels=dim, attention_output_gate=True, add_bias_linear=False,
                            tensor_model_parallel_size=world, use_cpu_initialization=True, params_dtype=torch.float32)
    attn = SelfAttention(cfg, get_gpt_layer_local_spec().submodules.self_attention.submodules, layer_number=1,
                         attn_mask_type=AttnMaskType.causal, pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    state = safe_load(Path(ckpt) / "release" / f"mp_rank_{rank:02d}" / "model_optim_rng.pt")["model"]
    x = torch.randn(12, 2, H, generator=torch.Generator().manual_seed(5))  # [s, b, h]
    with torch.no_grad():
        attn.linear_qkv.weight.copy_(state["decoder.layers.1.self_attention.linear_qkv.weight"])
        q, k, v, gate = attn.get_query_key_value_tensors(x, None, output_gate=True)
        hq, hgate = hf.q_proj(x).view(12, 2, heads, 2 * dim).chunk(2, dim=-1)
        hk, hv = (p(x).view(12, 2, groups, dim) for p in (hf.k_proj, hf.v_proj))

        def mine(t: torch.Tensor) -> torch.Tensor:
            n = t.shape[2] // world
            return t[:, :, rank * n:(rank + 1) * n]

        return max((a - mine(b)).abs().max().item() for a, b in ((q, hq), (gate, hgate), (k, hk), (v, hv)))


def test_gated_attention_qkv_layout_on_megatron_tp2(tiny: Path, tmp_path: Path) -> None:
    """q_proj's per-head [q; gate] rows reach megatron's linear_qkv as per query group [q heads; gate heads; k; v]:
    megatron-core's own split of the TP2 shards ckptbridge writes gives HF's query, gate, key and value."""
    convert_cli(tiny, tmp_path / "mcore", "--tp", "2", "--format", "torch")
    for error in run_distributed(_gated_qkv_errors, 2, str(tiny), str(tmp_path / "mcore"), timeout=300):
        assert error <= 1e-6, error
