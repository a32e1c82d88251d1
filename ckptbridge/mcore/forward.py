"""The pipelined forward pass of a built megatron-core ``GPTModel``: megatron's own schedule, logits
gathered over tensor parallelism on the last stage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ckptbridge.mcore.compat import apply_cpu_patches, cuda_to_cpu
from ckptbridge.mcore.config import ARGS_ATTR

apply_cpu_patches()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
def _gather_tp_last_dim(t: torch.Tensor) -> torch.Tensor:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return t
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(tp)]
    torch.distributed.all_gather(
        parts, t, group=parallel_state.get_tensor_model_parallel_group()
    )
    return torch.cat(parts, dim=-1)


class main_logits_only:
    """Context manager: run ``models`` without their MTP blocks.

    With ``mtp_num_layers`` set, ``GPTModel.forward`` computes the MTP losses and needs labels
    (gpt_model.py:611-612): MTP is a training head in megatron-core 0.16.1.  To compare the
    main model's logits, the blocks stay loaded but are not run.
    """

    def __init__(self, models: Sequence[GPTModel]):
        self.models = list(models)

    def __enter__(self) -> list[GPTModel]:
        self.saved = [(m, m.mtp_process, m.config.mtp_num_layers) for m in self.models]
        for m in self.models:
            m.mtp_process = False
            m.config.mtp_num_layers = None
        return self.models

    def __exit__(self, *exc: Any) -> None:
        for m, process, layers in self.saved:
            m.mtp_process = process
            m.config.mtp_num_layers = layers


def _run_schedule(models: Sequence[GPTModel], tokens: torch.Tensor, *, labels: bool = False) -> tuple[list[Any], int]:
    """Run megatron's own forward-only schedule over ``tokens`` ([b, s]); return what the last stage's loss
    function collected (one entry per microbatch: the TP-gathered output) and the batch size.

    Microbatching: one microbatch of the whole batch, except with virtual pipeline stages where megatron's
    interleaved schedule needs at least ``pp`` microbatches; there the batch is split per sample (padded by
    repeating the last sample, padding dropped by the callers) and ``microbatch_group_size_per_vp_stage`` is
    set to the microbatch count for the call. ``labels=True`` passes the tokens as labels (the forward then
    computes losses, as it must for MTP: see :func:`forward_mtp_logits`)."""
    apply_cpu_patches()
    models = list(models)
    config = models[0].config
    b, s = tokens.shape
    tokens = tokens.to(torch.long)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()

    if vpp is not None:
        n_mb = max(b, pp)
        samples = [tokens[min(i, b - 1) : min(i, b - 1) + 1] for i in range(n_mb)]
        microbatches, mbs = samples, 1
    else:
        n_mb, microbatches, mbs = 1, [tokens], b

    position_ids = torch.arange(s, dtype=torch.long).unsqueeze(0)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]

    def loss_func(output: torch.Tensor, non_loss_data: bool = False) -> torch.Tensor:
        return _gather_tp_last_dim(output)

    def forward_step(data_iterator: Any, model: GPTModel) -> tuple[torch.Tensor, Any]:
        mb = next(data_iterator)
        pos = position_ids.expand(mb.shape[0], -1)
        if model.position_embedding_type == "mrope":  # [3, b, s]: text only, so the three rows are equal
            pos = pos.expand(3, -1, -1)
        out = model(input_ids=mb, position_ids=pos, attention_mask=mask, labels=mb if labels else None)
        return out, loss_func

    if vpp is not None:
        data_iterator: Any = [iter(list(microbatches)) for _ in models]
    else:
        data_iterator = iter(microbatches)

    saved_group = config.microbatch_group_size_per_vp_stage
    if vpp is not None:
        config.microbatch_group_size_per_vp_stage = n_mb
    try:
        for m in models:
            m.eval()
        with torch.no_grad(), cuda_to_cpu():
            store = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=data_iterator,
                model=models if len(models) > 1 else models[0],
                num_microbatches=n_mb,
                seq_length=s,
                micro_batch_size=mbs,
                forward_only=True,
                collect_non_loss_data=True,
            )
    finally:
        config.microbatch_group_size_per_vp_stage = saved_group
    return list(store), b


def _vocab_size(models: Sequence[GPTModel], vocab_size: int | None) -> int | None:
    args = getattr(models[0], ARGS_ATTR, None)
    return int(args.vocab_size) if vocab_size is None and args is not None else vocab_size


def forward_logits(
    models: Sequence[GPTModel], tokens: torch.Tensor, *, vocab_size: int | None = None
) -> torch.Tensor | None:
    """Forward ``tokens`` ([b, s] int64, identical on every rank) through all PP stages.

    Uses megatron's ``get_forward_backward_func`` with ``forward_only=True`` and
    ``collect_non_loss_data=True`` (so the last stage's "loss function" receives the logits),
    under :func:`cuda_to_cpu` for the schedules' ``device="cuda"`` counters (P4).  The
    attention mask is explicit (``[1, 1, s, s]`` bool, True = masked, like Megatron-LM's
    ``get_ltor_masks_and_position_ids``) so megatron never builds its CUDA default mask.
    Microbatching: :func:`_run_schedule`.

    Returns ``[b, s, vocab]`` logits in the model dtype, gathered over TP and sliced to
    ``args.vocab_size`` (or ``vocab_size``), on last-stage ranks; ``None`` elsewhere.
    """
    vocab_size = _vocab_size(models, vocab_size)
    store, b = _run_schedule(models, tokens)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    logits = torch.cat(store, dim=0)[:b]
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    return logits


def forward_mtp_logits(
    models: Sequence[GPTModel], tokens: torch.Tensor, *, vocab_size: int | None = None
) -> list[torch.Tensor] | None:
    """The logits of each multi-token-prediction depth, ``[b, s, vocab]`` per depth (gathered over TP, sliced
    to the vocabulary), on last-stage ranks; ``None`` elsewhere.

    megatron-core 0.16.1 has no MTP inference output: ``GPTModel._postprocess`` runs ``output_layer`` on each
    depth's hidden states and feeds the result straight into that depth's loss (gpt_model.py:611-660), so
    the forward needs labels. Here it runs with ``labels=tokens`` (the losses are dropped) and a hook on the
    last chunk's ``output_layer`` records a copy of every call's output (the loss then overwrites the logits
    in place): per microbatch one per depth, then the main head.
    Position ``i`` of depth ``k`` predicts token ``i + k + 1``; its input embedding is token ``i + k``
    (megatron rolls the ids left by one per depth and fills the end with id 0, so the last ``k`` positions of
    depth ``k`` see padding).
    """
    models = list(models)
    depth = int(models[-1].config.mtp_num_layers or 0)
    if depth == 0:
        raise ValueError("forward_mtp_logits: the model has no MTP blocks (mtp_num_layers is not set)")
    vocab_size = _vocab_size(models, vocab_size)
    calls: list[torch.Tensor] = []

    def record(module: Any, inputs: Any, output: Any) -> None:
        # a copy: megatron's vocab-parallel cross entropy then exponentiates the logits in place
        calls.append(_gather_tp_last_dim(output[0].clone()).transpose(0, 1))  # [s, b, v/tp] -> [b, s, v]

    last = models[-1]
    handle = last.output_layer.register_forward_hook(record) if last.post_process else None
    try:
        _, b = _run_schedule(models, tokens, labels=True)
    finally:
        if handle is not None:
            handle.remove()
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    if len(calls) % (depth + 1):
        raise RuntimeError(f"output_layer ran {len(calls)} times, not a multiple of {depth + 1} (MTP depths + main)")
    per_mb = [calls[i:i + depth + 1] for i in range(0, len(calls), depth + 1)]
    out = [torch.cat([mb[k] for mb in per_mb], dim=0)[:b] for k in range(depth)]
    return [t[..., :vocab_size] if vocab_size is not None else t for t in out]
