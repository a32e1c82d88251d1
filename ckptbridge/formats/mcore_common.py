"""What both MCore formats share: the iteration folder, the args namespace, the
ckptbridge record that lets ``--src mcore --dst hf`` run without an HF folder,
and safe ``.pt`` loading."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .. import __version__
from ..errors import FormatError
from ..config_source import ConfigOptions, checkpoint_args, resolve
from ..megatron_args import full_megatron_lm_args
from ..fileio import write_text
from ..spec import ModelSpec
from .bridge_config import RUN_CONFIG, args_from_run_config
from .safe_globals import megatron_globals
from .safetensors_io import read_into
from ..fastcopy import Run

CHECKPOINT_VERSION = 3.0
RELEASE = "release"
ASSETS_DIR = "hf_assets"  # tokenizer / generation config travel here, beside the iteration folders
TRAINING_STATE_PREFIXES = ("optimizer", "rng_state", "rerun_state_machine_state", "opt_param_scheduler")


def is_training_state(key: str) -> bool:
    """Entries a training checkpoint carries besides the model (kept out of conversions, reported).
    A ChainedOptimizer (MoE: dense and expert parameters; Megatron-LM with several param groups)
    prefixes each of its optimizers' entries with ``chained_N.``."""
    return _CHAINED.sub("", key, count=1).startswith(TRAINING_STATE_PREFIXES)


_CHAINED = re.compile(r"^chained_\d+\.")


def is_extra_state(key: str) -> bool:
    return key.endswith("_extra_state") or "._extra_state/" in key


def iteration_dir(root: Path, iteration: int | None = None) -> Path:
    """``root`` itself when it is an iteration folder; else ``iter_NNNNNNN`` for ``iteration``; else the
    folder ``latest_checkpointed_iteration.txt`` names (a number or ``release``), as Megatron-LM loads."""
    root = Path(root)
    if iteration is not None:
        sub = root / f"iter_{int(iteration):07d}"
        if root.name.startswith("iter_") or root.name == RELEASE:
            raise FormatError(f"{root}: --iteration selects a folder inside a checkpoint root, not an iteration folder")
        if not sub.is_dir():
            have = sorted(p.name for p in root.glob("iter_*") if p.is_dir()) if root.is_dir() else []
            raise FormatError(f"{sub}: no such iteration folder (found: {', '.join(have) or 'none'})")
        return sub
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
    """``torch.load`` with ``weights_only=True`` and only the classes Megatron checkpoints need
    (`safe_globals.allowed`): megatron's enums are read as stand-ins, no megatron code runs."""
    try:
        with megatron_globals():
            return torch.load(path, weights_only=True, **kwargs)
    except FileNotFoundError:
        raise FormatError(f"{path}: file is missing") from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise FormatError(f"{path}: cannot be read as a torch checkpoint ({_reason(exc)})") from None
    except Exception as exc:  # pickle.UnpicklingError and friends from a corrupt or unsafe file
        if type(exc).__module__.startswith(("pickle", "_pickle")):
            raise FormatError(f"{path}: refused or corrupt pickle ({_reason(exc)})") from None
        raise


def _reason(exc: BaseException) -> str:
    """torch's one line that names a refused class ("Unsupported global: GLOBAL x"), else its first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "Unsupported global" in line]
    return (named or lines or [type(exc).__name__])[0]


def bridge_record(spec: ModelSpec) -> dict[str, Any]:
    """What ckptbridge stores inside every MCore checkpoint it writes: the model (HF config, mapping) and the
    version that wrote it (shown as the producer). The module names' spec is args' ``transformer_impl``."""
    record = {"version": __version__, "hf_config": spec.hf_config, "mapping": spec.mapping_data}
    if spec.overrides:  # args the source's content decided (e.g. no MTP blocks), not config.json
        record["overrides"] = dict(spec.overrides)
    return record


class SkippedState(NamedTuple):
    """Training state a checkpoint holds beside the model (optimizer, RNG): never read, only counted."""

    entries: int
    bytes: int
    kinds: tuple[str, ...]

    def describe(self) -> str:
        if not self.entries:
            return "none"
        return f"{', '.join(self.kinds)}: {self.entries} entries, {self.bytes / 2**20:.1f} MiB (not read)"


@dataclass(frozen=True)
class CommonState:
    """An MCore checkpoint's non-tensor state: the model it holds (and where that description came
    from), who wrote it, and at which iteration."""

    spec: ModelSpec
    margs: dict[str, Any]  # the checkpoint's Megatron args, under ckptbridge's names
    producer: str  # "ckptbridge <version>", "Megatron-LM" (or a trainer on it) or "Megatron-Bridge"
    origin: str  # where the HF config came from
    iteration: int | None
    notes: tuple[str, ...] = ()
    used_options: tuple[str, ...] = ()  # the --flags that shaped the HF config (see config_source.refuse_unused)

    @classmethod
    def read(cls, path: Path, options: ConfigOptions | None = None) -> "CommonState":
        return cls.from_dict(safe_load(path), path, options)

    @classmethod
    def from_dict(cls, state: Any, where: Path, options: ConfigOptions | None = None) -> "CommonState":
        if not isinstance(state, dict):
            raise FormatError(f"{where}: does not hold a dict")
        record = state.get("ckptbridge")
        bridge = Path(where).parent / RUN_CONFIG
        if "args" in state:
            args = vars(state["args"]) if hasattr(state["args"], "__dict__") else state["args"]
            if not isinstance(args, dict):
                raise FormatError(f"{where}: 'args' is a {type(state['args']).__name__}, not a namespace")
            producer = f"ckptbridge {record.get('version', '(unknown version)')}" if isinstance(record, dict) else "Megatron-LM"
        elif bridge.exists():  # Megatron-Bridge keeps its model in run_config.yaml, no args
            args, producer = args_from_run_config(bridge), "Megatron-Bridge"
        else:
            raise FormatError(f"{where}: no 'args' and no {RUN_CONFIG} beside it: no description of the model "
                              "(Megatron-LM stores it in args, Megatron-Bridge in run_config.yaml)")
        resolved = resolve(args, record, where, options)
        return cls(
            spec=resolved.spec,
            margs=checkpoint_args(args),
            producer=producer,
            origin=resolved.origin,
            iteration=state.get("iteration"),
            notes=resolved.notes,
            used_options=resolved.used_options,
        )


def spec_from_record(record: Any, where: Path) -> ModelSpec:
    if not isinstance(record, dict) or "hf_config" not in record or "mapping" not in record:
        raise FormatError(
            f"{where}: this MCore checkpoint carries no ckptbridge record (HF config and mapping); "
            "it was not written by ckptbridge, so its HF config cannot be recovered"
        )
    return ModelSpec.from_stored(record["hf_config"], record["mapping"], record.get("overrides"))


def args_namespace(args: dict[str, Any], iteration: int = 0) -> argparse.Namespace:
    """The full args Namespace Megatron-LM itself would save for this model (its names only)."""
    return full_megatron_lm_args(args, iteration)


def iteration_name(iteration: int | None) -> str:
    """``release`` (no iteration) or Megatron-LM's ``iter_0000100``."""
    return RELEASE if iteration is None else f"iter_{iteration:07d}"


def write_tracker(root: Path, iteration: int | None = None) -> None:
    write_text(root / "latest_checkpointed_iteration.txt", RELEASE if iteration is None else str(iteration))


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


def stored_run(fd: int, base: int, meta: torch.Tensor) -> Run | None:
    """The bytes of a tensor loaded with ``map_location='meta'`` from the torch.save archive ``base`` bytes
    into ``fd``, as one run of that file, when they are one C-ordered block (None: strided, a view that
    does not fit its storage, or no offset reported). A view into a larger storage (a bucket) is fine."""
    storage = meta.untyped_storage()
    offset = getattr(storage, "_checkpoint_offset", None)
    if offset is None or not meta.is_contiguous():
        return None
    start, length = meta.storage_offset() * meta.element_size(), meta.numel() * meta.element_size()
    if start + length > storage.nbytes():
        return None
    return Run(fd, base + offset + start, length)
