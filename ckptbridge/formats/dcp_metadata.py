"""The ``.metadata`` index of a torch_dist checkpoint, without importing ``torch.distributed.checkpoint``.

That package takes about 1.5 s to import (it pulls in DTensor), a large share
of a conversion's wall time. The index is a pickle of a handful of small
dataclasses; these stand-ins read and write exactly the same pickle stream
(the real module and class names, the same state), and reading refuses any
class that is not one of them. ``tests/test_dcp_metadata.py`` checks both
directions against the real classes.
"""

from __future__ import annotations

import enum
import io
import pickle
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch

_DCP = "torch.distributed.checkpoint.metadata"
_FS = "torch.distributed.checkpoint.filesystem"


class MemFormatEncoding(enum.Enum):
    TORCH_CONTIGUOUS_FORMAT = 0
    TORCH_CHANNELS_LAST = 1
    TORCH_PRESERVE_FORMAT = 2


_MEM_FORMATS = {
    MemFormatEncoding.TORCH_CONTIGUOUS_FORMAT: torch.contiguous_format,
    MemFormatEncoding.TORCH_CHANNELS_LAST: torch.channels_last,
    MemFormatEncoding.TORCH_PRESERVE_FORMAT: torch.preserve_format,
}


@dataclass
class TensorProperties:
    dtype: torch.dtype = torch.float32
    layout: torch.layout = torch.strided
    requires_grad: bool = False
    memory_format: torch.memory_format = torch.contiguous_format
    pin_memory: bool = False

    def __getstate__(self) -> tuple[Any, ...]:  # torch's own encoding: memory_format cannot be pickled
        encoding = {v: k for k, v in _MEM_FORMATS.items()}[self.memory_format]
        return (self.dtype, self.layout, self.requires_grad, encoding, self.pin_memory)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.dtype, self.layout, self.requires_grad, encoding, self.pin_memory = state
        self.memory_format = _MEM_FORMATS[encoding]


@dataclass
class ChunkStorageMetadata:
    offsets: torch.Size
    sizes: torch.Size


@dataclass
class TensorStorageMetadata:
    properties: TensorProperties
    size: torch.Size
    chunks: list[ChunkStorageMetadata]


@dataclass
class BytesStorageMetadata:
    pass


@dataclass(frozen=True)
class MetadataIndex:
    fqn: str
    offset: torch.Size | None = None
    index: int | None = field(hash=False, compare=False, default=None)


@dataclass
class StorageMeta:
    checkpoint_id: Any = None
    save_id: str = ""
    load_id: str = ""
    modules: list[str] = field(default_factory=list)


@dataclass
class StorageInfo:
    relative_path: str
    offset: int
    length: int
    transform_descriptors: Any = None


@dataclass
class Metadata:
    state_dict_metadata: dict[str, TensorStorageMetadata | BytesStorageMetadata]
    planner_data: Any = None
    storage_data: Any = None
    storage_meta: StorageMeta | None = None
    version: str | None = None


_REAL_NAMES: dict[type, tuple[str, str]] = {
    MemFormatEncoding: (_DCP, "_MEM_FORMAT_ENCODING"),
    TensorProperties: (_DCP, "TensorProperties"),
    ChunkStorageMetadata: (_DCP, "ChunkStorageMetadata"),
    TensorStorageMetadata: (_DCP, "TensorStorageMetadata"),
    BytesStorageMetadata: (_DCP, "BytesStorageMetadata"),
    MetadataIndex: (_DCP, "MetadataIndex"),
    StorageMeta: (_DCP, "StorageMeta"),
    Metadata: (_DCP, "Metadata"),
    StorageInfo: (_FS, "_StorageInfo"),
}
_STAND_INS = {v: k for k, v in _REAL_NAMES.items()}
_ALLOWED = {("collections", "OrderedDict"), ("torch.serialization", "_get_layout"), ("torch", "Size")}


class _Writer(pickle._Pickler):  # the pure-Python pickler lets one class be written under another name
    def save_global(self, obj: Any, name: str | None = None) -> None:
        real = _REAL_NAMES.get(obj)
        if real is None:
            return super().save_global(obj, name)
        self.save(real[0])
        self.save(real[1])
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[type] = save_global
    dispatch[enum.EnumType] = save_global


class Opaque:
    """Any other ``torch.distributed.checkpoint`` object in the index (e.g. the ``all_local_plans``
    torch 2.13 adds): kept as inert data, since conversion never needs it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _Reader(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _STAND_INS:
            return _STAND_INS[(module, name)]
        if module.startswith("torch.distributed.checkpoint."):
            return type(name, (Opaque,), {"__module__": __name__})
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


def dump(metadata: Metadata, f: BinaryIO) -> None:
    _Writer(f, protocol=4).dump(metadata)


def dumps(metadata: Metadata) -> bytes:
    buf = io.BytesIO()
    dump(metadata, buf)
    return buf.getvalue()


def load(f: BinaryIO) -> Any:
    return _Reader(f).load()
