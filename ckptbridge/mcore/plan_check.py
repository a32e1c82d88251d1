"""Check a conversion plan against megatron-core's own model, before anything is written.

The names and shapes ckptbridge writes come from the mapping file (``spec.planned()``) and the
writers' key/shape rules (torch_dist: :func:`part_keys`; legacy: :func:`slots`
/ :func:`local_shape`). Here megatron-core builds the ``GPTModel`` of the target layout on the
``meta`` device (no memory, no weights: a full-size model takes well under a second), one rank per
pipeline stage, inside a *fake* process group (torch's ``fake`` backend: the real megatron
``parallel_state`` of that rank, no communication). Its sharded-state-dict keys and global shapes
(torch_dist) or its per-stage state-dict keys and local shapes (legacy) must equal the plan's; a
mismatch names the tensor, the expected and the actual shape.

Only the local spec can be built without TransformerEngine; its torch_dist keys already carry the
TE names (megatron's ``sharded_state_dict_keys_map``, overridden as ckptbridge's loader does), and for
legacy TE-spec plans its state-dict names are mapped with :mod:`ckptbridge.layer_spec_names`.
The check needs a process without a ``torch.distributed`` group; inside one (a test, a training
job) it runs in a forked worker.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from ckptbridge.errors import PlanError
from ckptbridge.formats.legacy import local_shape, slots
from ckptbridge.formats.torch_dist import part_keys
from ckptbridge.layout import ParallelLayout
from ckptbridge.megatron_args import full_megatron_lm_args
from ckptbridge.spec import ModelSpec
from ckptbridge.layer_spec_names import te_to_local

Shapes = dict[str, tuple[int, ...]]


def planned_dist(spec: ModelSpec, margs: Mapping[str, Any]) -> tuple[Shapes, dict[str, str]]:
    """torch_dist key -> global shape, as ckptbridge's writer stores them, and key -> the rule's name."""
    out: Shapes = {}
    rules: dict[str, str] = {}
    for pt in spec.planned():
        for key, _, shape in part_keys(pt, dict(margs), spec.stacked):  # one key, or one per dist_parts part
            rules.setdefault(key, pt.rule.mcore)
            if out.setdefault(key, tuple(shape)) != tuple(shape):
                raise PlanError(f"{spec.mapping.source}: {pt.mcore_name} is stored under {key} with shape {tuple(shape)}, "
                                f"another tensor of that key has {out[key]}")
    return out, rules


def planned_legacy(spec: ModelSpec, margs: Mapping[str, Any], layout: ParallelLayout, layer_spec: str) -> dict[tuple[int, str], Shapes]:
    """(pipeline stage, model key) -> state-dict key -> local shape, for TP rank 0 and EP rank 0."""
    out: dict[tuple[int, str], Shapes] = {}
    for entries in slots(spec, layout, layer_spec).values():
        for pt, slot in entries:
            if slot.ep in (None, 0):
                out.setdefault((slot.pp, slot.model_key), {})[slot.key] = local_shape(pt, dict(margs), layout, layer_spec)
    return out


@contextmanager
def _fake_rank(rank: int, world: int, layout: ParallelLayout) -> Iterator[None]:
    """This process as ``rank`` of a fake ``world``: megatron's parallel state for that rank."""
    from megatron.core import parallel_state

    from ckptbridge.mcore.model import init_parallel

    dist = torch.distributed
    hook = sys.excepthook  # torch wraps it per group to prefix the rank; this fake group leaves no trace
    dist.init_process_group("fake", rank=rank, world_size=world, store=dist.HashStore())
    try:
        init_parallel(layout.tp, layout.pp, layout.vpp, ep=layout.ep, etp=layout.etp)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
        sys.excepthook = hook


def _megatron_stage(args: argparse.Namespace, layout: ParallelLayout, stage: int, world: int,
                    dtype: torch.dtype, metadata: dict[str, Any] | None) -> tuple[Shapes, dict[str, Shapes]]:
    """Build the model chunks of pipeline ``stage`` (TP/EP rank 0) on ``meta``: sharded keys -> global
    shapes, and per model key the state dict's tensor names -> local shapes."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from ckptbridge.mcore.model import build_gpt_model

    sharded: Shapes = {}
    plain: dict[str, Shapes] = {}
    with _fake_rank(stage * world // layout.pp, world, layout), torch.device("meta"):
        models = build_gpt_model(args, dtype=dtype, perform_initialization=False)
        meta = dict(metadata or {})
        if any(getattr(m, "mtp_process", False) and not m.pre_process for m in models):
            meta["dp_cp_group"] = parallel_state.get_data_parallel_group(with_context_parallel=True)
        for i, model in enumerate(models):
            sd = model.sharded_state_dict(metadata=meta or None)
            apply_factories(sd)
            stack = list(sd.values())
            while stack:
                item = stack.pop()
                if isinstance(item, (list, tuple)):
                    stack.extend(item)
                elif isinstance(item, dict):
                    stack.extend(item.values())
                elif isinstance(item, ShardedTensor):
                    sharded[item.key] = tuple(item.global_shape)
            plain["model" if len(models) == 1 else f"model{i}"] = {
                k: tuple(v.shape) for k, v in model.state_dict().items()
                if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    return sharded, plain


def _compare(expected: Shapes, actual: Shapes, what: str, rules: Mapping[str, str] | None = None) -> list[str]:
    def name(key: str) -> str:
        rule = (rules or {}).get(key)
        return f"{key} (rule {rule})" if rule and rule != key else key

    problems = [f"{what}: {name(k)} is planned with shape {expected[k]} but megatron-core has no such tensor"
                for k in sorted(set(expected) - set(actual))]
    problems += [f"{what}: megatron-core's {k} (shape {actual[k]}) is not planned" for k in sorted(set(actual) - set(expected))]
    problems += [f"{what}: {name(k)} is planned with shape {expected[k]}, megatron-core's has {actual[k]}"
                 for k in sorted(set(expected) & set(actual)) if tuple(expected[k]) != tuple(actual[k])]
    return problems


def check_plan(spec: ModelSpec, margs: Mapping[str, Any], ckpt_format: str, layer_spec: str = "te") -> None:
    """Raise `PlanError` listing every tensor whose name or shape differs from megatron-core's model
    of ``margs``' layout (the Megatron args a conversion writes). Needs no process group in this
    process (else use :func:`check_plan_isolated`)."""
    if torch.distributed.is_initialized():
        raise RuntimeError("check_plan needs a process without a torch.distributed group; use check_plan_isolated")
    layout = ParallelLayout.from_args(margs)
    args = full_megatron_lm_args(margs)
    tp, pp, ep, etp = layout.tp, layout.pp, layout.ep, layout.expert_tp
    world = math.lcm(tp * pp, etp * ep * pp)  # as Megatron-LM's smallest world for the layout
    metadata = None if spec.stacked else {"non_homogeneous_layers": True}
    sharded: Shapes = {}
    plain: dict[tuple[int, str], Shapes] = {}
    for stage in range(pp):
        s, p = _megatron_stage(args, layout, stage, world, margs["params_dtype"], metadata)
        sharded.update(s)
        for model_key, names in p.items():
            plain[(stage, model_key)] = names
    where = f"{spec.mapping.source} at {layout.describe()}"
    if ckpt_format == "torch_dist":
        expected_dist, rules = planned_dist(spec, margs)
        problems = _compare(expected_dist, sharded, f"{where} (torch_dist)", rules)
    else:
        # megatron builds the local spec: a TE-spec plan's names are compared under their local names (TE -> local
        # is one table), its local shapes as the local spec splits them (a rule's local_shard: only TE can say more)
        local = planned_legacy(spec, margs, layout, "local")
        expected = {chunk: {te_to_local(k): local.get(chunk, {}).get(te_to_local(k), v) for k, v in names.items()}
                    for chunk, names in planned_legacy(spec, margs, layout, layer_spec).items()}
        problems = []
        for chunk in sorted(set(expected) | set(plain)):
            problems += _compare(expected.get(chunk, {}), plain.get(chunk, {}),
                                 f"{where} (legacy, {layer_spec} spec, stage {chunk[0]} {chunk[1]})")
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise PlanError("the plan does not match megatron-core's model: " + "; ".join(problems[:8]) + more)


Case = tuple[ModelSpec, dict[str, Any], str, str]  # spec, Megatron args, format, spec name


def _bare_worker(rank: int, world: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """In a forked worker: drop the launcher's single-rank group (the fake groups need a bare process),
    run ``fn``, and leave a group for the launcher to tear down."""
    import torch.distributed as dist

    dist.destroy_process_group()
    try:
        return fn(*args)
    finally:
        dist.init_process_group("fake", rank=0, world_size=1, store=dist.HashStore())


def run_bare(fn: Callable[..., Any], *args: Any, timeout: float = 1800) -> Any:
    """``fn(*args)`` in a process without a torch.distributed group, as the fake groups of a meta-device
    build need: this process when it has none, else one forked worker (``fn`` module-level, picklable)."""
    if torch.distributed.is_initialized():
        from ckptbridge.mcore.launch import run_workers

        (out,) = run_workers(_bare_worker, 1, fn, args, timeout=timeout)
        return out
    return fn(*args)


def _check_all(cases: list[Case]) -> list[str]:
    out = []
    for case in cases:
        try:
            check_plan(*case)
            out.append("")
        except PlanError as exc:
            out.append(str(exc))
    return out


def check_plans(cases: list[Case]) -> list[str]:
    """:func:`check_plan` of each case (``""`` where it passes, else the message), in a process
    without a group (see :func:`run_bare`)."""
    return run_bare(_check_all, [(s, dict(m), f, n) for s, m, f, n in cases])


def check_plan_isolated(spec: ModelSpec, margs: Mapping[str, Any], ckpt_format: str, layer_spec: str = "te") -> None:
    """:func:`check_plan`, run where it can run (see :func:`check_plans`); raises `PlanError`."""
    (problem,) = check_plans([(spec, dict(margs), ckpt_format, layer_spec)])
    if problem:
        raise PlanError(problem)
