"""The exact set of non-tensor types a Megatron checkpoint's pickles may hold, for ``weights_only`` loads.

Megatron-LM's ``args`` is an ``argparse.Namespace`` that holds megatron enums (``ModelType``,
``AttnBackend``...), ``signal.Signals`` and torch dtypes; legacy ``model_optim_rng.pt`` files hold
numpy RNG states. megatron-core registers its own list (``megatron.core.safe_globals``) on import,
but a conversion should not pay for importing megatron-core (seconds, and a flood of warnings),
so the megatron types are stood in for by small value classes registered under megatron's
qualified names: unpickling never runs megatron code, and only these names are accepted.
When megatron-core is already imported in this process, its real classes are used instead.

Writing is the mirror image (:func:`save_with_megatron_names`): a stand-in enum member is pickled as
megatron's own class and value (``GLOBAL megatron.core.enums ModelType`` + ``(1,)``), exactly the
bytes pickling the real member gives, so ckptbridge writes Megatron-LM's ``args`` without megatron-core
installed and megatron-core's own ``weights_only`` load (its ``SAFE_GLOBALS``) reads real enums back.
"""

from __future__ import annotations

import argparse
import io
import pathlib
import pickle
import signal
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any, ClassVar

import numpy as np
import torch

#: megatron enums that Megatron-LM 0.16 pickles into ``args`` / state (module, class)
MEGATRON_ENUMS = (
    ("megatron.core.enums", "ModelType"),
    ("megatron.core.transformer.enums", "AttnBackend"),
    ("megatron.core.transformer.enums", "CudaGraphScope"),
    ("megatron.core.rerun_state_machine", "RerunDiagnostic"),
    ("megatron.core.rerun_state_machine", "RerunMode"),
    ("megatron.core.rerun_state_machine", "RerunState"),
)
#: megatron dataclasses that may be pickled whole (rebuilt as attribute bags)
MEGATRON_OBJECTS = (("megatron.core.optimizer.optimizer_config", "OptimizerConfig"),)


class ForeignEnum:
    """A megatron enum member read without megatron: its class's qualified name and its value.

    Compares equal to another member of the same class and value, and to the real enum member
    (by name of class and value) so code may compare args from either source."""

    qualname: ClassVar[str] = ""

    def __init__(self, value: Any, name: str | None = None):
        self.value = value
        self.name = name  # known when ckptbridge built the member (writing); a read member has its value only

    def __repr__(self) -> str:
        if self.name is None:
            return f"<{self.qualname}: {self.value!r}>"
        return f"<{self.qualname.rpartition('.')[2]}.{self.name}: {self.value!r}>"  # as the real enum prints

    def __reduce__(self) -> tuple[type, tuple[Any]]:
        return type(self), (self.value,)  # what Enum.__reduce_ex__ gives: the class, called with the value

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ForeignEnum):
            return (self.qualname, self.value) == (other.qualname, other.value)
        cls = type(other)
        return f"{cls.__module__}.{cls.__qualname__}" == self.qualname and getattr(other, "value", None) == self.value

    def __hash__(self) -> int:
        return hash((self.qualname, self.value))


class ForeignObject(types.SimpleNamespace):
    """A pickled megatron dataclass read without megatron: its fields as attributes."""

    qualname: ClassVar[str] = ""


def _stand_in(base: type, module: str, name: str) -> type:
    return type(name, (base,), {"qualname": f"{module}.{name}", "__module__": __name__})


_STAND_INS = {f"{m}.{n}": _stand_in(ForeignEnum, m, n) for m, n in MEGATRON_ENUMS}
_STAND_INS.update({f"{m}.{n}": _stand_in(ForeignObject, m, n) for m, n in MEGATRON_OBJECTS})


def stand_in(qualified: str) -> type[ForeignEnum]:
    """The stand-in class of the megatron enum ``qualified`` (``module.Class``)."""
    cls = _STAND_INS.get(qualified)
    if cls is None or not issubclass(cls, ForeignEnum):
        raise KeyError(f"{qualified} is not a megatron enum ckptbridge knows (safe_globals.MEGATRON_ENUMS)")
    return cls


class _MegatronNamesPickler(pickle._Pickler):  # the pure-Python pickler: its save_global can be overridden
    """Pickles a stand-in class under the megatron name it stands for. The C pickler imports a class's
    module to check the name, which would need megatron-core; the bytes written are the same."""

    def save_global(self, obj: Any, name: str | None = None) -> None:
        qualified = getattr(obj, "qualname", "") if isinstance(obj, type) and issubclass(obj, ForeignEnum) else ""
        if not qualified:
            super().save_global(obj, name)
            return
        module, _, cls = qualified.rpartition(".")
        self.write(pickle.GLOBAL + f"{module}\n{cls}\n".encode("utf-8"))
        self.memoize(obj)


#: what ``torch.save(pickle_module=...)`` needs of a pickle module
_MEGATRON_NAMES_PICKLE = types.SimpleNamespace(__name__="ckptbridge_megatron_names", Pickler=_MegatronNamesPickler)


def save_with_megatron_names(obj: Any, f: str | pathlib.Path | IO[bytes]) -> None:
    """``torch.save`` that writes stand-in enum members as megatron's enums (see the module doc).
    Used for the small pickles that hold ``args`` (``common.pt``, legacy rank files' structure)."""
    torch.save(obj, f, pickle_module=_MEGATRON_NAMES_PICKLE)


def _numpy_types() -> list[Any]:
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    dtypes = [getattr(np.dtypes, n) for n in ("UInt32DType", "Int64DType", "Float64DType", "Float32DType")
              if hasattr(np, "dtypes") and hasattr(np.dtypes, n)]
    return [(core.multiarray._reconstruct, f"{core.__name__}.multiarray._reconstruct"), np.ndarray, np.dtype, *dtypes]


def allowed() -> list[Any]:
    """Everything a Megatron checkpoint's pickles may name, besides what torch allows itself."""
    out: list[Any] = [argparse.Namespace, types.SimpleNamespace, signal.Signals, io.BytesIO, pathlib.PosixPath,
                      *_numpy_types()]
    for qualified, stand_in in _STAND_INS.items():
        module, _, name = qualified.rpartition(".")
        real = getattr(sys.modules.get(module), name, None)
        out.append(real if real is not None else (stand_in, qualified))
    return out


@contextmanager
def megatron_globals() -> Iterator[None]:
    """Allow `allowed` for the ``weights_only`` loads inside the block. Only what is not allowed already
    is added, and only that is taken away after: torch's own ``safe_globals`` context removes every
    global it was given, also those megatron-core registered for itself on import."""
    present = set(torch.serialization.get_safe_globals())
    added = [g for g in allowed() if g not in present]
    torch.serialization.add_safe_globals(added)
    try:
        yield
    finally:
        remaining = [g for g in torch.serialization.get_safe_globals() if g not in added]
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(remaining)
