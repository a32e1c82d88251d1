"""Shards over 2 GiB and `ckptbridge compare`'s memory, measured.

Builds a one-layer Llama-shaped fp32 model whose tied embedding alone is over
2 GiB (Linux writes at most 2,147,479,552 bytes per write call, so a writer
that ignores short writes loses its last rows), converts it to MCore legacy
TP1 (one rank file over 2 GiB) and torch_dist (one .distcp over 2 GiB), back
to HF from each, and runs `ckptbridge compare` of the source against every
output, printing the peak RSS of each compare beside the budget
1.5 GiB + 2 x the largest tensor. Numbers are printed, never asserted
(tests/test_large.py asserts the budget and the round trips).

    python benchmarks/compare_mem.py [--vocab 1100032] [--hidden 512] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ckptbridge.formats.safetensors_io import SafetensorsWriter
from ckptbridge.presets import load_preset
from ckptbridge.spec import ModelSpec

GIB = 1024**3
# Peak RSS of one command, measured by a small Python parent (its own RSS does not leak into the
# child's ru_maxrss the way a large parent's pages would before exec).
_MEASURE = ("import resource, subprocess, sys\n"
            "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
            "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n")


def build_wide_hf(out: Path, vocab: int, hidden: int, seed: int = 0) -> tuple[int, int]:
    """A one-layer fp32 Llama with a ``vocab`` x ``hidden`` tied embedding; returns (bytes, largest tensor bytes)."""
    cfg = dict(load_preset("llama3.2-1b")["hf_config"], num_hidden_layers=1, hidden_size=hidden,
               intermediate_size=2 * hidden, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
               vocab_size=vocab, tie_word_embeddings=True, torch_dtype="float32")
    spec = ModelSpec.from_hf_config(cfg)
    entries = [(n, torch.float32, s) for pt in spec.planned() for n, s in zip(pt.hf_names, pt.hf_shapes)]
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    total = largest = 0
    with SafetensorsWriter(out / "model.safetensors", entries, {"format": "pt"}) as writer:
        for name, dtype, shape in entries:
            t = torch.randn(shape, generator=gen, dtype=dtype) * 0.05 + (1.0 if "norm" in name else 0.0)
            writer.write(name, t)
            total += t.numel() * t.element_size()
            largest = max(largest, t.numel() * t.element_size())
            del t
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return total, largest


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ckptbridge.cli", *args]


def peak_rss(cmd: list[str]) -> tuple[int, int]:
    """(exit status, peak RSS in bytes) of ``cmd``."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, check=True)
    rc, rss = out.stdout.split()
    return int(rc), int(rss)


def run(work: Path, vocab: int, hidden: int) -> list[dict]:
    src = work / "hf"
    total, largest = build_wide_hf(src, vocab, hidden)
    outputs = {"legacy tp1": (work / "legacy", ["--format", "torch"]), "torch_dist": (work / "dist", [])}
    rows = []
    for label, (dst, extra) in outputs.items():
        start = time.perf_counter()
        subprocess.run(cli("convert", "-q", "--src", "hf", "--dst", "mcore", *extra, str(src), str(dst)), check=True)
        back = work / f"{dst.name}-hf"
        subprocess.run(cli("convert", "-q", "--src", "mcore", "--dst", "hf", str(dst), str(back)), check=True)
        seconds = time.perf_counter() - start
        biggest = max(p.stat().st_size for p in dst.rglob("*") if p.is_file())
        rc, rss = peak_rss(cli("compare", str(src), str(dst)))
        same_back = (back / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes() if total < 8 * GIB else None
        rows.append(dict(output=label, largest_file_gib=biggest / GIB, round_trip_s=seconds, compare_exit=rc,
                         compare_peak_rss_gib=rss / GIB, budget_gib=1.5 + 2 * largest / GIB, hf_back_identical=same_back))
        shutil.rmtree(back)
    rows.insert(0, dict(model_gib=total / GIB, largest_tensor_gib=largest / GIB))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=1_100_032, help="rows of the tied embedding (x hidden x 4 bytes)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--workdir", type=Path, default=None, help="where to build checkpoints (default: a temp dir)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ckptbridge-compare-mem-", dir=args.workdir))
    try:
        rows = run(work, args.vocab, args.hidden)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    head = rows.pop(0)
    print(f"model {head['model_gib']:.2f} GiB, largest tensor {head['largest_tensor_gib']:.2f} GiB (fp32, tied embedding)")
    print(f"{'output':12s} {'largest file GiB':>16s} {'round trip s':>12s} {'compare exit':>12s} {'compare peak RSS GiB':>20s} "
          f"{'budget GiB':>10s} {'HF back identical':>17s}")
    for r in rows:
        print(f"{r['output']:12s} {r['largest_file_gib']:16.2f} {r['round_trip_s']:12.1f} {r['compare_exit']:12d} "
              f"{r['compare_peak_rss_gib']:20.2f} {r['budget_gib']:10.2f} {str(r['hf_back_identical']):>17s}")
    print(json.dumps([head, *rows]))


if __name__ == "__main__":
    main()
