"""What every ablation implementation gets, and the one patching primitive they all use.

Implementations swap behaviour by setting attributes -- an instance's ``forward``, a module-level
function that a library looks up by name at call time, a config flag -- and *only* inside
:func:`patched`, which restores the previous state on exit (also when the forward raised).
Instance ``forward`` overrides read the module's weights at call time, so they compose with the
layer-streaming of :mod:`ckptbridge.align.layerwise`, which materialises weights just in time.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

_MISSING = object()


@dataclass
class HFRope:
    """HF's rotary parameters, taken from the loaded HF model so that a worker process can
    reproduce HF's RoPE inside MCore without loading HF itself."""

    inv_freq: torch.Tensor  # float32, CPU
    attention_scaling: float


@dataclass
class VariantContext:
    """Run facts an implementation may need.  Picklable (it travels to TP/PP workers)."""

    dtype: torch.dtype
    device: str = "cpu"
    te: bool = False  # TransformerEngine importable *and* a CUDA device present
    hf_modeling: str = "transformers.models.llama.modeling_llama"  # module of the HF family
    hf_norm_class: str = "LlamaRMSNorm"
    hf_mlp_class: str = "LlamaMLP"
    hf_rope: HFRope | None = None
    mcore_args: dict[str, Any] = field(default_factory=dict)

    def hf_symbol(self, name: str) -> Any:
        """A class or function of the HF modeling module of this family (real HF code)."""
        return getattr(importlib.import_module(self.hf_modeling), name)


@contextmanager
def patched(obj: Any, attr: str, value: Any) -> Iterator[None]:
    """Set ``obj.attr = value`` for the duration of the block, then restore it exactly.

    An attribute that only existed on the class (e.g. ``forward`` of an ``nn.Module`` instance)
    is deleted again rather than set, so the instance goes back to the class's method.
    """
    own = vars(obj) if hasattr(obj, "__dict__") else {}
    previous = own.get(attr, _MISSING) if not isinstance(obj, type) else getattr(obj, attr, _MISSING)
    if previous is _MISSING and not hasattr(obj, attr):
        raise AttributeError(f"{type(obj).__name__} has no attribute {attr!r} to patch")
    setattr(obj, attr, value)
    try:
        yield
    finally:
        if previous is _MISSING:
            delattr(obj, attr)
        else:
            setattr(obj, attr, previous)


def modules_named(root: torch.nn.Module | list[torch.nn.Module], class_suffix: str) -> list[torch.nn.Module]:
    """All submodules whose class name ends with ``class_suffix`` (e.g. ``RMSNorm``)."""
    roots = root if isinstance(root, list) else [root]
    return [m for r in roots for m in r.modules() if type(m).__name__.endswith(class_suffix)]
