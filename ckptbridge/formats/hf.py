"""HuggingFace folders: sharded safetensors + index, ``config.json`` and assets.

Reading is strict: the index must agree with the files, every tensor must be
one the mapping names, and shapes must match the config. Writing streams one
canonical tensor at a time into files whose headers are laid out in advance.
"""

from __future__ import annotations

import math
import json
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import torch

from ..errors import FormatError, MappingError, PlanError
from ..fastcopy import Run, Spans, compose, hf_spans, row_moving, unit_runs
from ..fileio import copy_file, write_text
from ..hf_config import config_dtype, read_config, with_dtype
from ..spec import ModelSpec, PlannedTensor
from ..write_plan import Region, Step, WriteJob, WritePlan, file_plan
from .fp8_block import BlockFP8, check_pair, dequantize, export_layout, parse_quantization, quantize, quantized_names, scale_name
from .fp8_block import E4M3, SCALE_SUFFIX
from .hf_ignored import planned_ignores, verify_ignored
from .carried import Carried, from_hf_files
from ..mapping.ignore import carried_name
from ..transform_op import Shape
from ..transforms import TRANSFORMS, Pipeline
from .safetensors_io import SafetensorsFile, SafetensorsWriter, lay_out

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf")
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3
METADATA = {"format": "pt"}  # every shard's __metadata__, as transformers writes it


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
        self.fp8: BlockFP8 | None = parse_quantization(self.raw_config, str(self.folder / "config.json"))
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
        # the conversion's planned tensors, computed once: verification, the write plan and the readers use them
        self.planned: tuple[PlannedTensor, ...] = tuple(self.spec.planned())
        dtypes = {e.dtype for f in self.files.values() for e in f.entries.values()}
        self.dtype = config_dtype(self.raw_config) if len(dtypes) != 1 else dtypes.pop()
        self.dtype = self.dtype or torch.float32
        if self.fp8 is not None:  # dequantized weights: the config's dtype (that of the unquantized tensors)
            self.dtype = config_dtype(self.raw_config) or torch.bfloat16
        # planned MCore name -> the HF entries this folder holds for it (what `read` and `spans` read)
        self.layouts: dict[str, _Layout] = {pt.mcore_name: self._layout(pt) for pt in self.planned}
        self.scaled: set[str] = set()  # FP8 weights stored with a block-scale tensor, dequantized when read
        self.notes: tuple[str, ...] = ()
        self.carried: Carried | None = None  # what the mapping's carry names (set by verify; None: no carry)

    def _layout(self, pt: PlannedTensor) -> "_Layout":
        """The rule's own HF layout, or the first of its ``alternatives`` whose tensors this folder holds
        (all of them, and none of the rule's own: a half-converted folder is reported, not guessed)."""
        own = _Layout(pt.hf_names, pt.hf_shapes, pt.rule.transform, pt.rule.shared)
        if any(n in self.where for n in pt.hf_names):
            return own
        for alt in pt.rule.alternatives:
            names = tuple(alt.hf_names(pt.hf_layer, pt.expert, pt.mtp))
            if all(n in self.where for n in names):
                return _Layout(names, tuple(alt.hf_shapes(pt.rule, self.spec.args)), alt.transform, alt.shared)
        return own

    def verify(self) -> None:
        expected: dict[str, tuple[int, ...]] = {}
        for pt in self.planned:
            layout = self.layouts[pt.mcore_name]
            expected.update(zip(layout.names, layout.shapes))
            for name in pt.hf_copies:
                expected[name] = pt.hf_shapes[0]
        ignored = planned_ignores(self.spec, self.planned)
        self.scaled = self._check_scales(expected)
        carry = self.spec.mapping.carry
        carried = sorted(t for t in self.where if t not in expected and carried_name(t, carry))
        self.carried = from_hf_files(self.files, self.where, carried, str(self.folder)) if carry else None
        for tensor, fname in sorted(self.where.items()):
            entry = self.files[fname].entries[tensor]
            if tensor in ignored or (tensor.endswith(SCALE_SUFFIX) and tensor[: -len(SCALE_SUFFIX)] in self.scaled):
                continue
            if self.carried is not None and tensor in self.carried.tensors:
                continue
            if entry.dtype.is_floating_point and entry.dtype.itemsize == 1 and tensor not in self.scaled:
                raise PlanError(f"tensor {tensor!r} in {self.folder / fname} is {entry.dtype}, but " + (
                    f"has no {scale_name(tensor)!r}" if self.fp8 else
                    "config.json declares no quantization_config; refusing to read it as plain weights"))
            if tensor not in expected:
                raise PlanError(f"unmapped source tensor {tensor!r} in {self.folder / fname} (no rule of mapping '{self.spec.mapping.family}' names it)")
            if entry.shape != expected[tensor]:
                raise PlanError(
                    f"tensor {tensor!r} in {self.folder / fname} has shape {list(entry.shape)}, the config implies {list(expected[tensor])}"
                )
        missing = sorted(set(expected) - set(self.where))
        if missing:
            raise PlanError(f"missing tensor {missing[0]!r}: not in any file of {self.folder} ({len(missing)} missing in all)")
        for name in sorted(set(ignored) & set(self.where)):
            verify_ignored(name, *ignored[name], self.spec.args, self.files, self.where, self.folder)
        if self.fp8 is not None:
            self.notes = self._fp8_notes()

    def _check_scales(self, expected: dict[str, tuple[int, ...]]) -> set[str]:
        """The weights stored as FP8 with block scales; every scale tensor belongs to a mapped 2-D weight
        of the declared layout (a scale without a quantization_config is an unmapped tensor)."""
        if self.fp8 is None:
            return set()
        out: set[str] = set()
        for tensor in sorted(t for t in self.where if t.endswith(SCALE_SUFFIX)):
            weight = tensor[: -len(SCALE_SUFFIX)]
            if weight not in expected or weight not in self.where:
                raise PlanError(f"unmapped source tensor {tensor!r} in {self.folder / self.where[tensor]} "
                                f"(no mapped weight {weight!r} for these FP8 scales)")
            w, sc = self.files[self.where[weight]].entries[weight], self.files[self.where[tensor]].entries[tensor]
            check_pair(weight, w.dtype, w.shape, sc.dtype, sc.shape, self.fp8, str(self.folder / self.where[tensor]))
            out.add(weight)
        return out

    def _fp8_notes(self) -> tuple[str, ...]:
        """What an ``--hf-dtype fp8-block`` export of this model would quantize differently from this folder."""
        assert self.fp8 is not None
        source = set(self.scaled)
        policy = set(quantized_names(self.spec, self.fp8, self.planned))
        out = [f"FP8 block-scaled source (block {list(self.fp8.block)}): {len(self.scaled)} weights dequantized"]
        if source != policy:
            extra, kept = sorted(policy - source), sorted(source - policy)
            out.append("an --hf-dtype fp8-block export would quantize a different set than this folder: "
                       + (f"also {extra[0]!r} ({len(extra)} in all)" if extra else "")
                       + ("; " if extra and kept else "") + (f"not {kept[0]!r} ({len(kept)} in all)" if kept else ""))
        return tuple(out)

    def read(self, pt: PlannedTensor) -> torch.Tensor:
        layout = self.layouts.get(pt.mcore_name) or self._layout(pt)
        if layout.shared:  # one tensor holds every expert: read only slot E, then the steps after take_expert
            name = layout.names[0]
            slot = self.files[self.where[name]].read(name, pt.expert)
            return Pipeline(layout.transform.steps[1:] or (TRANSFORMS["identity"],)).to_mcore([slot], self.spec.args)
        tensors = [self._weight(n) for n in layout.names]
        for copy in pt.hf_copies:  # MCore keeps one tensor: a copy that differs cannot be represented
            if not _same_bits(self.files[self.where[copy]].read(copy), tensors[0]):
                raise PlanError(f"{copy!r} in {self.folder / self.where[copy]} is not an exact copy of {layout.names[0]!r}; "
                                f"MCore shares one {pt.mcore_name} between the model and its MTP blocks")
        try:
            return layout.transform.to_mcore(tensors, self.spec.args)
        except MappingError as exc:  # a value-changing step (offset) that would round this tensor
            raise PlanError(f"{layout.names[0]!r} in {self.folder}: {exc}") from None

    def spans(self, pt: PlannedTensor, dtype: torch.dtype) -> Spans | None:
        """The canonical tensor as runs of the held files' bytes, when it is only rows moved and already
        ``dtype``; None when it must go through memory (a cast, FP8, a value-changing step, checked copies)."""
        layout = self.layouts.get(pt.mcore_name) or self._layout(pt)
        if pt.hf_copies or any(n in self.scaled for n in layout.names):
            return None
        entries = [self.files[self.where[n]].entries[n] for n in layout.names]
        if any(e.dtype != dtype for e in entries):
            return None
        steps = layout.transform.steps
        inputs = [Spans((Run(self.files[self.where[n]].file.fd, e.start, e.nbytes),), e.dtype, e.shape)
                  for n, e in zip(layout.names, entries)]
        if layout.shared:  # slot E of the one tensor, then the steps after take_expert
            e, whole = entries[0], inputs[0]
            inputs = [Spans(whole.cut(pt.expert * whole.row_bytes, whole.row_bytes), e.dtype, e.shape[1:])]
            steps = steps[1:]
        if not row_moving(steps):
            return None
        args = self.spec.args
        found = unit_runs(lambda xs: [Pipeline(steps).to_mcore(xs, args)] if steps else xs, [s.shape for s in inputs])
        if found is None:
            return None
        (runs,), units = found
        return compose(inputs, runs, units[0], dtype, tuple(pt.shape))

    def _weight(self, name: str) -> torch.Tensor:
        """A stored tensor; an FP8 one dequantized to fp32 (e4m3 x its block's scale, one rounding)."""
        tensor = self.files[self.where[name]].read(name)
        if name not in self.scaled:
            return tensor
        assert self.fp8 is not None
        scale = scale_name(name)
        return dequantize(tensor, self.files[self.where[scale]].read(scale), self.fp8.block)

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


HFEntry = tuple[str, torch.dtype, tuple[int, ...]]


@dataclass(frozen=True)
class FP8Export:
    """An ``--hf-dtype fp8-block`` output's part of its write plan: the block layout and the HF
    tensors stored as e4m3 + scales (decided once, with the plan)."""

    fmt: BlockFP8
    quantized: frozenset[str]


def hf_plan(spec: ModelSpec, planned: Sequence[PlannedTensor], dtype: torch.dtype,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, fp8: FP8Export | None = None,
            carried: Carried | None = None) -> WritePlan:
    """The safetensors files an HF output has, in order, with each planned tensor's HF entries (name,
    dtype, shape; an FP8 weight brings its scale) as its step's ``where`` = (shard, entries): from shapes
    alone, so workers agree on it. ``fp8`` (`fp8_export`), the plan's ``detail``: the FP8 layout written. Carried
    tensors (a vision tower) fill one more file, the last (`carried_shard`), written when the output is finished."""
    quantized = fp8.quantized if fp8 is not None else frozenset()

    def layout(pt: PlannedTensor) -> list[HFEntry]:
        out: list[HFEntry] = []
        if pt.rule.shared and pt.expert:  # fused experts: the one tensor is declared with expert 0
            return out
        for name, shape in [*zip(pt.hf_names, pt.hf_shapes), *((c, pt.hf_shapes[0]) for c in pt.hf_copies)]:
            if name in quantized:
                assert fp8 is not None
                out += [(name, E4M3, shape), (scale_name(name), torch.float32, fp8.fmt.scale_shape(shape))]
            else:
                out.append((name, pt.dtype(dtype), shape))
        return out

    groups: list[list[tuple[PlannedTensor, list[HFEntry], int]]] = [[]]
    size = 0
    for pt in planned:
        entries = layout(pt)
        nbytes = sum(math.prod(shape) * dt.itemsize for _, dt, shape in entries)
        if groups[-1] and nbytes and size + nbytes > max_shard_bytes:  # a fused tensor's later experts: 0 bytes
            groups.append([])
            size = 0
        groups[-1].append((pt, entries, nbytes))
        size += nbytes
    names = shard_names(len(groups) + _has(carried))[:len(groups)]
    steps = []
    for name, group in zip(names, groups):  # each shard's header from its entries: every tensor's offset known now
        offsets = iter(lay_out([e for _, entries, _ in group for e in entries], METADATA).offsets)
        for pt, entries, nbytes in group:
            at = tuple(Region(name, next(offsets), math.prod(shape) * dt.itemsize) for _, dt, shape in entries)
            steps.append(Step(pt, (name, entries), ((name, nbytes),), at))
    return WritePlan("hf", spec, dtype, tuple(steps), file_plan(steps, names), detail=fp8, carried=carried)


def shard_names(count: int) -> list[str]:
    return [SINGLE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _has(carried: Carried | None) -> bool:
    return bool(carried is not None and carried.tensors)


def carried_shard(plan: WritePlan) -> str | None:
    """The file that holds the carried tensors after the plan's shards (None: nothing is carried)."""
    return shard_names(len(plan.files.sizes) + 1)[-1] if _has(plan.carried) else None


def _shards(steps: Sequence[Step]) -> list[tuple[str, list[Step]]]:
    """Consecutive steps grouped by their shard, in plan order."""
    return [(name, list(group)) for name, group in groupby(steps, key=lambda s: s.where[0])]


def write_hf_data(plan: WritePlan, job: WriteJob) -> None:
    """Write the safetensors shards of ``job.share``. With an FP8 layout in the plan (``--hf-dtype
    fp8-block``) the weights `fp8_block.quantized_names` picks are stored as e4m3 + fp32 block scales.
    A tied model's head is never written, as transformers' ``save_pretrained`` does not write it."""
    spec, export = plan.spec, plan.detail
    fp8, quantized = (export.fmt, export.quantized) if export is not None else (None, frozenset())
    for fname, group in _shards(plan.mine(job.share)):
        with SafetensorsWriter(job.folder / fname, [e for s in group for e in s.where[1]], METADATA) as writer:
            if writer.layout.offsets != tuple(r.offset for s in group for r in s.at):
                raise PlanError(f"{job.folder / fname}: laid out otherwise than its write plan")
            slots: list[torch.Tensor] = []  # a fused-experts tensor's slots so far (one layer of one rule)
            for step in group:
                pt = step.pt
                spans = job.fast(pt) if not pt.rule.shared else None  # fused experts: stacked below
                parts_of = hf_spans(pt, spans, spec.args) if spans is not None else None
                if spans is not None and parts_of is None:
                    raise PlanError(f"{pt.mcore_name}: planned as byte runs, but its HF tensors are not")
                if parts_of is not None:  # bytes that move unchanged: copied from the source files
                    for name, part in [*zip(pt.hf_names, parts_of), *((c, parts_of[0]) for c in pt.hf_copies)]:
                        writer.write_spans(name, part, job.kernel_copy)
                    job.progress(spans.nbytes)
                    continue
                canonical = job.read(pt)
                if pt.rule.shared:
                    slots.append(_expert_slot(pt, canonical, spec.args))
                    if len(slots) < pt.hf_shapes[0][0]:
                        job.progress(canonical.numel() * canonical.element_size())
                        continue
                    hf, slots = [torch.stack(slots)], []
                else:
                    try:
                        hf = pt.rule.transform.to_hf(canonical, spec.args, pt.hf_shapes)
                    except MappingError as exc:  # a value-changing step (offset) that would round it
                        raise PlanError(f"{pt.mcore_name} -> {pt.hf_names[0]!r}: {exc}") from None
                for name, tensor in [*zip(pt.hf_names, hf), *((c, hf[0]) for c in pt.hf_copies)]:
                    if name in quantized:
                        assert fp8 is not None
                        parts = zip((name, scale_name(name)), quantize(tensor, fp8.block))
                    else:
                        parts = [(name, tensor.to(pt.dtype(plan.dtype)))]  # read in fp32 when a sibling is quantized
                    for part, data in parts:
                        writer.write(part, data)
                job.progress(canonical.numel() * canonical.element_size())


def finish_hf(plan: WritePlan, out: Path, assets: list[Path], kernel_copy: bool = True) -> None:
    """Once every shard is written: the assets, the index (when sharded) and config.json, last. Without
    an FP8 layout, any quantization_config the model carried is dropped (the weights are not quantized)."""
    spec, dtype, fp8 = plan.spec, plan.dtype, plan.detail.fmt if plan.detail is not None else None
    for asset in assets:
        copy_file(asset, out / asset.name)
    extra = carried_shard(plan)
    if extra is not None:
        assert plan.carried is not None
        plan.carried.write_file(out / extra, kernel_copy)
    if len(plan.files.sizes) > 1 or extra is not None:
        weight_map = {name: s.where[0] for s in plan.steps for name, _, _ in s.where[1]}
        total = sum(plan.files.sizes.values())
        if extra is not None:
            assert plan.carried is not None
            weight_map.update({name: extra for name, _, _ in plan.carried.entries()})
            total += plan.carried.nbytes
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_text(out / INDEX, json.dumps(index, indent=2) + "\n")
    config = spec.hf_config if config_dtype(spec.hf_config) in (None, dtype) else with_dtype(spec.hf_config, dtype)
    if config_dtype(config) is None:
        config = with_dtype(config, dtype)
    config = {k: v for k, v in config.items() if k != "quantization_config" or v is None}  # null: as the source
    if fp8 is not None:
        config["quantization_config"] = fp8.config
    # config.json last: without it the folder is not an HF checkpoint, for transformers either
    write_text(out / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")


def _expert_slot(pt: PlannedTensor, canonical: torch.Tensor, args: dict) -> torch.Tensor:
    """Expert ``pt.expert``'s slot of a fused-experts HF tensor: the steps after ``take_expert``, undone.
    The planner lists a layer's experts of one rule consecutively, so the writer stacks them in order."""
    steps = pt.rule.transform.steps[1:] or (TRANSFORMS["identity"],)
    return Pipeline(steps).to_hf(canonical, args, [tuple(pt.hf_shapes[0][1:])])[0]


def fp8_export(spec: ModelSpec, planned: Sequence[PlannedTensor]) -> tuple[FP8Export, set[str]]:
    """``--hf-dtype fp8-block``: the layout written (the model's own, else 128 x 128, and the HF tensors
    it quantizes) and the ``planned`` MCore tensors that must reach `write_hf` in full precision (one of
    their HF tensors is quantized)."""
    fmt = export_layout(spec.hf_config)
    quantized = frozenset(quantized_names(spec, fmt, planned))
    return FP8Export(fmt, quantized), {pt.mcore_name for pt in planned if quantized & {*pt.hf_names, *pt.hf_copies}}
