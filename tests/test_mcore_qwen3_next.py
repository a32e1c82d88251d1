"""megatron-core's own hybrid GPTModel of Qwen3-Next / Qwen3.5 (gated delta-net + gated attention, MoE with a gated
shared expert, zero-centred norms, partial rotary) runs on CPU and equals transformers.

ckptbridge builds it from local modules (mcore/hybrid.py; compat P14 for the gated delta-net kernel). The Qwen3.5
models reach megatron through ckptbridge's own conversion (torch_dist written at TP1, loaded at TP2 / TP1, one KV group
at TP2: compat P15). The Qwen3-Next model here has a dense layer between MoE layers (``mlp_only_layers``, which
mappings/qwen3_next.yaml refuses: it emits no ``moe_layer_freq`` yet), so its weights reach megatron through the
test-local :func:`_load_hf` (the layouts the mapping describes); the converted Qwen3-Next checkpoint (every layer MoE)
is loaded in tests/test_arch_qwen3_next.py.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptbridge.layout import ParallelLayout, padded_vocab_size
from ckptbridge.megatron_args import full_megatron_lm_args
from helpers import to_mcore
from mcore_runner import run_distributed

ATOL = 1e-4
SEQ = 150  # > 2 chunks of the delta-rule kernel (64)
TOKENS = torch.randint(0, 500, (2, SEQ), generator=torch.Generator().manual_seed(3))
H, HEADS, GROUPS, HEAD_DIM = 64, 4, 2, 16
NK, NV, HK, HV = 2, 4, 16, 16  # linear attention: 2 value heads per key head
EXPERTS, TOPK, MOE_FFN, SHARED_FFN, FFN = 4, 2, 32, 48, 96
DENSE_LAYER = 2  # layers: 0 GDN+MoE, 1 attention+MoE, 2 GDN+dense MLP, 3 attention+MoE


def _common(groups: int) -> dict[str, Any]:
    return dict(vocab_size=500, hidden_size=H, num_hidden_layers=4, num_attention_heads=HEADS, num_key_value_heads=groups,
                head_dim=HEAD_DIM, intermediate_size=FFN, linear_num_key_heads=NK, linear_num_value_heads=NV,
                linear_key_head_dim=HK, linear_value_head_dim=HV, linear_conv_kernel_dim=4, rms_norm_eps=1e-6,
                layer_types=["linear_attention", "full_attention"] * 2, tie_word_embeddings=False,
                max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                              "partial_rotary_factor": 0.25})


def _hf_model(kind: str, groups: int = GROUPS) -> torch.nn.Module:
    """A seeded tiny model of the real transformers classes; every weight random (norms around their identity)."""
    import transformers as tf

    moe = dict(num_experts=EXPERTS, num_experts_per_tok=TOPK, moe_intermediate_size=MOE_FFN,
               shared_expert_intermediate_size=SHARED_FFN, norm_topk_prob=True, mlp_only_layers=[DENSE_LAYER])
    if kind == "qwen3_next":
        model = tf.Qwen3NextForCausalLM(tf.Qwen3NextConfig(**_common(groups), **moe))
    elif kind == "qwen3_5_moe":
        model = tf.Qwen3_5MoeForCausalLM(tf.Qwen3_5MoeTextConfig(**_common(groups), **{k: v for k, v in moe.items()
                                                                                 if k != "mlp_only_layers"}))
    else:
        model = tf.Qwen3_5ForCausalLM(tf.Qwen3_5TextConfig(**_common(groups)))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("linear_attn.norm.weight") else 0.0  # the gated norm is plain x * w
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _margs(hf: torch.nn.Module, layout: ParallelLayout) -> dict[str, Any]:
    """The Megatron args of the model (megatron's own setting names, as mappings/qwen3_next.yaml states them)."""
    c = hf.config
    moe_layers = [0 if t == "dense" else 1 for t in _mlp_types(hf)]
    model: dict[str, Any] = dict(
        num_layers=c.num_hidden_layers, hidden_size=H, ffn_hidden_size=FFN, num_attention_heads=HEADS,
        group_query_attention=True, num_query_groups=c.num_key_value_heads, kv_channels=HEAD_DIM, normalization="RMSNorm",
        norm_epsilon=c.rms_norm_eps, swiglu=True, add_bias_linear=False, add_qkv_bias=False, qk_layernorm=True,
        position_embedding_type="rope", rotary_percent=0.25, rotary_base=10000, untie_embeddings_and_output_weights=True,
        vocab_size=c.vocab_size, max_position_embeddings=c.max_position_embeddings,
        layernorm_zero_centered_gamma=True, attention_output_gate=True,
        experimental_attention_variant="gated_delta_net", linear_attention_freq=2, linear_conv_kernel_dim=4,
        linear_key_head_dim=HK, linear_value_head_dim=HV, linear_num_key_heads=NK, linear_num_value_heads=NV)
    if any(moe_layers):
        model.update(num_moe_experts=EXPERTS, moe_router_topk=TOPK, moe_ffn_hidden_size=MOE_FFN,
                     moe_shared_expert_intermediate_size=SHARED_FFN, moe_shared_expert_gate=True,
                     moe_router_pre_softmax=False, moe_aux_loss_coeff=0.0, moe_grouped_gemm=False,
                     moe_token_dispatcher_type="alltoall", moe_layer_freq=moe_layers)
    return {**model, **layout.to_args(), "make_vocab_size_divisible_by": 128,
            "padded_vocab_size": padded_vocab_size(c.vocab_size, 128, layout.tp), "transformer_impl": "transformer_engine",
            "params_dtype": torch.float32, "bf16": False, "fp16": False, "ckpt_format": "torch_dist", "seq_length": SEQ,
            "num_layers_per_virtual_pipeline_stage": c.num_hidden_layers // (layout.pp * layout.vpp) if layout.vpp else None}


def _mlp_types(hf: torch.nn.Module) -> list[str]:
    return ["moe" if hasattr(layer.mlp, "experts") else "dense" for layer in hf.model.layers]


# --- HF -> megatron, the test-local loader ------------------------------------------------------------------------


def _per_key_head(t: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Rows [part 0 of key head 0; part 1 of key head 0; ...; part 0 of key head 1; ...] -> each part whole."""
    return [p.reshape(-1, *t.shape[1:]) for p in t.reshape(NK, sum(sizes), *t.shape[1:]).split(sizes, dim=1)]


def _gdn_parts(a: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """in_proj as [q; k; v; z; beta; alpha] and conv1d as [q; k; v] (megatron's order, each part whole)."""
    r = NV // NK
    if "in_proj_qkvz.weight" in a:  # Qwen3-Next: per key head [q k v z], [b a]
        in_proj = (_per_key_head(a["in_proj_qkvz.weight"], [HK, HK, r * HV, r * HV])
                   + _per_key_head(a["in_proj_ba.weight"], [r, r]))
    else:  # Qwen3.5: qkv already [q; k; v], then z, b, a
        in_proj = [*a["in_proj_qkv.weight"].split([NK * HK, NK * HK, NV * HV]), a["in_proj_z.weight"],
                   a["in_proj_b.weight"], a["in_proj_a.weight"]]
    return in_proj, list(a["conv1d.weight"].split([NK * HK, NK * HK, NV * HV]))


def _gated_qkv(a: dict[str, torch.Tensor]) -> torch.Tensor:
    """linear_qkv with attention_output_gate: per query group [q heads; gate heads; k; v] (attention.py:1409-1430);
    HF's q_proj holds per head [q_h; gate_h]."""
    q_gate = a["q_proj.weight"].reshape(HEADS, 2, HEAD_DIM, H)
    groups = a["k_proj.weight"].shape[0] // HEAD_DIM
    q, g = (q_gate[:, i].reshape(groups, HEADS // groups * HEAD_DIM, H) for i in (0, 1))
    k, v = (a[f"{n}.weight"].reshape(groups, HEAD_DIM, H) for n in ("k_proj", "v_proj"))
    return torch.cat([q, g, k, v], dim=1).reshape(-1, H)


def _load_hf(models: list[torch.nn.Module], hf: torch.nn.Module) -> None:
    """Copy HF's weights into this rank's megatron chunks (TP: each rank its heads of every part; EP: its experts)."""
    from megatron.core import parallel_state as ps

    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    etp, er = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
    ep, epr = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
    sd = hf.state_dict()

    def col(t: torch.Tensor, n: int = tp, i: int = r) -> torch.Tensor:
        return t.chunk(n)[i]

    def parts(ts: list[torch.Tensor], n: int = tp, i: int = r) -> torch.Tensor:
        return torch.cat([t.chunk(n)[i] for t in ts])

    def row(t: torch.Tensor, n: int = tp, i: int = r) -> torch.Tensor:
        return t.chunk(n, dim=1)[i]

    def vocab(t: torch.Tensor) -> torch.Tensor:
        pad = padded_vocab_size(t.shape[0], 128, tp) - t.shape[0]
        return col(torch.cat([t, t.new_zeros(pad, t.shape[1])]))

    def mlp(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, n: int, i: int) -> dict[str, torch.Tensor]:
        return {"linear_fc1.weight": parts([w_gate, w_up], n, i), "linear_fc2.weight": row(w_down, n, i)}

    for model in models:
        want: dict[str, torch.Tensor] = {}
        if model.pre_process:
            want["embedding.word_embeddings.weight"] = vocab(sd["model.embed_tokens.weight"])
        if model.post_process:
            want["decoder.final_layernorm.weight"] = sd["model.norm.weight"]
            want["output_layer.weight"] = vocab(sd["lm_head.weight"])
        for j, layer in enumerate(model.decoder.layers):
            i = layer.layer_number - 1
            p, out = f"model.layers.{i}.", f"decoder.layers.{j}."
            linear = hf.config.layer_types[i] == "linear_attention"
            attn = p + ("linear_attn." if linear else "self_attn.")
            a = {k.removeprefix(attn): v for k, v in sd.items() if k.startswith(attn)}
            want[out + "input_layernorm.weight"] = sd[p + "input_layernorm.weight"]
            want[out + "pre_mlp_layernorm.weight"] = sd[p + "post_attention_layernorm.weight"]
            s = out + "self_attention."
            if linear:
                in_proj, conv = _gdn_parts(a)
                want.update({s + "in_proj.weight": parts(in_proj), s + "conv1d.weight": parts(conv),
                             s + "dt_bias": col(a["dt_bias"]), s + "A_log": col(a["A_log"]),
                             s + "out_norm.weight": a["norm.weight"] - 1.0,  # megatron's out_norm is zero-centred
                             s + "out_proj.weight": row(a["out_proj.weight"])})
            else:
                want.update({s + "linear_qkv.weight": col(_gated_qkv(a)), s + "linear_proj.weight": row(a["o_proj.weight"]),
                             s + "q_layernorm.weight": a["q_norm.weight"], s + "k_layernorm.weight": a["k_norm.weight"]})
            m, hm = out + "mlp.", p + "mlp."
            if hm + "gate.weight" not in sd:  # dense
                dense = (sd[hm + f"{n}_proj.weight"] for n in ("gate", "up", "down"))
                want.update({m + k: v for k, v in mlp(*dense, tp, r).items()})
                continue
            want[m + "router.weight"] = sd[hm + "gate.weight"]
            want[m + "shared_experts.gate_weight"] = sd[hm + "shared_expert_gate.weight"]
            shared = (sd[hm + f"shared_expert.{n}_proj.weight"] for n in ("gate", "up", "down"))
            want.update({m + "shared_experts." + k: v for k, v in mlp(*shared, tp, r).items()})
            local = EXPERTS // ep
            for e in range(local):
                gate, up = sd[hm + "experts.gate_up_proj"][epr * local + e].chunk(2)
                down = sd[hm + "experts.down_proj"][epr * local + e]
                want.update({f"{m}experts.local_experts.{e}.{k}": v for k, v in mlp(gate, up, down, etp, er).items()})
        own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        assert sorted(own) == sorted(want), (sorted(set(own) - set(want)), sorted(set(want) - set(own)))
        with torch.no_grad():
            for k, v in own.items():
                assert v.shape == want[k].shape, (k, v.shape, want[k].shape)
                v.copy_(want[k])


def _megatron_logits(rank: int, world: int, kind: str, layout: ParallelLayout, groups: int,
                     iter_dir: str | None) -> torch.Tensor | None:
    """This rank's logits: from ckptbridge's converted ``iter_dir`` when given, else through :func:`_load_hf`."""
    from ckptbridge.harness.checkpoint_args import checkpoint_args
    from ckptbridge.mcore import model as mm

    torch.set_num_threads(1)
    if iter_dir is not None:
        args = checkpoint_args(iter_dir, layout.tp, layout.pp, layout.ep, layout.etp)
    else:
        hf = _hf_model(kind, groups)
        args = full_megatron_lm_args(_margs(hf, layout))
    mm.init_parallel(layout.tp, layout.pp, layout.vpp, seed=100 + rank, ep=layout.ep, etp=layout.etp)
    models = mm.build_gpt_model(args, dtype=torch.float32)
    if iter_dir is not None:
        mm.load_torch_dist(models, iter_dir)
    else:
        _load_hf(models, hf)
    return mm.forward_logits(models, TOKENS, vocab_size=args.vocab_size)


def _converted(kind: str, groups: int, work: Path) -> str:
    """The HF model saved, converted by ckptbridge to torch_dist at TP1: its iteration folder."""
    _hf_model(kind, groups).save_pretrained(work / "hf")
    return str(to_mcore(work / "hf", work / "mcore", "torch_dist") / "release")


LAYOUTS = {  # name: (model, layout, KV groups, through ckptbridge's conversion)
    "tp2ep2": ("qwen3_next", ParallelLayout(tp=2, ep=2, etp=1), GROUPS, False),  # TP2 x EP2 on the same 2 ranks
    "pp2vpp2": ("qwen3_next", ParallelLayout(pp=2, vpp=2), GROUPS, False),  # TP1, one layer per virtual chunk
    "qwen3_5_moe-tp2-1group": ("qwen3_5_moe", ParallelLayout(tp=2), 1, True),  # fewer KV groups than TP ranks: P15
    "qwen3_5-tp1": ("qwen3_5", ParallelLayout(), GROUPS, True),
}


@pytest.fixture(scope="module")
def hf_logits() -> dict[tuple[str, int], torch.Tensor]:
    out = {}
    with torch.no_grad():
        for kind, _, groups, _ in LAYOUTS.values():
            out[kind, groups] = _hf_model(kind, groups)(TOKENS).logits
    return out


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_megatron_hybrid_equals_transformers(hf_logits, tmp_path: Path, name: str) -> None:
    """fp32 logits of megatron-core's hybrid model (TP2 x EP2, PP2 x VPP2, TP1; TP2 with one KV group) vs transformers, at
    short and long positions."""
    kind, layout, groups, converted = LAYOUTS[name]
    iter_dir = _converted(kind, groups, tmp_path) if converted else None
    world = math.lcm(layout.tp, layout.ep * layout.expert_tp) * layout.pp
    got = [x for x in run_distributed(_megatron_logits, world, kind, layout, groups, iter_dir, timeout=300)
           if x is not None]
    assert got
    expected = hf_logits[kind, groups]
    for logits in got:
        assert logits.shape == expected.shape
        for where in (slice(0, 16), slice(SEQ - 16, SEQ)):  # first chunk, third chunk of the delta-rule kernel
            err = (logits[:, where] - expected[:, where]).abs().max().item()
            assert err <= ATOL, (name, where, err)


# --- the torch_dist keys a Qwen3-Next mapping must write (megatron's model on the meta device, as plan_check builds it)

R = NV // NK
GDN_KEYS = {  # layer 0: gated delta-net + MoE; in_proj / conv1d stored per part (gated_delta_net.py _split_tensor_factory)
    "input_layernorm": ("self_attention.in_proj.layer_norm_weight", (H,)),
    **{f"in_proj.{p}": (f"self_attention.in_proj.weight.{p}", (n, H)) for p, n in
       (("query", NK * HK), ("key", NK * HK), ("value", NV * HV), ("z", NV * HV), ("beta", NV), ("alpha", NV))},
    **{f"conv1d.{p}": (f"self_attention.conv1d.weight.{p}", (n, 1, 4)) for p, n in
       (("query", NK * HK), ("key", NK * HK), ("value", NV * HV))},
    "dt_bias": ("self_attention.dt_bias", (NV,)), "A_log": ("self_attention.A_log", (NV,)),
    "out_norm": ("self_attention.out_norm.weight", (HV,)), "out_proj": ("self_attention.out_proj.weight", (H, NV * HV)),
    "pre_mlp_layernorm": ("pre_mlp_layernorm.weight", (H,)), "router": ("mlp.router.weight", (EXPERTS, H)),
    "experts_fc1": ("mlp.experts.experts.linear_fc1.weight", (EXPERTS, 2 * MOE_FFN, H)),
    "experts_fc2": ("mlp.experts.experts.linear_fc2.weight", (EXPERTS, H, MOE_FFN)),
    "shared_fc1": ("mlp.shared_experts.linear_fc1.weight", (2 * SHARED_FFN, H)),
    "shared_fc2": ("mlp.shared_experts.linear_fc2.weight", (H, SHARED_FFN)),
    "shared_gate": ("mlp.shared_experts.gate_weight", (1, H)),
}
ATTENTION_KEYS = {  # layer 1: gated attention (q, gate, k, v rows per group), zero-centred q/k norms
    "input_layernorm": ("self_attention.linear_qkv.layer_norm_weight", (H,)),
    "linear_qkv": ("self_attention.linear_qkv.weight", ((2 * HEADS + 2 * GROUPS) * HEAD_DIM, H)),
    "q_layernorm": ("self_attention.q_layernorm.weight", (HEAD_DIM,)),
    "k_layernorm": ("self_attention.k_layernorm.weight", (HEAD_DIM,)),
    "linear_proj": ("self_attention.linear_proj.weight", (H, HEADS * HEAD_DIM)),
}


def _meta_keys(margs: dict, layout: ParallelLayout) -> dict[str, tuple[int, ...]]:
    """The sharded keys and global shapes of every stage of megatron-core's meta-device model (plan_check's build)."""
    from ckptbridge.mcore.plan_check import _megatron_stage

    args = full_megatron_lm_args(margs)
    world = math.lcm(layout.tp * layout.pp, layout.expert_tp * layout.ep * layout.pp)
    keys: dict[str, tuple[int, ...]] = {}
    for stage in range(layout.pp):
        keys.update(_megatron_stage(args, layout, stage, world, torch.float32, None)[0])
    return keys


@pytest.mark.parametrize("layout", [ParallelLayout(tp=2), ParallelLayout(tp=2, pp=2, vpp=2, ep=2)], ids=["tp2", "tp2pp2vpp2ep2"])
def test_sharded_keys_on_meta(layout: ParallelLayout) -> None:
    """plan_check's meta-device build of the hybrid model: per-layer keys (linear_attention_freq > 1 makes megatron's
    layers non-homogeneous, transformer_block.py:835-839), TE names, global shapes independent of the layout; an MTP
    block (Qwen3-Next's ``mtp.*``) on the last stage, its transformer layer the last decoder layer's kind."""
    from ckptbridge.mcore.plan_check import run_bare

    margs = {**_margs(_hf_model("qwen3_next"), layout), "mtp_num_layers": 1}
    keys = run_bare(_meta_keys, margs, layout)  # the fake groups need a process without an earlier test's group
    for i, expected in ((0, GDN_KEYS), (1, ATTENTION_KEYS)):
        layer = {k.removeprefix(f"decoder.layers.{i}."): v for k, v in keys.items() if k.startswith(f"decoder.layers.{i}.")}
        want = dict(expected.values())
        if i == 1:
            want.update({k: v for k, v in GDN_KEYS.values() if k.startswith(("pre_mlp", "mlp."))})
        assert layer == want
    assert keys["decoder.layers.2.mlp.linear_fc1.layer_norm_weight"] == (H,)  # the dense layer fuses its pre-MLP norm
    mtp = {k.removeprefix("mtp.layers.0."): v for k, v in keys.items() if k.startswith("mtp.")}
    layer = {"transformer_layer." + k: v for k, v in ATTENTION_KEYS.values()}
    layer.update({"transformer_layer." + k: v for k, v in GDN_KEYS.values() if k.startswith(("pre_mlp", "mlp."))})
    assert mtp == {"enorm.weight": (H,), "hnorm.weight": (H,), "eh_proj.weight": (H, 2 * H), "final_layernorm.weight": (H,),
                   **layer}


def test_zero_centred_norms_match_transformers() -> None:
    """The local norm megatron's TENorm stands for: zero-centred ``x * (1 + w)`` = transformers' Qwen3NextRMSNorm with
    the same ``w``; the delta-net's gated ``out_norm`` (zero-centred in megatron) = HF's plain ``linear_attn.norm``
    (``x * w``) only with ``w - 1`` (the mapping's one arithmetic step); without the setting, megatron's own norm."""
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNorm, Qwen3NextRMSNormGated

    from ckptbridge.mcore.hybrid import LocalNorm, ZeroCenteredRMSNorm

    def config(zero_centred: bool) -> TransformerConfig:
        return TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=HEADS, normalization="RMSNorm",
                                 layernorm_zero_centered_gamma=zero_centred, use_cpu_initialization=True)

    gen = torch.Generator().manual_seed(5)
    x, gate, w = (torch.randn(*shape, generator=gen) for shape in ((3, HV), (3, HV), (HV,)))
    ours = LocalNorm(config(True), HV, eps=1e-6)
    assert isinstance(ours, ZeroCenteredRMSNorm)
    hf, hf_gated = Qwen3NextRMSNorm(HV, eps=1e-6), Qwen3NextRMSNormGated(HV, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(w)
        hf.weight.copy_(w)
        hf_gated.weight.copy_(w)
        torch.testing.assert_close(ours(x), hf(x), rtol=0, atol=1e-6)
        ours.weight.copy_(w - 1.0)
        torch.testing.assert_close(ours(x) * F.silu(gate), hf_gated(x, gate), rtol=0, atol=1e-6)
    assert isinstance(LocalNorm(config(False), HV, eps=1e-6), torch.nn.RMSNorm)
