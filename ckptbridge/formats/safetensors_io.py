"""A strict, streaming reader and writer for the safetensors format.

Reads use ``pread`` into fresh buffers instead of mmap, so pages of tensors we
are done with never count towards our resident memory; writes lay out the
header from the plan first and then append tensors one at a time, so a file
never has to be held in memory whole.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FormatError
from ..fastcopy import Spans, write_spans
from ..fileio import CheckedFile, check_size
from .held_file import HeldFile

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    nbytes: int


def read_into(fd: int, offset: int, nbytes: int, what: str) -> torch.Tensor:
    """Read exactly ``nbytes`` at ``offset`` into a new uint8 tensor."""
    out = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(out.numpy()).cast("B")
    done = 0
    while done < nbytes:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise FormatError(f"{what}: file ended after {done} of {nbytes} bytes (truncated?)")
        done += n
    return out


class SafetensorsFile:
    """One ``.safetensors`` file, held open (`HeldFile`), its header checked as strictly as the reference
    library checks it: a JSON object of entries whose byte ranges are in bounds, match their shape and
    dtype, and tile the data section exactly (no gap, no overlap, nothing after)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = HeldFile(self.path)
        size = self.file.size
        head = os.pread(self.file.fd, 8, 0)
        if len(head) < 8:
            self.file.close()
            raise FormatError(f"{self.path}: too short to be a safetensors file ({size} bytes)")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > _MAX_HEADER or 8 + hlen > size:
            self.file.close()
            raise FormatError(f"{self.path}: header length {hlen} does not fit a {size}-byte file (truncated or not safetensors)")
        try:
            header = json.loads(read_into(self.file.fd, 8, hlen, str(self.path)).numpy().tobytes())
            self.entries, self.metadata = _entries(header, self.path, 8 + hlen, size)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self.file.close()
            raise FormatError(f"{self.path}: corrupt safetensors header ({exc})") from None
        except FormatError:
            self.file.close()
            raise

    def read(self, name: str, index: int | None = None) -> torch.Tensor:
        """The whole tensor, or only ``tensor[index]`` (a contiguous run of bytes: one expert of a fused tensor)."""
        entry = self.entries[name]
        start, nbytes, shape = entry.start, entry.nbytes, entry.shape
        if index is not None:
            nbytes //= shape[0]
            start += index * nbytes
            shape = shape[1:]
        raw = read_into(self.file.fd, start, nbytes, f"{self.path}: {name}")
        return raw.view(entry.dtype).reshape(shape)

    def check_unchanged(self) -> None:
        self.file.check_unchanged()

    def close(self) -> None:
        self.file.close()


def _entries(header: object, path: Path, base: int, size: int) -> tuple[dict[str, Entry], dict[str, str]]:
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    entries: dict[str, Entry] = {}
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{path}: corrupt header entry for tensor {name!r}") from None
        if begin < 0 or end < begin or any(d < 0 for d in shape):
            raise FormatError(f"{path}: tensor {name!r} has invalid offsets {[begin, end]} or shape {list(shape)}")
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize:
            raise FormatError(f"{path}: tensor {name!r} declares {end - begin} bytes for shape {list(shape)}")
        entries[name] = Entry(dtype, shape, base + begin, end - begin)
    covered = base
    for name, entry in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].nbytes)):
        if entry.start != covered:
            what = "overlaps the tensor before it" if entry.start < covered else "leaves a gap before it"
            raise FormatError(f"{path}: tensor {name!r} at byte {entry.start - base} {what} (offsets must tile the data)")
        covered += entry.nbytes
    if covered > size:
        raise FormatError(f"{path}: truncated: tensors need {covered} bytes, file has {size}")
    if covered < size:
        raise FormatError(f"{path}: {size - covered} bytes after the last tensor (not a safetensors file as written)")
    return entries, metadata


@dataclass(frozen=True)
class Layout:
    """A safetensors file laid out from its tensor list alone: the header bytes (length prefix included),
    where each tensor's bytes start, and the finished file's size."""

    header: bytes
    offsets: tuple[int, ...]  # absolute, one per entry, in entry order
    size: int


def lay_out(entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> Layout:
    """The layout the writer gives these entries (in order): shapes decide every byte's place, so a
    write plan knows each tensor's offset before any file is opened."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    starts = []
    for name, dtype, shape in entries:
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        starts.append(offset)
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
    base = 8 + len(blob)
    return Layout(struct.pack("<Q", len(blob)) + blob, tuple(base + o for o in starts), base + offset)


class SafetensorsWriter:
    """Writes a safetensors file whose tensor list is known before any data is (see `lay_out`)."""

    def __init__(self, path: Path, entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
        self.path = Path(path)
        self._order: list[tuple[str, torch.dtype, tuple[int, ...]]] = list(entries)
        self.layout = lay_out(self._order, metadata)
        self.size = self.layout.size  # what the finished file must hold
        self._file = CheckedFile(self.path)
        try:
            self._file.write(self.layout.header)
        except BaseException:
            self._file.close()
            raise
        self._next = 0

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, dtype, shape = self._order[self._next]
        if name != expected_name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise AssertionError(f"writer expected {expected_name} {dtype} {shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        self._file.write(memoryview(tensor.contiguous().view(torch.uint8).numpy()))
        self._next += 1

    def write_spans(self, name: str, spans: Spans, kernel_copy: bool = True) -> None:
        """`write` for a tensor given as runs of source bytes (copied inside the kernel when ``kernel_copy``)."""
        expected_name, dtype, shape = self._order[self._next]
        if name != expected_name or spans.dtype != dtype or tuple(spans.shape) != shape:
            raise AssertionError(f"writer expected {expected_name} {dtype} {shape}, got {name} {spans.dtype} {tuple(spans.shape)}")
        at = self._file.tell()
        self._file.seek(at + write_spans(spans, self._file.fd, at, self.path, kernel_copy))
        self._next += 1

    def close(self) -> None:
        """Close the file; it must hold every planned tensor and exactly the planned number of bytes."""
        self._file.close()
        if self._next != len(self._order):
            raise AssertionError(f"{self.path}: closed after {self._next} of {len(self._order)} tensors")
        check_size(self.path, self.size)
