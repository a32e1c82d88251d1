"""Describe a checkpoint without converting it: format, architecture, layout, dtype, tensors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .config_source import ConfigOptions
from .formats.dcp_metadata import TensorStorageMetadata
from .formats.detect import detect_format, open_source
from .formats.hf import HFSource
from .formats.legacy import LegacySource
from .formats.torch_dist import TorchDistSource


def describe(path: Path, config: ConfigOptions | None = None, iteration: int | None = None) -> dict[str, Any]:
    fmt = detect_format(path, iteration)
    source = open_source(path, config=config, iteration=iteration)
    try:
        spec = source.spec
        info: dict[str, Any] = {
            "path": str(path),
            "format": fmt,
            "family": spec.mapping.family,
            "architecture": (spec.hf_config.get("architectures") or [None])[0],
            "dtype": str(source.dtype).replace("torch.", ""),
            "num_layers": spec.num_layers,
            "parameters": sum(math.prod(s) for pt in spec.planned() for s in pt.hf_shapes),
        }
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
                "ep": source.layout.ep, "etp": source.layout.expert_tp, "spec": source.spec_name,
            }
            info["tensors"] = _mcore_tensors(source)
            common = source.common
            info.update(producer=common.producer, iteration=common.iteration, hf_config=common.origin,
                        training_state=source.training_state().describe(), notes=list(common.notes))
        return info
    finally:
        source.close()


def _mcore_tensors(source: TorchDistSource | LegacySource) -> list[dict[str, Any]]:
    if isinstance(source, TorchDistSource):
        return [
            {"name": k, "shape": list(md.size), "dtype": str(md.properties.dtype).replace("torch.", ""), "chunks": len(md.chunks)}
            if isinstance(md, TensorStorageMetadata) else {"name": k, "bytes": True}
            for k, md in sorted(source.metadata.state_dict_metadata.items())
        ]
    out = []
    for rank, sd in sorted(source.meta.items()):
        for mk, models in sd.items():
            if mk.startswith("model"):
                for k, v in models.items():
                    if hasattr(v, "shape"):
                        out.append({"name": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""),
                                    "file": str(source.paths[rank].relative_to(source.iter_dir)), "chunk": mk})
    return out

