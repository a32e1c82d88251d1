"""Exporting a trained checkpoint reads the model, not the optimizer state beside it.

Builds a Llama-3.2-1B-shaped fp32 torch_dist checkpoint (ckptbridge's writer), then turns it into what a
Megatron-LM run leaves: the ckptbridge record removed from ``common.pt`` (the HF config is synthesized from
the args) and, in the same ``.distcp`` data files, the optimizer state of Megatron-LM's non-distributed
optimizer (``optimizer.state.{exp_avg,exp_avg_sq,fp32_param}.<param>``, fp32: 3x the model's bytes, random
values). Then times ``ckptbridge convert --src mcore --dst hf`` beside ``dd`` of the model's bytes alone
and of all data files, and prints the converter's peak RSS (GNU time) and the bytes it read (``rchar``).

    python benchmarks/export_trained_bench.py [--workdir DIR] [--layers 2]

Targets (issue 9): peak RSS <= 1.5 GiB + the largest tensor; bytes read about the model's size.
Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ckptbridge.convert import Target, convert
from ckptbridge.formats import dcp_metadata
from ckptbridge.formats.dcp_metadata import ChunkStorageMetadata, MetadataIndex, StorageInfo, TensorProperties, TensorStorageMetadata
from ckptbridge.formats.mcore_common import safe_load
from ckptbridge.megatron_args import to_megatron_lm
from convert_bench import GIB, build_checkpoint, dd_copy, timed

OPTIMIZER_STATES = ("exp_avg", "exp_avg_sq", "fp32_param")


def add_optimizer_state(it: Path) -> int:
    """Append fp32 optimizer entries for every model chunk to the data file holding it; returns their bytes."""
    with open(it / ".metadata", "rb") as f:
        md = dcp_metadata.load(f)
    gen = torch.Generator().manual_seed(1)
    added = 0
    for key, tmd in list(md.state_dict_metadata.items()):
        if not isinstance(tmd, TensorStorageMetadata):
            continue
        for state in OPTIMIZER_STATES:
            okey = f"optimizer.state.{state}.{key}"
            chunks = []
            for chunk in tmd.chunks:
                info = md.storage_data[MetadataIndex(key, chunk.offsets)]
                buf = io.BytesIO()
                torch.save(torch.randn(tuple(chunk.sizes), generator=gen, dtype=torch.float32), buf)
                with open(it / info.relative_path, "ab") as f:
                    begin = f.tell()
                    f.write(buf.getvalue())
                md.storage_data[MetadataIndex(okey, chunk.offsets)] = StorageInfo(info.relative_path, begin, buf.tell())
                chunks.append(ChunkStorageMetadata(chunk.offsets, chunk.sizes))
                added += buf.tell()
            md.state_dict_metadata[okey] = TensorStorageMetadata(TensorProperties(dtype=torch.float32), tmd.size, chunks)
            md.planner_data[okey] = (okey,)
    with open(it / ".metadata", "wb") as f:
        dcp_metadata.dump(md, f)
    common = safe_load(it / "common.pt")
    common.pop("ckptbridge")
    common["args"] = argparse.Namespace(**to_megatron_lm(vars(common["args"])))
    common["optimizer"] = {"param_state_sharding_type": "fully_sharded_model_space"}
    torch.save(common, it / "common.pt")
    return added


def child(src: str, dst: str, report: str) -> None:
    """Run the export in this process and record the bytes it read."""
    from ckptbridge.cli import main

    try:
        main(["convert", "-q", "--src", "mcore", "--dst", "hf", src, dst], standalone_mode=False)
    finally:
        rchar = next(int(x.split()[1]) for x in Path("/proc/self/io").read_text().splitlines() if x.startswith("rchar"))
        Path(report).write_text(str(rchar))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    work = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        hf = work / "hf"
        model_bytes, largest = build_checkpoint(hf, args.layers, "llama3.2-1b")
        mcore = work / "mcore"
        convert(hf, mcore, "hf", Target("mcore", dtype=torch.float32))
        shutil.rmtree(hf)
        it = mcore / "release"
        model_bytes = sum(p.stat().st_size for p in it.glob("*.distcp"))
        opt_bytes = add_optimizer_state(it)
        largest *= 2  # bf16 -> fp32
        report = work / "rchar"
        seconds, rss = timed([sys.executable, __file__, "--child", str(mcore), str(work / "out"), str(report)])
        read = int(report.read_text())
        dd_model, _ = timed(["dd", f"if={it / '__0_0.distcp'}", f"of={work / 'dd.bin'}", "bs=16M", f"count={model_bytes // 2**24 + 1}", "status=none"])
        (work / "dd.bin").unlink()
        dd_all, _ = timed(dd_copy(it, work / "dd-all"))
        print(json.dumps({
            "model_MiB": round(model_bytes / 2**20), "optimizer_MiB": round(opt_bytes / 2**20),
            "optimizer_over_model": round(opt_bytes / model_bytes, 2),
            "export_s": round(seconds, 2), "dd_model_bytes_s": round(dd_model, 2), "dd_all_files_s": round(dd_all, 2),
            "export_over_dd_model": round(seconds / dd_model, 2),
            "read_MiB": round(read / 2**20), "read_over_model": round(read / model_bytes, 3),
            "peak_rss_GiB": round(rss / GIB, 2), "rss_budget_GiB": round(1.5 + largest / GIB, 2),
        }, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
