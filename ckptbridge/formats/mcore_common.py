"""What both MCore formats share: the iteration folder, the args namespace, the
ckptbridge record that lets ``--src mcore --dst hf`` run without an HF folder,
and safe ``.pt`` loading."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import FormatError
from ..fileio import write_text
from ..spec import ModelSpec
from .safetensors_io import read_into

CHECKPOINT_VERSION = 3.0
RELEASE = "release"
ASSETS_DIR = "hf_assets"  # tokenizer / generation config travel here, beside the iteration folders
_SAFE_GLOBALS = [argparse.Namespace]
TRAINING_STATE_PREFIXES = ("optimizer", "rng_state", "rerun_state_machine_state", "opt_param_scheduler")


def is_training_state(key: str) -> bool:
    """Entries a training checkpoint carries besides the model (kept out of conversions, reported)."""
    return key.startswith(TRAINING_STATE_PREFIXES)


def is_extra_state(key: str) -> bool:
    return key.endswith("_extra_state") or "._extra_state/" in key


def iteration_dir(root: Path) -> Path:
    """``root`` itself when it is an iteration folder, else the one ``latest_checkpointed_iteration.txt`` names."""
    root = Path(root)
    tracker = root / "latest_checkpointed_iteration.txt"
    if not tracker.exists():
        if root.name == RELEASE or root.name.startswith("iter_"):
            return root
        raise FormatError(f"{root}: no latest_checkpointed_iteration.txt; not an MCore checkpoint root")
    text = tracker.read_text().strip()
    sub = RELEASE if text == RELEASE else f"iter_{int(text):07d}" if text.isdigit() else None
    if sub is None:
        raise FormatError(f"{tracker}: expected an iteration number or 'release', found {text!r}")
    if not (root / sub).is_dir():
        raise FormatError(f"{tracker} names {sub}, which does not exist")
    return root / sub


def checkpoint_root(path: Path) -> Path:
    path = Path(path)
    return path.parent if (path.name == RELEASE or path.name.startswith("iter_")) and not (path / "latest_checkpointed_iteration.txt").exists() else path


def safe_load(path: Path, **kwargs: Any) -> Any:
    """``torch.load`` with ``weights_only=True`` and only the classes MCore checkpoints need."""
    torch.serialization.add_safe_globals(_SAFE_GLOBALS)
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except FileNotFoundError:
        raise FormatError(f"{path}: file is missing") from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise FormatError(f"{path}: cannot be read as a torch checkpoint ({str(exc).splitlines()[0]})") from None
    except Exception as exc:  # pickle.UnpicklingError and friends from a corrupt or unsafe file
        if type(exc).__module__.startswith(("pickle", "_pickle")):
            raise FormatError(f"{path}: refused or corrupt pickle ({str(exc).splitlines()[0]})") from None
        raise


def bridge_record(spec: ModelSpec, spec_name: str) -> dict[str, Any]:
    """What ckptbridge stores inside every MCore checkpoint it writes."""
    record = {"version": __version__, "hf_config": spec.hf_config, "mapping": spec.mapping_data, "spec": spec_name}
    if spec.overrides:  # args the source's content decided (e.g. no MTP blocks), not config.json
        record["overrides"] = dict(spec.overrides)
    return record


def spec_from_record(record: Any, where: Path) -> ModelSpec:
    if not isinstance(record, dict) or "hf_config" not in record or "mapping" not in record:
        raise FormatError(
            f"{where}: this MCore checkpoint carries no ckptbridge record (HF config and mapping); "
            "it was not written by ckptbridge, so its HF config cannot be recovered"
        )
    return ModelSpec.from_stored(record["hf_config"], record["mapping"], record.get("overrides"))


def args_namespace(args: dict[str, Any], iteration: int = 0) -> argparse.Namespace:
    return argparse.Namespace(**args, iteration=iteration)


def write_tracker(root: Path) -> None:
    write_text(root / "latest_checkpointed_iteration.txt", RELEASE)


def read_storage(fd: int, meta: torch.Tensor, what: str) -> torch.Tensor:
    """Materialise a tensor loaded with ``map_location='meta'`` by reading its bytes from the open file."""
    return read_storage_at(fd, 0, meta, what)


def read_storage_at(fd: int, base: int, meta: torch.Tensor, what: str) -> torch.Tensor:
    """As `read_storage`, for a torch.save archive that starts ``base`` bytes into the file."""
    storage = meta.untyped_storage()
    offset = getattr(storage, "_checkpoint_offset", None)
    if offset is None:
        raise FormatError(f"{what}: torch did not report where the tensor's bytes are")
    raw = read_into(fd, base + offset, storage.nbytes(), what)
    flat = raw.view(meta.dtype) if storage.nbytes() else torch.empty(0, dtype=meta.dtype)
    return flat.as_strided(meta.shape, meta.stride(), meta.storage_offset())


def open_fd(path: Path) -> int:
    return os.open(path, os.O_RDONLY)
