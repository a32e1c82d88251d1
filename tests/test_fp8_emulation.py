"""Emulated FP8 (TE delayed-scaling semantics) on megatron-core linears, on CPU.

Unit tests of the quantiser and of delayed scaling, then a tiny local-spec fp32 GPTModel: the
emulated forward is close to (not equal to) the plain one, ``remove()`` restores it bit for bit,
gradients stay aligned, the E5M2 gradient quantiser really acts, weight gradients reach megatron
DDP's ``main_grad``, and amaxes are reduced over the TP group.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mcore_runner import run_distributed  # noqa: E402

from ckptbridge.converge import fp8  # noqa: E402
from ckptbridge.converge.fp8 import (  # noqa: E402
    DelayedScaler,
    Fp8Recipe,
    enable_emulated_fp8,
    fake_quantize,
    mcore_fp8_config,
    te_fp8_available,
)
from ckptbridge.mcore import model as mm  # noqa: E402  (imports megatron before forking)
from ckptbridge.mcore.launch import ensure_single_rank_group  # noqa: E402
from test_mcore_runtime import tiny_args  # noqa: E402

SEQ = 16
TOKENS = torch.randint(0, 250, (2, SEQ), generator=torch.Generator().manual_seed(0))
LABELS = torch.roll(TOKENS, -1, dims=1)


def _e4m3_grid() -> torch.Tensor:
    """Every finite float8_e4m3fn value, as fp32."""
    vals = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    return vals[torch.isfinite(vals)]


# --------------------------------------------------------------------------------------------
# quantiser
# --------------------------------------------------------------------------------------------


def test_quantize_roundtrips_e4m3_values() -> None:
    grid = _e4m3_grid()
    assert grid.abs().max() == 448.0
    assert torch.equal(fake_quantize(grid, 1.0, "e4m3"), grid)
    # a power-of-two scale moves the grid without rounding; bf16 holds every e4m3 value
    assert torch.equal(fake_quantize(grid / 8, 8.0, "e4m3"), grid / 8)
    q = fake_quantize(grid.bfloat16(), torch.tensor(1.0), "e4m3")
    assert q.dtype == torch.bfloat16 and torch.equal(q.float(), grid)


def test_quantize_saturates_at_fp8_max_over_scale() -> None:
    x = torch.tensor([1000.0, -1e6, float("inf"), 208.0, 200.0])
    # 416 is on the e4m3 grid; 400 lies halfway between 384 and 416 and rounds to even (384)
    assert fake_quantize(x, 2.0, "e4m3").tolist() == [224.0, -224.0, 224.0, 208.0, 192.0]
    assert fake_quantize(torch.tensor([1e9]), 4.0, "e5m2").item() == 57344.0 / 4


def test_e5m2_is_coarser_than_e4m3() -> None:
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(1))
    amax = x.abs().max()
    err = {}
    for fmt in ("e4m3", "e5m2"):
        q = fake_quantize(x, fp8.FP8_MAX[fmt] / amax, fmt)
        err[fmt] = ((q - x).norm() / x.norm()).item()
        assert q.unique().numel() < x.numel()
    assert 1e-3 < err["e4m3"] < 5e-2
    assert err["e5m2"] > 1.5 * err["e4m3"]  # 2 vs 3 mantissa bits


# --------------------------------------------------------------------------------------------
# delayed scaling
# --------------------------------------------------------------------------------------------


def test_scale_of_step_t_comes_from_history_before_t() -> None:
    s = DelayedScaler(["e4m3"], history_len=4)
    assert s.scale.item() == 1.0  # TE's initial scale
    s.quantize(torch.tensor([2.0, -0.5]), 0)
    assert s.scale.item() == 1.0  # recording does not rescale within a step
    s.update()
    assert s.scale.item() == 448.0 / 2.0
    # step 1 quantises with step 0's scale: 4.0 * 224 saturates, so the result is 448 / 224
    assert s.quantize(torch.tensor([4.0]), 0).item() == 2.0
    assert s.scale.item() == 224.0
    s.update()
    assert s.scale.item() == 448.0 / 4.0
    assert (s.last_saturated.item(), s.last_numel.item()) == (1, 1)


def test_saturation_and_underflow_counts() -> None:
    s = DelayedScaler(["e4m3"], history_len=1)
    s.quantize(torch.tensor([3.0]), 0)
    s.update()  # scale 448 / 3: the amax element maps to 448 up to rounding, not clipped
    s.quantize(torch.tensor([3.0, -3.0 * 1.05, 1e-9, 0.0, 1.0]), 0)
    s.update()
    assert s.last_saturated.item() == 1  # only the value 5% above the old amax
    assert s.last_underflow.item() == 1  # 1e-9 flushes to 0; the exact 0 does not count
    assert s.last_numel.item() == 5


def test_amax_is_max_over_microbatches_of_a_step() -> None:
    s = DelayedScaler(["e4m3", "e5m2"], history_len=1)
    s.quantize(torch.tensor([1.0]), 0)
    s.quantize(torch.tensor([-8.0]), 0)
    s.quantize(torch.tensor([3.0]), 0)
    s.quantize(torch.tensor([0.5]), 1)
    s.update()
    assert s.scale.tolist() == [448.0 / 8.0, 57344.0 / 0.5]


@pytest.mark.parametrize("algo", ["max", "most_recent"])
def test_history_length_respected(algo: str) -> None:
    s = DelayedScaler(["e4m3"], history_len=2, algo=algo)
    seen = []
    for amax in (8.0, 1.0, 1.0, 2.0):
        s.quantize(torch.tensor([amax]), 0)
        s.update()
        seen.append(s.scale.item())
    if algo == "max":
        # window of 2: 8 is still seen one step later, forgotten after two
        assert seen == [448 / 8, 448 / 8, 448 / 1, 448 / 2]
    else:
        assert seen == [448 / 8, 448 / 1, 448 / 1, 448 / 2]


def test_zero_or_nonfinite_amax_keeps_previous_scale() -> None:
    s = DelayedScaler(["e4m3"], history_len=1)
    s.update()  # nothing recorded: amax 0
    assert s.scale.item() == 1.0
    s.quantize(torch.tensor([2.0]), 0)
    s.update()
    assert s.scale.item() == 224.0
    for bad in (torch.zeros(3), torch.tensor([float("inf")]), torch.tensor([float("nan"), 1.0])):
        s.quantize(bad, 0)
        s.update()
        assert s.scale.item() == 224.0


def test_margin() -> None:
    s = DelayedScaler(["e5m2"], history_len=1, margin=2)
    s.quantize(torch.tensor([1.0]), 0)
    s.update()
    assert s.scale.item() == 57344.0 / 4


# --------------------------------------------------------------------------------------------
# recipe, TE side
# --------------------------------------------------------------------------------------------


def test_recipe_names_and_label() -> None:
    hybrid = Fp8Recipe.from_name("hybrid")
    assert hybrid == Fp8Recipe() and hybrid.name == "hybrid"
    e4m3 = Fp8Recipe.from_name("E4M3")
    assert (e4m3.fwd_format, e4m3.bwd_format, e4m3.name) == ("e4m3", "e4m3", "e4m3")
    with pytest.raises(ValueError, match="unknown FP8 recipe"):
        Fp8Recipe.from_name("e5m2")
    with pytest.raises(ValueError, match="amax_compute_algo"):
        Fp8Recipe(amax_compute_algo="mean")
    assert hybrid.describe() == "hybrid: E4M3 fwd / E5M2 bwd, delayed scaling, amax history 16"


def test_mcore_fp8_config_names_transformer_config_fields() -> None:
    from megatron.core.transformer import TransformerConfig

    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    cfg = mcore_fp8_config(Fp8Recipe(amax_history_len=1024, amax_compute_algo="max", margin=1))
    assert set(cfg) <= fields
    assert cfg["fp8"] == "hybrid" and cfg["fp8_recipe"] == "delayed"


def test_module_never_imports_transformer_engine_or_megatron_at_import_time() -> None:
    """Megatron's layers import TE when installed, so neither may be a module-level import."""
    tree = ast.parse(open(fp8.__file__).read())
    top: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            top += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            top.append(node.module or "")
    assert not [m for m in top if m.startswith(("transformer_engine", "megatron"))], top
    imported_before = "transformer_engine" in sys.modules
    te_fp8_available()  # asking looks the package up only: it must not import TE (and its CUDA init)
    assert ("transformer_engine" in sys.modules) == imported_before


# --------------------------------------------------------------------------------------------
# tiny megatron GPTModel (local spec, fp32, CPU)
# --------------------------------------------------------------------------------------------


def _fp32_args(**kw: Any) -> Any:
    return tiny_args(params_dtype=torch.float32, bf16=False, **kw)


def _build(seed: int = 5) -> torch.nn.Module:
    mm.init_parallel(1, 1, seed=seed)
    return mm.build_gpt_model(_fp32_args())[0]


def _logits(model: torch.nn.Module, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    s = tokens.shape[1]
    return model(
        input_ids=tokens,
        position_ids=torch.arange(s).unsqueeze(0).expand(tokens.shape[0], -1),
        attention_mask=torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None],
    )


def _loss_backward(model: torch.nn.Module) -> torch.Tensor:
    logits = _logits(model)
    F.cross_entropy(logits.float().flatten(0, 1), LABELS.flatten()).backward()
    return logits.detach()


def _grads(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = _loss_backward(model)
    return logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _calibrated(model: torch.nn.Module, **kw: Any) -> fp8.Fp8Emulation:
    """Emulation after one calibration step (step 0 runs at TE's initial scale 1.0)."""
    emu = enable_emulated_fp8([model], Fp8Recipe(), **kw)
    model.zero_grad(set_to_none=True)
    _loss_backward(model)
    emu.step()
    return emu


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


@pytest.fixture(scope="module")
def gpt() -> Iterator[tuple[torch.nn.Module, torch.Tensor, dict[str, torch.Tensor]]]:
    ensure_single_rank_group()
    model = _build()
    logits, grads = _grads(model)
    yield model, logits, grads


def test_emulated_forward_is_close_and_remove_restores_bitwise(gpt: Any) -> None:
    model, ref, _ = gpt
    emu = _calibrated(model)
    try:
        assert emu.label.startswith("emulated FP8 (hybrid: E4M3 fwd / E5M2 bwd")
        with torch.no_grad():
            rel = _rel(_logits(model), ref)
        assert 1e-3 < rel < 1e-1, rel  # fp8 rounding, not a broken model
        stats = emu.stats()
        assert stats["fp8_linears"] == 8  # 2 layers x (qkv, proj, fc1, fc2); output_layer kept
        assert stats["fp8_steps"] == 1
        assert 1.0 < stats["scale_weight_min"] <= stats["scale_weight_max"]
        assert stats["scale_grad_mean"] > stats["scale_input_mean"]  # gradients are tiny
        assert 0 <= stats["saturated_frac_input"] < 1
        # resume: the scaling state survives a save/load into a fresh handle
        state = emu.state_dict()
        emu.remove()
        emu = enable_emulated_fp8([model], Fp8Recipe())
        emu.load_state_dict(state)
        assert torch.equal(emu.scaler.scale, state["scale"]) and emu.stats()["fp8_steps"] == 1
        with pytest.raises(ValueError, match="amax history shape"):
            enable_emulated_fp8([_build()], Fp8Recipe(amax_history_len=3)).load_state_dict(state)
    finally:
        emu.remove()
    with torch.no_grad():
        assert torch.equal(_logits(model), ref)
    assert not any("_forward_impl" in m.__dict__ for m in model.modules())


def test_emulated_gradients_close_and_e5m2_applied(gpt: Any) -> None:
    model, ref_logits, ref_grads = gpt
    linear_names = [n for n in ref_grads if n.endswith("weight") and "linear" in n]
    assert len(linear_names) == 8

    emu = _calibrated(model)
    logits_q, grads_q = _grads(model)
    emu.remove()
    emu_fwd = _calibrated(model, quantize_grad_output=False)
    logits_f, grads_f = _grads(model)
    emu_fwd.remove()

    for name in [*linear_names, "output_layer.weight"]:
        assert _cos(grads_q[name], ref_grads[name]) > 0.95, name
        assert _rel(grads_q[name], ref_grads[name]) > 1e-4, name  # quantisation did something
    # same forward scales: identical forward, but E5M2 dY changes every quantised weight's grad
    assert torch.equal(logits_q, logits_f)
    assert not torch.equal(logits_q, ref_logits)
    for name in linear_names:
        assert not torch.equal(grads_q[name], grads_f[name]), name
    assert "gradients not quantised" in emu_fwd.label


def test_output_layer_opt_in_and_double_enable_refused(gpt: Any) -> None:
    model, _, _ = gpt
    emu = enable_emulated_fp8([model], Fp8Recipe.from_name("e4m3"), include_output_layer=True)
    try:
        assert emu.stats()["fp8_linears"] == 9
        assert emu.scaler.formats[2] == "e4m3"  # the e4m3 recipe quantises dY in E4M3
        with pytest.raises(RuntimeError, match="already enabled"):
            enable_emulated_fp8([model], Fp8Recipe())
    finally:
        emu.remove()
    with pytest.raises(ValueError, match="no megatron"):
        enable_emulated_fp8([torch.nn.Linear(2, 2)], Fp8Recipe())
    with pytest.raises(ValueError, match="amax_group"):
        enable_emulated_fp8([model], Fp8Recipe(), amax_group="dp")


def test_weight_grads_reach_megatron_ddp_main_grad(gpt: Any) -> None:
    """Quantised (non-leaf) weights in the GEMM: gradients still reach ``main_grad`` via DDP's
    grad-accumulator hooks, also when the layer asks for gradient-accumulation fusion."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    plain, _, _ = gpt
    wrapped = _build()
    wrapped.load_state_dict(plain.state_dict())
    ddp = DistributedDataParallel(wrapped.config, DistributedDataParallelConfig(), wrapped)
    emu_ddp = enable_emulated_fp8([ddp], Fp8Recipe())
    emu_plain = enable_emulated_fp8([plain], Fp8Recipe())
    try:
        linears = [m for m in wrapped.modules() if "_forward_impl" in m.__dict__]
        for m in linears:
            m.gradient_accumulation_fusion = True  # would need a CUDA kernel if passed through
        for emu in (emu_ddp, emu_plain):
            emu.scaler.scale = torch.linspace(4.0, 64.0, len(emu.scaler))
        ddp.zero_grad_buffer()
        _loss_backward(ddp)
        _, grads = _grads(plain)
        for name, p in wrapped.named_parameters():
            assert p.grad is None, name  # DDP moved it into main_grad
            assert torch.equal(p.main_grad, grads[name]), name
    finally:
        emu_ddp.remove()
        emu_plain.remove()


def _amax_groups(rank: int, world: int) -> dict[str, torch.Tensor]:
    """TP2: shard amaxes reduced over TP.  DP2 (different tokens per rank): "tp" leaves the
    per-replica activation scales apart, "tp_dp_cp" (Megatron-LM's default group) joins them."""
    out: dict[str, torch.Tensor] = {}
    mm.init_parallel(2, 1, seed=7)
    model = mm.build_gpt_model(_fp32_args(tensor_model_parallel_size=2))[0]
    emu = enable_emulated_fp8([model], Fp8Recipe(amax_history_len=1))
    _logits(model).float().square().mean().backward()  # vocab-parallel logits: a shard-local loss
    out["tp_local"] = emu.scaler.amax_history[0].clone()
    emu.step()
    out["tp_scale"], out["fp8_max"] = emu.scaler.scale.clone(), emu.scaler.fp8_max

    mm.init_parallel(1, 1, seed=7)  # 2 ranks -> DP 2
    model = mm.build_gpt_model(_fp32_args())[0]
    tokens = torch.randint(0, 250, (2, SEQ), generator=torch.Generator().manual_seed(rank))
    for scope in fp8.AMAX_GROUPS:
        emu = enable_emulated_fp8([model], Fp8Recipe(amax_history_len=1), amax_group=scope)
        with torch.no_grad():
            _logits(model, tokens)
        emu.step()
        out[f"dp_scale_{scope}"] = emu.scaler.scale.clone()
        emu.remove()
    return out


def test_amax_reduction_groups() -> None:
    r0, r1 = run_distributed(_amax_groups, 2)
    assert not torch.equal(r0["tp_local"], r1["tp_local"])  # weight shards differ per rank
    assert torch.equal(r0["tp_scale"], r1["tp_scale"])
    expected = r0["fp8_max"] / torch.maximum(r0["tp_local"], r1["tp_local"])
    assert torch.allclose(r0["tp_scale"], expected, rtol=1e-6)
    # DP replicas: same weights, different activations
    weight = slice(1, None, 3)
    assert torch.equal(r0["dp_scale_tp"][weight], r1["dp_scale_tp"][weight])
    assert not torch.equal(r0["dp_scale_tp"][0::3], r1["dp_scale_tp"][0::3])
    assert torch.equal(r0["dp_scale_tp_dp_cp"], r1["dp_scale_tp_dp_cp"])
    assert torch.equal(torch.minimum(r0["dp_scale_tp"], r1["dp_scale_tp"]), r0["dp_scale_tp_dp_cp"])
