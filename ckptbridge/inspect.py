"""Describe a checkpoint without converting it: format, architecture, layout, dtype, tensors.

TransformerEngine modules save an ``_extra_state`` entry each (FP8 metadata; empty bytes when not
training in FP8): a 30-layer model has a hundred of them and they are not weights, so they are
counted apart from the tensors (``extra_state``) instead of listed one per row.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config_source import ConfigOptions, refuse_unused
from .formats.carried import CARRIED_FILE, from_hf_files
from .formats.dcp_metadata import TensorStorageMetadata
from .formats.detect import detect_format, open_source
from .formats.hf import HFSource
from .formats.legacy import LegacySource
from .formats.mcore_common import is_extra_state
from .formats.torch_dist import TorchDistSource
from .mapping.ignore import carried_name


def describe(path: Path, config: ConfigOptions | None = None, iteration: int | None = None) -> dict[str, Any]:
    fmt = detect_format(path, iteration)
    source = open_source(path, config=config, iteration=iteration)
    try:
        refuse_unused(config, iteration, {path: source})
        spec = source.spec
        info: dict[str, Any] = {
            "path": str(path),
            "format": fmt,
            "family": spec.mapping.family,
            "architecture": (spec.hf_config.get("architectures") or [None])[0],
            "dtype": str(source.dtype).replace("torch.", ""),
            "num_layers": spec.num_layers,
            "parameters": sum(math.prod(s) for pt in source.planned for s in pt.hf_shapes),
        }
        info["carried"] = _carried(source)
        if isinstance(source, HFSource):
            info["layout"] = None
            info["tensors"] = [
                {"name": n, "shape": list(f.entries[n].shape), "dtype": str(f.entries[n].dtype).replace("torch.", ""), "file": fname}
                for n, fname in sorted(source.where.items()) for f in [source.files[fname]]
            ]
        else:
            info["layout"] = {
                "tp": source.layout.tp, "pp": source.layout.pp, "vpp": source.layout.vpp,
                "pp_first": source.layout.pp_first, "pp_last": source.layout.pp_last,
                "ep": source.layout.ep, "etp": source.layout.expert_tp, "spec": source.layer_spec,
            }
            moe = bool(spec.args.get("num_moe_experts"))  # a dense model's args still say ep 1 / etp = tp: noise
            info["layout"]["summary"] = (source.layout if moe else replace(source.layout, ep=1, etp=None)).describe()
            info["tensors"], info["extra_state"] = _mcore_tensors(source)
            common = source.common
            info.update(producer=common.producer, iteration=common.iteration, hf_config=common.origin,
                        training_state=source.training_state().describe(), notes=list(common.notes))
        return info
    finally:
        source.close()


def _carried(source: Any) -> str | None:
    """What the mapping's ``carry`` patterns name in this checkpoint (None: the family carries nothing)."""
    patterns = source.spec.mapping.carry
    if not patterns:
        return None
    if isinstance(source, HFSource):
        carried = from_hf_files(source.files, source.where, [n for n in source.where if carried_name(n, patterns)],
                                str(source.folder))
    else:
        carried = source.carried
    if carried is None:
        return f"none: no {CARRIED_FILE} (not written by ckptbridge from an HF folder); {list(patterns)} are absent"
    return carried.describe()


def _extra_state(names: list[str]) -> dict[str, Any] | None:
    """How many ``_extra_state`` entries, of how many distinct modules (names without layer and shard)."""
    if not names:
        return None
    modules = {".".join(p for p in n.partition("/")[0].split(".") if not p.isdigit()) for n in names}
    return {"entries": len(names), "modules": sorted(modules)}


def _mcore_tensors(source: TorchDistSource | LegacySource) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The checkpoint's tensors, and a summary of its ``_extra_state`` entries (None if it has none)."""
    if isinstance(source, TorchDistSource):
        items = sorted(source.metadata.state_dict_metadata.items())
        tensors = [
            {"name": k, "shape": list(md.size), "dtype": str(md.properties.dtype).replace("torch.", ""), "chunks": len(md.chunks)}
            if isinstance(md, TensorStorageMetadata) else {"name": k, "bytes": True}
            for k, md in items if not is_extra_state(k)
        ]
        return tensors, _extra_state([k for k, _ in items if is_extra_state(k)])
    out, extra = [], []
    for rank, sd in sorted(source.meta.items()):
        for mk, models in sd.items():
            if mk.startswith("model"):
                for k, v in models.items():
                    if hasattr(v, "shape"):
                        out.append({"name": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""),
                                    "file": str(source.paths[rank].relative_to(source.iter_dir)), "chunk": mk})
                    elif is_extra_state(k):
                        extra.append(k)
    return out, _extra_state(extra)

