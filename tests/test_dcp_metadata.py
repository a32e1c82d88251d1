"""Our stand-in DCP metadata classes read and write exactly what torch's own classes do."""

from __future__ import annotations

import io
import pickle

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as real

from ckptbridge.formats import dcp_metadata as ours

from helpers import to_mcore


def _sample() -> ours.Metadata:
    return ours.Metadata(
        state_dict_metadata={
            "w": ours.TensorStorageMetadata(
                ours.TensorProperties(torch.bfloat16), torch.Size([2, 3]),
                [ours.ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([1, 3])),
                 ours.ChunkStorageMetadata(torch.Size([1, 0]), torch.Size([1, 3]))]),
            "x._extra_state/shard_0_1": ours.BytesStorageMetadata(),
        },
        planner_data={"w": ("w",)},
        storage_data={ours.MetadataIndex("w", torch.Size([0, 0])): ours.StorageInfo("__0_0.distcp", 0, 9),
                      ours.MetadataIndex("w", torch.Size([1, 0])): ours.StorageInfo("__1_0.distcp", 0, 9),
                      ours.MetadataIndex("x._extra_state/shard_0_1"): ours.StorageInfo("__0_0.distcp", 9, 4)},
        storage_meta=ours.StorageMeta(None, "save", None),
    )


def test_written_by_us_read_by_torch():
    loaded = pickle.loads(ours.dumps(_sample()))
    assert type(loaded) is real.Metadata
    w = loaded.state_dict_metadata["w"]
    assert type(w) is real.TensorStorageMetadata and w.properties == real.TensorProperties(dtype=torch.bfloat16)
    assert w.chunks[1] == real.ChunkStorageMetadata(torch.Size([1, 0]), torch.Size([1, 3]))
    assert type(loaded.state_dict_metadata["x._extra_state/shard_0_1"]) is real.BytesStorageMetadata
    info = loaded.storage_data[real.MetadataIndex("w", torch.Size([1, 0]))]
    assert (type(info).__name__, info.relative_path, info.offset, info.length) == ("_StorageInfo", "__1_0.distcp", 0, 9)


def test_written_by_torch_read_by_us():
    real_md = pickle.loads(ours.dumps(_sample()))
    assert ours.load(io.BytesIO(pickle.dumps(real_md))) == _sample()


def test_torch_reader_accepts_converted_checkpoint(tiny_hf, tmp_path):
    mcore = to_mcore(tiny_hf["qwen3-8b"], tmp_path / "m", tp=2) / "release"
    md = FileSystemReader(str(mcore)).read_metadata()
    assert md.state_dict_metadata["decoder.layers.self_attention.linear_qkv.weight"].size == torch.Size([4, 256, 64])
