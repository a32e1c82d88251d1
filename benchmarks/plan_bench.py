"""Planning a very large conversion without moving a byte: DeepSeek-V3-671B's full config.

For each output (HF 5 GB shards; torch_dist and legacy at TP 8 x EP 8), in a fresh process each:
the model plan (`ModelSpec.planned()`), the writer's file plan (which data files, how many bytes
each, which tensors each holds) and the split across N = 1, 8, 64 workers (`workshare.assign`).
Reports plan seconds, the process's peak RSS, and the bytes the most / least loaded worker writes.

    python benchmarks/plan_bench.py [--preset deepseek-v3] [--workers 1 8 64]

Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from ckptbridge.formats.hf import DEFAULT_MAX_SHARD_BYTES
from ckptbridge.output import plan_output
from ckptbridge.layout import ParallelLayout
from ckptbridge.presets import load_preset
from ckptbridge.spec import ModelSpec
from ckptbridge.workshare import assign, loads

GIB = 1024**3
LAYOUT = dict(tp=8, ep=8)


def plan_once(preset: str, output: str, workers: list[int]) -> dict:
    start = time.perf_counter()
    spec = ModelSpec.from_hf_config(load_preset(preset)["hf_config"])
    planned = spec.planned()
    dtype = torch.bfloat16
    layout = ParallelLayout(**LAYOUT)
    margs = None if output == "hf" else spec.megatron_args(layout, dtype, "te", output, 128, False)

    def plan_for(n: int):  # torch_dist cuts ranks' data into parts when there are more workers than ranks
        return plan_output(spec, planned, output, dtype, layout, margs, "te", None, DEFAULT_MAX_SHARD_BYTES, None, n).files

    plan = plan_for(1)
    planned_s = time.perf_counter() - start
    split = {}
    for n in workers:
        t = time.perf_counter()
        files = plan_for(n) if output == "torch_dist" else plan
        per = loads(files.sizes, assign(files.sizes, n))
        split[n] = dict(max_gib=max(per) / GIB, min_gib=min(per) / GIB, files=len(files.sizes),
                        seconds=time.perf_counter() - t)
    return dict(output=output, tensors=len(planned), files=len(plan.sizes), total_gib=sum(plan.sizes.values()) / GIB,
                plan_seconds=planned_s, peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                split=split)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deepseek-v3")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child: plan one output, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(plan_once(args.preset, args.one, args.workers)))
        return
    rows = []
    for output in ("hf", "torch_dist", "torch"):
        done = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--one", output, "--workers",
                               *map(str, args.workers)], capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"preset {args.preset} (full config), bf16; MCore outputs at {LAYOUT}; one fresh process per output")
    print(f"{'output':11s} {'tensors':>8s} {'files':>6s} {'GiB':>8s} {'plan s':>7s} {'peak RSS MiB':>12s}  "
          + "  ".join(f"N={n}: max/min GiB per worker" for n in args.workers))
    for r in rows:
        print(f"{r['output']:11s} {r['tensors']:8d} {r['files']:6d} {r['total_gib']:8.1f} {r['plan_seconds']:7.2f} "
              f"{r['peak_rss_mib']:12.0f}  " + "  ".join(
                  f"{s['max_gib']:12.1f} / {s['min_gib']:<12.1f}" for s in r["split"].values()))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
