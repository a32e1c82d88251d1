"""Tensors carried through a conversion unchanged: those a mapping's ``carry:`` patterns name (a VLM's
vision tower and projector), which megatron-core's GPTModel has no place for.

Strictness holds: every source tensor is a mapped weight, a verifiably redundant ``ignore``d one, or
carried. Carried tensors keep their HF names, dtypes, shapes and bytes (``--dtype`` does not cast them:
they are not the model ckptbridge converts). In an MCore checkpoint they live in one safetensors file in
the iteration folder, `CARRIED_FILE`, written with the same held-file and kernel-copy machinery as every
other output file; megatron-core's ``dist_checkpointing`` and Megatron-LM's legacy loader read only the
files their metadata names, so the GPTModel load is unaffected. An MCore checkpoint of such a family that
has no such file (trained by Megatron-LM from scratch) lacks them: exporting it to HF is refused, naming
what is absent, unless ``--hf-config`` names the original HF folder, whose carried tensors are then taken.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FormatError, PlanError
from ..fastcopy import Run, Spans
from ..mapping.ignore import carried_name
from .safetensors_io import Entry, SafetensorsFile, SafetensorsWriter

#: the carried tensors' file inside an MCore checkpoint's iteration folder
CARRIED_FILE = "ckptbridge_carried.safetensors"
_METADATA = {"format": "pt", "ckptbridge": "carried tensors (not in megatron-core's GPTModel)"}


@dataclass(frozen=True)
class Carried:
    """The carried tensors of one source: name -> the held file and entry holding its bytes."""

    tensors: Mapping[str, tuple[SafetensorsFile, Entry]]
    origin: str  # where they were found, for messages

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for _, e in self.tensors.values())

    def entries(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(name, dtype, shape) in name order: the layout every writer uses."""
        return [(n, self.tensors[n][1].dtype, self.tensors[n][1].shape) for n in sorted(self.tensors)]

    def describe(self) -> str:
        return f"{len(self.tensors)} tensors, {self.nbytes / 2**20:.1f} MiB (not in GPTModel: carried unchanged)"

    def write_into(self, writer: SafetensorsWriter, kernel_copy: bool) -> None:
        """Copy every carried tensor's bytes, in `entries` order, into ``writer`` (declared with them)."""
        for name, _, _ in self.entries():
            f, e = self.tensors[name]
            writer.write_spans(name, Spans((Run(f.file.fd, e.start, e.nbytes),), e.dtype, e.shape), kernel_copy)

    def write_file(self, path: Path, kernel_copy: bool = True) -> None:
        with SafetensorsWriter(path, self.entries(), dict(_METADATA)) as writer:
            self.write_into(writer, kernel_copy)


def from_hf_files(files: Mapping[str, SafetensorsFile], where: Mapping[str, str], names: Iterable[str],
                  origin: str) -> Carried:
    """The carried tensors ``names`` of an HF folder (its held files and weight map)."""
    return Carried({n: (files[where[n]], files[where[n]].entries[n]) for n in names}, origin)


def open_sidecar(iter_dir: Path, patterns: tuple[str, ...]) -> tuple[Carried | None, SafetensorsFile | None]:
    """The carried tensors of an MCore iteration folder and the file held for them; ``(None, None)`` when
    the folder has no `CARRIED_FILE`. Every tensor in it must be one the mapping's ``carry`` names."""
    path = Path(iter_dir) / CARRIED_FILE
    if not path.exists():
        return None, None
    f = SafetensorsFile(path)
    stray = sorted(n for n in f.entries if not carried_name(n, patterns))
    if stray:
        f.close()
        raise FormatError(f"{path}: holds {stray[0]!r}, which the mapping's carry patterns {list(patterns)} do not name")
    return Carried({n: (f, e) for n, e in f.entries.items()}, str(path)), f


def carried_from_hf_folder(folder: Path, patterns: tuple[str, ...]) -> tuple[Carried, list[SafetensorsFile]]:
    """The carried tensors of the original HF folder (``--hf-config DIR`` on an MCore source without them):
    every tensor its files hold that the patterns name; at least one, else the folder cannot supply them."""
    from .hf import HFSource  # HFSource's strict index reading; its own model is not checked here

    source = HFSource(folder)
    names = sorted(n for n in source.where if carried_name(n, patterns))
    if not names:
        source.close()
        raise PlanError(f"{folder}: holds no tensor the carry patterns {list(patterns)} name; "
                        "it cannot supply the tensors this checkpoint lacks")
    used = {source.where[n] for n in names}
    for fname, f in source.files.items():
        if fname not in used:
            f.close()
    return from_hf_files(source.files, source.where, names, str(folder)), [source.files[u] for u in sorted(used)]


def missing_message(src: Path, family: str, patterns: tuple[str, ...]) -> str:
    return (f"{src}: a {family} checkpoint without its carried tensors ({CARRIED_FILE}: {list(patterns)}, the vision "
            "tower megatron-core's GPTModel has no place for); it was not written by ckptbridge from an HF folder, so an "
            "HF export would lack them. Pass --hf-config ORIGINAL_HF_FOLDER to take them from there")


def resolve_carried(src: Path, source: object, to_hf: bool, hf_folder: Path | None
                    ) -> tuple[Carried | None, list[SafetensorsFile]]:
    """What a conversion of ``source`` carries, and the extra files held for it: the source's own carried
    tensors; for an MCore source without them, the ``--hf-config`` folder's (``hf_folder``); else none --
    refused when the output is HF, which would silently lack them."""
    spec = getattr(source, "spec")
    patterns = spec.mapping.carry
    own = getattr(source, "carried", None)
    if not patterns or own is not None:
        return own, []
    if hf_folder is not None:
        return carried_from_hf_folder(hf_folder, patterns)
    if to_hf:
        raise PlanError(missing_message(src, spec.mapping.family, patterns))
    return None, []
