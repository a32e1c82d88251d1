"""HuggingFace folders: sharded safetensors + index, ``config.json`` and assets.

Reading is strict: the index must agree with the files, every tensor must be
one the mapping names, and shapes must match the config. Writing streams one
canonical tensor at a time into files whose headers are laid out in advance.
"""

from __future__ import annotations

import math
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FormatError, PlanError
from ..hf_config import config_dtype, read_config, with_dtype
from ..spec import ModelSpec, PlannedTensor
from ..transforms import TRANSFORMS, Pipeline, Shape
from .safetensors_io import SafetensorsFile, SafetensorsWriter

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf")
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3


def asset_files(folder: Path) -> list[Path]:
    """Files that travel with the model but are not weights (tokenizer, generation config...). A symlink
    must stay inside the folder, or point into the HF cache's ``blobs/`` of the same repository (the hub
    cache's layout): anything else could copy a file from elsewhere on the machine into the output."""
    out = [
        p for p in sorted(Path(folder).iterdir())
        if p.is_file() and p.name not in ("config.json", INDEX) and not p.name.endswith(WEIGHT_SUFFIXES)
        and not p.name.endswith(".index.json")
    ]
    for p in out:
        if p.is_symlink() and not inside_checkpoint(p, Path(folder)):
            raise FormatError(f"{p}: a symlink to {p.resolve()}, outside the checkpoint folder; refusing to copy it")
    return out


def inside_checkpoint(path: Path, folder: Path) -> bool:
    """Whether ``path`` resolves inside ``folder`` or, for an HF-cache snapshot, its repository's blobs."""
    target, root = path.resolve(), folder.resolve()
    allowed = [root]
    if folder.parent.name == "snapshots":
        allowed.append(folder.parent.parent.resolve() / "blobs")
    return any(target == a or a in target.parents for a in allowed)


class HFSource:
    """Canonical tensors computed from an HF folder."""

    format = "hf"

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FormatError(f"{self.folder}: not a folder")
        self.raw_config = read_config(self.folder)
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}  # tensor -> file name
        index_path = self.folder / INDEX
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise FormatError(f"{index_path}: corrupt index ({exc})") from None
            for name in sorted(set(weight_map.values())):
                if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                    raise FormatError(f"{index_path}: names {name!r}, which is not a file inside the checkpoint folder")
                self.files[name] = SafetensorsFile(self.folder / name)
            for tensor, fname in weight_map.items():
                if tensor not in self.files[fname].entries:
                    raise FormatError(f"{index_path}: says {tensor!r} is in {fname}, which does not hold it")
            for fname, f in self.files.items():
                for tensor in f.entries:
                    if weight_map.get(tensor) != fname:
                        raise FormatError(f"{self.folder / fname}: holds {tensor!r}, which the index does not list for this file")
            self.where = dict(weight_map)
        elif (self.folder / SINGLE).exists():
            self.files[SINGLE] = SafetensorsFile(self.folder / SINGLE)
            self.where = {t: SINGLE for t in self.files[SINGLE].entries}
        else:
            others = [p.name for p in self.folder.iterdir() if p.name.endswith((".bin", ".pt", ".pth"))]
            hint = f" (found {others}: convert them to safetensors first)" if others else ""
            raise FormatError(f"{self.folder}: no {SINGLE} or {INDEX}{hint}")
        # optional tensor groups (MTP blocks) that the folder lacks entirely are not part of the model
        self.spec = ModelSpec.from_hf_config(self.raw_config).for_source(set(self.where))
        dtypes = {e.dtype for f in self.files.values() for e in f.entries.values()}
        self.dtype = config_dtype(self.raw_config) if len(dtypes) != 1 else dtypes.pop()
        self.dtype = self.dtype or torch.float32
        self.layouts: dict[str, _Layout] = {}  # planned MCore name -> the HF layout this folder holds

    def _layout(self, pt: PlannedTensor) -> "_Layout":
        """The rule's own HF layout, or the first of its ``alternatives`` whose tensors this folder holds
        (all of them, and none of the rule's own: a half-converted folder is reported, not guessed)."""
        own = _Layout(pt.hf_names, pt.hf_shapes, pt.rule.transform, False)
        if any(n in self.where for n in pt.hf_names):
            return own
        for alt in pt.rule.alternatives:
            names = tuple(alt.hf_names(pt.hf_layer, pt.expert, pt.mtp))
            if all(n in self.where for n in names):
                return _Layout(names, tuple(alt.hf_shapes(pt.rule, self.spec.args)), alt.transform, alt.shared)
        return own

    def verify(self) -> None:
        expected: dict[str, tuple[int, ...]] = {}
        self.layouts = {pt.mcore: self._layout(pt) for pt in self.spec.planned()}
        for pt in self.spec.planned():
            layout = self.layouts[pt.mcore]
            expected.update(zip(layout.names, layout.shapes))
            for name in pt.hf_copies:
                expected[name] = pt.hf_shapes[0]
        for tensor, fname in sorted(self.where.items()):
            entry = self.files[fname].entries[tensor]
            if tensor not in expected:
                raise PlanError(f"unmapped source tensor {tensor!r} in {self.folder / fname} (no rule of mapping '{self.spec.mapping.family}' names it)")
            if entry.shape != expected[tensor]:
                raise PlanError(
                    f"tensor {tensor!r} in {self.folder / fname} has shape {list(entry.shape)}, the config implies {list(expected[tensor])}"
                )
        missing = sorted(set(expected) - set(self.where))
        if missing:
            raise PlanError(f"missing tensor {missing[0]!r}: not in any file of {self.folder} ({len(missing)} missing in all)")

    def read(self, pt: PlannedTensor) -> torch.Tensor:
        layout = self.layouts.get(pt.mcore) or self._layout(pt)
        if layout.shared:  # one tensor holds every expert: read only slot E, then the steps after take_expert
            name = layout.names[0]
            slot = self.files[self.where[name]].read(name, pt.expert)
            return Pipeline(layout.transform.steps[1:] or (TRANSFORMS["identity"],)).to_mcore([slot], self.spec.args)
        tensors = [self.files[self.where[n]].read(n) for n in layout.names]
        for copy in pt.hf_copies:  # MCore keeps one tensor: a copy that differs cannot be represented
            if not _same_bits(self.files[self.where[copy]].read(copy), tensors[0]):
                raise PlanError(f"{copy!r} in {self.folder / self.where[copy]} is not an exact copy of {layout.names[0]!r}; "
                                f"MCore shares one {pt.mcore} between the model and its MTP blocks")
        return layout.transform.to_mcore(tensors, self.spec.args)

    def assets(self) -> list[Path]:
        return asset_files(self.folder)

    def check_unchanged(self) -> None:
        for f in self.files.values():
            f.check_unchanged()

    def close(self) -> None:
        for f in self.files.values():
            f.close()


@dataclass(frozen=True)
class _Layout:
    names: tuple[str, ...]
    shapes: tuple[Shape, ...]
    transform: Pipeline
    shared: bool  # one tensor for every expert (its steps start with take_expert)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def write_hf(
    spec: ModelSpec,
    read: Callable[[PlannedTensor], torch.Tensor],
    out: Path,
    dtype: torch.dtype,
    assets: list[Path],
    progress: Callable[[int], None],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Write safetensors shards (+ index), config.json and the assets."""
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for pt in spec.planned():
        nbytes = (sum(math.prod(s) for s in pt.hf_shapes) + len(pt.hf_copies) * math.prod(pt.hf_shapes[0])) * pt.dtype(dtype).itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(pt)
        size += nbytes
    names = [SINGLE] if len(groups) == 1 else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map: dict[str, str] = {}
    total = 0
    for fname, group in zip(names, groups):
        entries = [(n, pt.dtype(dtype), s) for pt in group
                   for n, s in [*zip(pt.hf_names, pt.hf_shapes), *((c, pt.hf_shapes[0]) for c in pt.hf_copies)]]
        writer = SafetensorsWriter(out / fname, entries, {"format": "pt"})
        for pt in group:
            canonical = read(pt)
            hf = pt.rule.transform.to_hf(canonical, spec.args, pt.hf_shapes)
            for name, tensor in [*zip(pt.hf_names, hf), *((c, hf[0]) for c in pt.hf_copies)]:
                writer.write(name, tensor)
                weight_map[name] = fname
                total += tensor.numel() * tensor.element_size()
            progress(canonical.numel() * canonical.element_size())
        writer.close()
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    config = spec.hf_config if config_dtype(spec.hf_config) in (None, dtype) else with_dtype(spec.hf_config, dtype)
    if config_dtype(config) is None:
        config = with_dtype(config, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for asset in assets:
        shutil.copy2(asset, out / asset.name)

