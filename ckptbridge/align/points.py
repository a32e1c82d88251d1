"""Names of the points where HF and MCore activations are compared.

Every point is a tensor laid out ``[batch, seq, ...]`` on both sides (MCore's ``[seq, batch, ...]``
is transposed at capture time), so metrics never need to know which model produced it.
"""

from __future__ import annotations

import re

#: Per-layer points, in forward order.  ``attn_out``/``mlp_out`` are the block outputs *before*
#: the residual add; ``output`` is the layer output (after both residual adds).
LAYER_POINTS: tuple[str, ...] = ("attn_norm", "attn_out", "mlp_norm", "mlp_out", "output")

EMBEDDING = "embedding"
FINAL_NORM = "final_norm"
LOGITS = "logits"

#: Inputs recorded from HF and injected into MCore in isolated mode.
FINAL_NORM_INPUT = "final_norm.input"

_LAYER_RE = re.compile(r"^layer(\d+)\.(\w+)$")


def layer_point(layer: int, kind: str) -> str:
    """``layer3.mlp_out``."""
    return f"layer{layer}.{kind}"


def layer_input(layer: int) -> str:
    """Name of the hidden state entering decoder layer ``layer`` (used for isolated mode)."""
    return f"layer{layer}.input"


def point_order(num_layers: int) -> list[str]:
    """All comparison points of a ``num_layers`` model in forward order."""
    out = [EMBEDDING]
    for i in range(num_layers):
        out += [layer_point(i, k) for k in LAYER_POINTS]
    return out + [FINAL_NORM, LOGITS]


def split_point(name: str) -> tuple[int | None, str]:
    """``"layer3.mlp_out"`` -> ``(3, "mlp_out")``; ``"logits"`` -> ``(None, "logits")``."""
    m = _LAYER_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)
