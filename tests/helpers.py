"""Small helpers shared by the conversion tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ckptbridge.convert import Target, convert
from ckptbridge.layout import ParallelLayout

MOE_PRESETS = ["mixtral-8x7b", "qwen3-30b-a3b", "qwen1.5-moe-a2.7b", "deepseek-v3"]
DENSE_PRESETS = ["llama3.1-8b", "llama3.2-1b", "mistral-7b", "qwen2.5-7b", "qwen2.5-0.5b", "qwen3-8b"]


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def hf_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def to_mcore(src: Path, dst: Path, fmt: str = "torch_dist", spec: str = "te", **layout) -> Path:
    convert(src, dst, None, Target("mcore", ParallelLayout(**layout), fmt, spec))
    return dst


def to_hf(src: Path, dst: Path) -> Path:
    convert(src, dst, None, Target("hf"))
    return dst


def assert_bit_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        if not isinstance(a[k], torch.Tensor):  # e.g. an empty `_extra_state`
            assert a[k] == b[k], k
            continue
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.uint8) if a[k].dim() else a[k], b[k].view(torch.uint8) if b[k].dim() else b[k]), k


def tree_digest(folder: Path) -> str:
    """Hash of every file's path and bytes: proves a folder was not modified."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def add_mtp_blocks(src: Path, dst: Path, depth: int = 1, seed: int = 7) -> Path:
    """Copy a tiny DeepSeek-V3 folder to ``dst`` with ``depth`` multi-token-prediction blocks added as
    the hub checkpoint carries them: ``model.layers.{n + d}.*`` (a full MoE decoder layer shaped like
    the last one, enorm, hnorm, eh_proj, shared_head.norm) plus exact copies of the embedding and
    the head (embed_tokens, shared_head.head). transformers does not build MTP layers, so they are
    written by hand; ``num_nextn_predict_layers`` is set to ``depth``."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    tensors = hf_tensors(src)
    config = hf_config(src)
    n, hidden = config["num_hidden_layers"], config["hidden_size"]
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, norm: bool = False) -> torch.Tensor:
        return (1.0 if norm else 0.0) + (0.1 if norm else 0.05) * torch.randn(shape, generator=gen)

    for d in range(depth):
        block = f"model.layers.{n + d}."
        for name, t in list(tensors.items()):
            if name.startswith(f"model.layers.{n - 1}."):
                tensors[block + name[len(f"model.layers.{n - 1}."):]] = rand(*t.shape, norm="norm" in name).to(t.dtype)
        tensors.update({
            block + "enorm.weight": rand(hidden, norm=True),
            block + "hnorm.weight": rand(hidden, norm=True),
            block + "eh_proj.weight": rand(hidden, 2 * hidden),
            block + "shared_head.norm.weight": rand(hidden, norm=True),
            block + "embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
            block + "shared_head.head.weight": tensors["lm_head.weight"].clone(),
        })
    for f in Path(dst).glob("*.safetensors"):
        f.unlink()
    save_file(tensors, Path(dst) / "model.safetensors", metadata={"format": "pt"})
    config["num_nextn_predict_layers"] = depth
    (Path(dst) / "config.json").write_text(json.dumps(config, indent=2))
    return Path(dst)


def torch_dist_structure(folder: Path) -> tuple[dict, dict]:
    """A torch_dist folder's tensors as (global shape, dtype, sorted chunks) and its byte entries' payloads:
    what must be equal for two writers to have produced the same checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(folder)).read_metadata()
    out, payload = {}, {}
    for key, md in meta.state_dict_metadata.items():
        if hasattr(md, "chunks"):
            out[key] = (tuple(md.size), md.properties.dtype, sorted((tuple(c.offsets), tuple(c.sizes)) for c in md.chunks))
        else:
            out[key] = "bytes"
    for idx, info in meta.storage_data.items():
        if out[idx.fqn] == "bytes":
            with open(Path(folder) / info.relative_path, "rb") as f:
                f.seek(info.offset)
                payload[idx.fqn] = f.read(info.length)
    return out, payload


def resave_with_megatron(rank: int, world: int, iter_dir: str, out_dir: str, tp: int, ep: int, etp: int) -> bool:
    """Worker: load our torch_dist checkpoint into megatron's GPTModel at ``tp`` x ``ep`` x ``etp`` and save it
    with megatron's own ``dist_checkpointing`` (the reference our writer must equal)."""
    from megatron.core import dist_checkpointing

    from ckptbridge.harness.checkpoint_args import checkpoint_args
    from ckptbridge.mcore import model as mm

    args = checkpoint_args(iter_dir, tp, 1, ep, etp)
    mm.init_parallel(tp, 1, seed=7 + rank, ep=ep, etp=etp)
    models = mm.build_gpt_model(args, dtype=torch.float32)
    mm.load_torch_dist(models, iter_dir)
    with mm.cuda_to_cpu():
        dist_checkpointing.save(models[0].sharded_state_dict(), out_dir)
    return True
