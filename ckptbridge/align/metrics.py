"""Error metrics between a reference (HF) tensor and a test (MCore) tensor.

All arithmetic is done in float64 so the metric itself adds no rounding of the size it measures.
Max-abs is kept as a diagnostic (outliers dominate it, see numerics notes); relative Frobenius
error and cosine are scale-aware and are what gates should use in reduced precision.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Metrics = dict[str, float]


def tensor_metrics(ref: torch.Tensor, test: torch.Tensor) -> Metrics:
    """``max_abs``, ``mean_abs``, ``rel_err`` (||test-ref||_F / ||ref||_F) and ``cosine``."""
    if ref.shape != test.shape:
        raise ValueError(f"shape mismatch: reference {tuple(ref.shape)} vs test {tuple(test.shape)}")
    a = ref.detach().to(torch.float64).flatten()
    b = test.detach().to(torch.float64).flatten()
    diff = b - a
    ref_norm = float(a.norm())
    diff_norm = float(diff.norm())
    denom = ref_norm * float(b.norm())
    return {
        "max_abs": float(diff.abs().max()) if diff.numel() else 0.0,
        "mean_abs": float(diff.abs().mean()) if diff.numel() else 0.0,
        "rel_err": diff_norm / ref_norm if ref_norm > 0 else (0.0 if diff_norm == 0 else math.inf),
        "cosine": float(a @ b) / denom if denom > 0 else (1.0 if diff_norm == 0 else 0.0),
    }


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """Mean cross entropy of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]`` (float64)."""
    if tokens.shape[1] < 2:
        return math.nan
    lp = logits[:, :-1].to(torch.float64)
    return float(F.cross_entropy(lp.reshape(-1, lp.shape[-1]), tokens[:, 1:].reshape(-1)))


def logit_metrics(ref: torch.Tensor, test: torch.Tensor, tokens: torch.Tensor) -> Metrics:
    """Tensor metrics plus ``kl`` (KL(ref||test), mean over positions), ``top1`` (share of
    positions whose argmax agrees) and the next-token loss of each side and their difference.

    Both logits must already be sliced to the HF vocabulary: padded MCore rows never enter a
    softmax here.
    """
    out = tensor_metrics(ref, test)
    lr = F.log_softmax(ref.to(torch.float64), dim=-1)
    lt = F.log_softmax(test.to(torch.float64), dim=-1)
    out["kl"] = float((lr.exp() * (lr - lt)).sum(-1).mean())
    out["top1"] = float((ref.argmax(-1) == test.argmax(-1)).to(torch.float64).mean())
    out["loss_ref"] = next_token_loss(ref, tokens)
    out["loss_test"] = next_token_loss(test, tokens)
    out["loss_delta"] = out["loss_test"] - out["loss_ref"]
    return out
