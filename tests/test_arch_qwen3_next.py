"""Qwen3-Next / Qwen3.5 and Qwen2.5-VL are refused (mappings/qwen3_next.yaml, qwen2_5_vl.yaml), naming what is
missing: megatron-core 0.16.1's gated delta-net needs flash-linear-attention and Transformer Engine norms on CPU and
ckptbridge has no rule yet for its per-key-head projection layout and per-part TP split; Qwen2.5-VL's vision tower
has no place in GPTModel and is not carried through. The real configs are refused by the spec and by ``convert``
on a tiny model saved by transformers (nothing written); ``list-architectures`` says so.

The last test proves, on megatron-core's real GatedDeltaNet and transformers' real Qwen3NextGatedDeltaNet, the
projection layout and per-part TP split a future mapping must state, and shows the signature bug (a plain TP split
of in_proj: right at TP1, nonsense at TP2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mcore_runner import run_distributed
from refusals import assert_convert_refuses, assert_refused, list_architectures, refused_config

REASONS = {
    "qwen3-next-80b-a3b": r"refused \(qwen3_next\.yaml\): Qwen3-Next / Qwen3\.5 hybrid gated delta-net models are not supported yet: "
                          r".*flash-linear-attention.*in_proj_qkvz/in_proj_ba layout and its per-part TP split",
}


@pytest.mark.parametrize("name", sorted(REASONS))
def test_real_config_is_refused_naming_the_reason(name: str) -> None:
    assert_refused(refused_config(name), REASONS[name])


@pytest.mark.parametrize("arch", ["Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM"])
def test_qwen3_5_is_refused_too(arch: str) -> None:
    raw = {**refused_config("qwen3-next-80b-a3b"), "architectures": [arch]}
    assert_refused(raw, "gated delta-net models are not supported yet")


def test_convert_refuses_a_real_tiny_qwen3_next(tmp_path: Path) -> None:
    assert_convert_refuses("qwen3-next-80b-a3b", tmp_path, "gated delta-net models are not supported yet")


def test_list_architectures_says_refused() -> None:
    lines = {line.split()[0]: line for line in list_architectures().splitlines()}
    assert "REFUSED" in lines["qwen3_next"] and "flash-linear-attention" in lines["qwen3_next"]


# --- the layout a Qwen3-Next mapping must state, proven on the real modules (no mapping yet) -----------------------
# megatron-core's GatedDeltaNet (ssm/gated_delta_net.py) against transformers' Qwen3NextGatedDeltaNet, one layer on
# CPU. megatron-core refuses to build it without flash-linear-attention (HAVE_FLA) though its torch kernel
# (deterministic_mode) needs only fla's l2norm, given here in torch: x / sqrt(sum x^2 + 1e-6), fla's and HF's formula.
H, NK, NV, HK, HV, KERNEL = 64, 4, 8, 16, 16, 4  # 2 value heads per key head


def _hf_gated_delta_net():
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    cfg = Qwen3NextConfig(hidden_size=H, linear_num_key_heads=NK, linear_num_value_heads=NV, linear_key_head_dim=HK,
                          linear_value_head_dim=HV, linear_conv_kernel_dim=KERNEL, num_hidden_layers=1,
                          layer_types=["linear_attention"], rms_norm_eps=1e-6)
    layer = Qwen3NextGatedDeltaNet(cfg, 0).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_((1.0 if name == "norm.weight" else 0.0) + 0.1 * torch.randn(p.shape, generator=gen))
    return layer


def _per_key_head_parts(t, sizes):
    """HF's per-key-head rows [part 0 of head 0; part 1 of head 0; ...; part 0 of head 1; ...] -> each part whole."""
    return [p.reshape(-1, *t.shape[1:]) for p in t.reshape(NK, sum(sizes), *t.shape[1:]).split(sizes, dim=1)]


def _gdn_errors(rank: int, world: int) -> dict[str, float]:
    """Max |megatron - HF| of one gated delta-net layer at TP ``world``, with in_proj/conv1d split per part (each rank
    its heads of q, k, v, z, beta, alpha) and with one plain row split of the whole tensor."""
    import megatron.core.ssm.gated_delta_net as gdn
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from ckptbridge.mcore import model as mm

    gdn.HAVE_FLA, gdn.l2norm = True, lambda x: x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)
    mm.init_parallel(world, 1)
    cfg = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=4, normalization="RMSNorm",
                            layernorm_epsilon=1e-6, activation_func=F.silu, linear_conv_kernel_dim=KERNEL,
                            linear_key_head_dim=HK, linear_value_head_dim=HV, linear_num_key_heads=NK,
                            linear_num_value_heads=NV, experimental_attention_variant="gated_delta_net",
                            linear_attention_freq=1, deterministic_mode=True, tensor_model_parallel_size=world,
                            use_cpu_initialization=True, params_dtype=torch.float32)
    sub = gdn.GatedDeltaNetSubmodules(in_proj=ColumnParallelLinear, out_norm=WrappedTorchNorm, out_proj=RowParallelLinear)
    layer = gdn.GatedDeltaNet(cfg, sub, layer_number=1, pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    hf = _hf_gated_delta_net()
    r = NV // NK
    in_proj = (_per_key_head_parts(hf.in_proj_qkvz.weight.data, [HK, HK, r * HV, r * HV])
               + _per_key_head_parts(hf.in_proj_ba.weight.data, [r, r]))  # [q; k; v; z; beta; alpha]
    conv = list(hf.conv1d.weight.data.split([NK * HK, NK * HK, NV * HV]))  # already [q; k; v]
    x = torch.randn(2, 12, H, generator=torch.Generator().manual_seed(3))
    errors = {}
    for split in ("per_part", "plain"):
        def shard(parts):
            if split == "per_part":
                return torch.cat([p.chunk(world)[rank] for p in parts])
            return torch.cat(parts).chunk(world)[rank]

        with torch.no_grad():
            layer.in_proj.weight.copy_(shard(in_proj))
            layer.conv1d.weight.copy_(shard(conv))
            layer.dt_bias.copy_(hf.dt_bias.chunk(world)[rank])
            layer.A_log.copy_(hf.A_log.chunk(world)[rank])
            layer.out_norm.weight.copy_(hf.norm.weight)
            layer.out_proj.weight.copy_(hf.out_proj.weight.chunk(world, dim=1)[rank])
            out, _ = layer(x.transpose(0, 1).contiguous(), None)
            errors[split] = (out.transpose(0, 1) - hf(x)).abs().max().item()
    return errors


def test_signature_bug_gated_delta_net_tp2_split_is_per_part() -> None:
    """Qwen3-Next's signature bug: in_proj (and conv1d) split across TP ranks as one tensor is right at TP1 and
    nonsense at TP>1. megatron-core's layer at TP2 equals HF's only when each rank takes its heads of every part:
    the layout a Qwen3-Next mapping has to state (per-key-head un-interleave, then a per-part TP split)."""
    for errors in run_distributed(_gdn_errors, 2, timeout=300):
        assert errors["per_part"] <= 1e-5, errors
        assert errors["plain"] > 0.1, errors
