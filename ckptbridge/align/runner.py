"""One alignment run: every setting (baseline + ablations) x mode, plus the long-position probe.

Order of work, chosen so that each model is loaded once and HF inputs exist before MCore needs
them: (1) weights and token ids; (2) every distinct HF pass (baseline, each HF-side ablation,
probe offsets); (3) MCore passes grouped by layout -- TP=PP=1 in this process with one model that
every MCore-side ablation patches in turn, other layouts in worker processes -- each compared to
its HF reference as soon as it returns, so only metrics are kept.
"""

from __future__ import annotations

import contextlib
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CkptBridgeError
from ..presets import load_preset
from . import points as P
from .ablations import Ablation, hf_side_names, layout_of, load_ablations, mcore_side_names, not_applicable, parts, select
from .applicability import layout_problem
from .metrics import logit_metrics, tensor_metrics
from ..harness.tokens import TokenSample, make_tokens
from .variants import VariantContext
from ..harness.weights import Weights, resolve_weights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("propagated", "isolated")
BASELINE = "baseline"
DEFAULT_PROBE_POSITIONS = (8192, 16384, 32768)


@dataclass
class AlignOptions:
    """Everything the CLI can set; defaults are the CLI defaults."""

    preset: str | None = None
    hf: Path | None = None
    mcore: Path | None = None
    random_init: bool = False
    layers: int | None = None
    shrink: bool = False
    seed: int = 0
    prompt: str | None = None
    tokens: str | None = None
    seq_len: int | None = None
    dtype: str = "fp32"
    device: str = "cpu"
    tp: int = 1
    pp: int = 1
    modes: tuple[str, ...] = MODES
    ablate: str | None = None
    probe: bool = True
    probe_positions: tuple[int, ...] | None = None
    layerwise: bool = False
    work_dir: Path | None = None


@dataclass
class Setting:
    """A row of the ablation table: the baseline or one recipe, as run."""

    name: str
    op: str
    side: str
    description: str
    implementation: str  # "real" | "emulated" | "TransformerEngine" | ...
    hf_order: bool
    why: str
    same_because: str = ""
    hf_variants: tuple[str, ...] = ()
    mcore_variants: tuple[str, ...] = ()
    tp: int = 1
    pp: int = 1
    probed: bool = False
    skipped: str = ""  # why the recipe does not apply to this model (then it is not run)


@dataclass
class AlignResult:
    options: AlignOptions
    meta: dict[str, Any]
    settings: list[Setting]
    rows: list[dict[str, Any]] = field(default_factory=list)
    num_layers: int = 0
    probe_positions: list[int] = field(default_factory=list)
    routing: list[dict[str, Any]] = field(default_factory=list)  # one row per MoE layer x pass (routing.py)
    skipped: list[Setting] = field(default_factory=list)  # recipes that do not apply, with .skipped set

    def setting(self, name: str) -> Setting:
        return next(s for s in self.settings if s.name == name)


def implementation_label(ab: Ablation, registry: dict[str, Ablation], ctx: VariantContext) -> str:
    """How the variant ran on this machine: real library code, TE, megatron's CUDA fusion, or emulated."""
    members = parts(ab, registry)
    if any(m.emulated(ctx) for m in members):
        emulated = [m.name for m in members if m.emulated(ctx)]
        return "emulated" if emulated == [ab.name] else f"emulated ({', '.join(emulated)})"
    if any(m.emulated_unless == "te" for m in members):
        return "TransformerEngine"
    if any(m.emulated_unless == "cuda" for m in members):
        return "megatron fused (CUDA)"
    return "real"


@contextlib.contextmanager
def pinned_numerics() -> Iterator[None]:
    """TF32 off and deterministic algorithms for the run (numerics notes: pin before comparing)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def compare_captures(hf: dict[str, torch.Tensor], mc: dict[str, torch.Tensor], tokens: torch.Tensor,
                     num_layers: int, base: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per point present on both sides: ``base`` fields + point/layer/kind + metrics."""
    rows = []
    for name in P.point_order(num_layers):
        if name not in hf or name not in mc:
            continue
        layer, kind = P.split_point(name)
        if name == P.LOGITS:
            m = logit_metrics(hf[name], mc[name], tokens)
        else:
            m = tensor_metrics(hf[name], mc[name])
        rows.append({**base, "point": name, "layer": -1 if layer is None else layer, "kind": kind, **m})
    missing = [n for n in (P.EMBEDDING, P.LOGITS) if n not in mc or n not in hf]
    if missing:
        raise RuntimeError(f"{base}: no capture of {missing} on one side")
    return rows


def probe_position_ids(seq: int, position: int) -> list[int] | None:
    """Position ids of the long-position probe at ``position``: the first half of the sample at
    ``0..h-1``, the second half at ``position..``.  Queries of the second half attend to keys about
    ``position`` tokens away -- RoPE only sees relative distances, so merely shifting a short
    contiguous sample to a large offset would show nothing.  ``None`` (position 0) = ``0..s-1``."""
    if position == 0:
        return None
    h = seq // 2
    return list(range(h)) + list(range(position, position + seq - h))


def add_probe_growth(rows: list[dict[str, Any]], dtype: torch.dtype) -> None:
    """Give every probe row ``growth``: its relative error over the same point's error in the plain
    run (position 0), the denominator floored at the dtype's machine epsilon.  A correct conversion's
    error does not depend on the distance (growth ~1 in every dtype); an ignored rope-scaling field
    makes it grow, which a scale-free threshold catches even in bf16, where absolute thresholds are
    too loose to see it."""
    eps = torch.finfo(dtype).eps
    # probe passes run like the plain propagated pass (isolated under --layerwise): compare like with like
    ref_mode = "propagated" if any(r["mode"] == "propagated" for r in rows) else "isolated"
    plain = {(r["setting"], r["point"]): r["rel_err"] for r in rows if r["position"] == 0 and r["mode"] == ref_mode}
    for r in rows:
        if r["mode"] == "probe":
            r["growth"] = r["rel_err"] / max(plain.get((r["setting"], r["point"]), 0.0), eps)


def probe_positions(opts: AlignOptions, preset: dict[str, Any] | None, max_positions: int, seq: int) -> list[int]:
    """Probe positions: --probe-positions, the preset's, or 8k/16k/32k, kept only where the
    last position id fits the model's ``max_position_embeddings``."""
    if not opts.probe:
        return []
    wanted = opts.probe_positions or tuple((preset or {}).get("align", {}).get("long_probe_positions", DEFAULT_PROBE_POSITIONS))
    return [int(p) for p in wanted if 0 < int(p) and int(p) + seq - seq // 2 <= max_positions]


def environment(opts: AlignOptions, ctx: VariantContext) -> dict[str, Any]:
    """Versions and machine facts that make the numbers reproducible."""
    import megatron.core
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass  # not Linux: platform.processor() is what we have
    return {
        "device": opts.device,
        "device_name": torch.cuda.get_device_name() if opts.device == "cuda" else cpu,
        "cpu_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "megatron_core": getattr(megatron.core, "__version__", "?"),
        "transformer_engine": "usable" if ctx.te else "not usable (no CUDA or not installed): TE variants are emulated",
        "mcore_spec": "local (pure PyTorch) spec; TE modules appear only inside the TE variants" if ctx.te
                      else "local (pure PyTorch) spec",
        "tf32": "off",
        "deterministic_algorithms": "on (warn only)",
        "sdpa": "torch default backend selection (when HF runs SDPA)",
        "hostname_os": f"{platform.system()} {platform.release()}",
    }


def _settings(chosen: list[Ablation], registry: dict[str, Ablation], ctx: VariantContext, opts: AlignOptions) -> list[Setting]:
    out = [Setting(BASELINE, "baseline", "-", "stock HF vs stock megatron-core (local spec)", "real", False,
                   "the reference row", tp=opts.tp, pp=opts.pp, probed=True)]
    for ab in chosen:
        layout = layout_of(ab, registry)
        out.append(Setting(ab.name, ab.op, ab.side, ab.description, implementation_label(ab, registry, ctx), ab.hf_order,
                           ab.why, ab.same_because, hf_side_names(ab, registry), mcore_side_names(ab, registry),
                           tp=int(layout.get("tp", opts.tp)), pp=int(layout.get("pp", opts.pp)),
                           probed=any(p.op == "rope" for p in parts(ab, registry))))
    return out


def _applicable(settings: list[Setting], registry: dict[str, Ablation], args: dict[str, Any], hf_attention: str,
                opts: AlignOptions) -> tuple[list[Setting], list[Setting]]:
    """Split the settings into those that run and those that do not apply to this model (reason set)."""
    run, skipped = [], []
    for s in settings:
        reason = None if s.name == BASELINE else not_applicable(registry[s.name], registry, args, hf_attention, opts.tp, opts.pp)
        if reason:
            s.skipped = reason
            skipped.append(s)
        else:
            run.append(s)
    return run, skipped


def _check_options(opts: AlignOptions, settings: list[Setting]) -> None:
    if opts.dtype not in DTYPES:
        raise CkptBridgeError(f"--dtype must be one of {', '.join(DTYPES)}")
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise CkptBridgeError("--device cuda: no CUDA device is available here")
    bad = [m for m in opts.modes if m not in MODES]
    if bad or not opts.modes:
        raise CkptBridgeError(f"modes must be among {MODES}, got {opts.modes}")
    if opts.layerwise:
        if opts.tp * opts.pp != 1 or any(s.tp * s.pp != 1 for s in settings):
            raise CkptBridgeError("--layerwise streams a single-rank model: use TP=PP=1 and leave out parallel/* ablations")


def run_alignment(opts: AlignOptions, registry: dict[str, Ablation] | None = None) -> AlignResult:
    """Resolve weights, run every pass, return all metrics (weights made here are deleted after)."""
    from ckptbridge.mcore.model import _te_usable

    start = time.perf_counter()
    registry = registry or load_ablations()
    preset = load_preset(opts.preset) if opts.preset else None
    dtype = DTYPES.get(opts.dtype)
    ctx = VariantContext(dtype=dtype or torch.float32, device=opts.device, te=_te_usable())
    settings = _settings(select(opts.ablate, registry), registry, ctx, opts)
    _check_options(opts, settings)
    with pinned_numerics():
        weights = resolve_weights(opts.preset, opts.hf, opts.mcore, opts.random_init, opts.layers, opts.shrink,
                                  opts.seed, dtype, opts.work_dir)
        try:
            result = _run(opts, weights, dtype, settings, registry, ctx, preset)
        finally:
            weights.cleanup()
    result.meta["seconds"] = round(time.perf_counter() - start, 1)
    return result


def _run(opts: AlignOptions, weights: Weights, dtype: torch.dtype, settings: list[Setting],
         registry: dict[str, Ablation], ctx: VariantContext, preset: dict[str, Any] | None) -> AlignResult:
    from ..harness.checkpoint_args import checkpoint_args

    from .hf_side import attention_implementation
    from ..megatron_args import from_megatron_lm
    from .routing import hf_router_where

    cfg = weights.hf_config
    sample = make_tokens(weights.hf_path, int(cfg["vocab_size"]), opts.prompt, opts.tokens, opts.seq_len)
    margs = checkpoint_args(weights.mcore_iter)
    ctx.mcore_args = {k: v for k, v in vars(margs).items() if isinstance(v, (int, float, str, bool, type(None), list, tuple))}
    num_layers = int(margs.num_layers)
    problem = layout_problem(ctx.mcore_args, opts.tp, opts.pp)
    if problem:
        raise CkptBridgeError(f"--tp {opts.tp} --pp {opts.pp}: {problem}")
    hf_attention, attention_note = attention_implementation(weights.hf_path)
    settings, skipped = _applicable(settings, registry, ctx.mcore_args, hf_attention, opts)
    positions = probe_positions(opts, preset, int(cfg.get("max_position_embeddings") or 0), sample.ids.shape[1])
    moe = bool(from_megatron_lm(ctx.mcore_args).get("num_moe_experts"))  # the checkpoint says num_experts
    meta = {
        "preset": opts.preset, "hub_id": (preset or {}).get("hub_id"),
        "hf_weights": weights.hf_source, "mcore_weights": weights.mcore_source, "random_init": weights.random_init,
        "architecture": (cfg.get("architectures") or ["?"])[0], "num_layers": num_layers,
        "hidden_size": cfg.get("hidden_size"), "vocab_size": cfg.get("vocab_size"),
        "rope_scaling": cfg.get("rope_scaling") or cfg.get("rope_parameters"),
        "dtype": opts.dtype, "tp": opts.tp, "pp": opts.pp, "modes": list(opts.modes), "layerwise": opts.layerwise,
        "tokens": sample.source, "seq_len": int(sample.ids.shape[1]), "token_ids_head": sample.ids[0, :16].tolist(),
        "probe_positions": positions,
        "hf_attention": hf_attention, "hf_attention_note": attention_note, "moe": moe,
        "hf_router": hf_router_where((cfg.get("architectures") or ["?"])[0]) if moe else None,
        "skipped": {s.name: s.skipped for s in skipped},
        "probe_method": ("the sample's first half at position ids 0..h-1 and its second half at P..P+h-1, so the second "
                         "half attends across a distance of about P (HF: position_ids with an explicit all-ones mask; "
                         "MCore: a hook takes rows 0..h-1 and P.. of megatron's own RotaryEmbedding output), instead of a "
                         "P-token sequence whose attention would cost O(P^2)"),
        "environment": environment(opts, ctx),
    }
    result = AlignResult(opts, meta, settings, num_layers=num_layers, probe_positions=positions, skipped=skipped)
    if opts.layerwise:
        from .layerwise import run_layerwise

        result.rows, result.routing = run_layerwise(weights, sample, dtype, settings, ctx, registry, positions, hf_attention)
    else:
        _run_in_memory(result, weights, sample, dtype, registry, ctx)
    add_probe_growth(result.rows, dtype)
    return result


def _run_in_memory(result: AlignResult, weights: Weights, sample: TokenSample, dtype: torch.dtype,
                   registry: dict[str, Ablation], ctx: VariantContext) -> None:
    from .hf_side import fill_context, inv_freq_dtype, load_hf, run_hf
    from .mcore_side import McorePass, McoreRunner, McoreSpec
    from .routing import compare_routing

    opts, tokens = result.options, sample.ids
    hf = load_hf(weights.hf_path, dtype, opts.device, result.meta["hf_attention"])
    fill_context(hf, ctx)
    result.meta["hf_inv_freq_dtype"] = inv_freq_dtype(hf)

    hf_caps: dict[tuple[tuple[str, ...], int], dict[str, torch.Tensor]] = {}
    for s in result.settings:
        for offset in [0] + (result.probe_positions if s.probed else []):
            key = (s.hf_variants, offset)
            if key not in hf_caps:
                hf_caps[key] = run_hf(hf, tokens, ctx, s.hf_variants, probe_position_ids(tokens.shape[1], offset), registry)
    del hf

    # probe passes run like the plain propagated pass, or isolated when only isolated mode was asked for
    probe_isolated = "propagated" not in opts.modes
    groups: dict[tuple[int, int], list[tuple[McorePass, Setting, str, int]]] = {}
    for s in result.settings:
        todo = [(mode, 0) for mode in opts.modes] + [("probe", p) for p in (result.probe_positions if s.probed else [])]
        for mode, offset in todo:
            ref = hf_caps[(s.hf_variants, offset)]
            isolated = mode == "isolated" or (mode == "probe" and probe_isolated)
            inject = {k: v for k, v in ref.items() if k.endswith(".input")} if isolated else None
            pos = probe_position_ids(tokens.shape[1], offset)
            p = McorePass(f"{s.name}|{mode}|{offset}", tokens, s.mcore_variants, inject, tuple(pos) if pos else None)
            groups.setdefault((s.tp, s.pp), []).append((p, s, mode, offset))
    for (tp, pp), items in groups.items():
        runner = McoreRunner(McoreSpec(str(weights.mcore_iter), tp, pp, dtype, opts.device))
        try:
            caps = runner.run([p for p, *_ in items], ctx)
        finally:
            runner.close()
        for p, s, mode, offset in items:
            base = {"setting": s.name, "mode": mode, "position": offset}
            mc = caps.pop(p.key)
            result.rows += compare_captures(hf_caps[(s.hf_variants, offset)], mc, tokens, result.num_layers, base)
            result.routing += compare_routing(hf_caps[(s.hf_variants, offset)], mc, base, int(tokens.shape[1]))
