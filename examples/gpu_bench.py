"""GPU benchmark: every registered scheme against stock TorchRec on one CUDA device.

    python examples/gpu_bench.py                       # one GPU (needs the CUDA fbgemm-gpu build)
    python examples/gpu_bench.py --device cpu --max-rows 20000 --batch 256   # the same on CPU, as a smoke run

One process, one device: 26 Criteo Kaggle tables capped at ``--max-rows``, dim 64, tables of
>= 10k rows compressed ``--ratio`` x by each scheme's benchmark preset; a training step is the
embedding forward + backward with FBGEMM's fused row-wise Adagrad (``bench speed``'s step).
Per variant: training samples/s and the ratio to stock (interleaved repetitions, median),
host syncs per step (``aten::_local_scalar_dense`` in a profiler trace), aten/fbgemm ops per
step, and on CUDA the synchronizing calls ``torch.cuda.set_sync_debug_mode("warn")`` reports
in one step. Sized to finish in a few minutes on one GPU; the JSON goes to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from torchrec_compress.benchmarks.speed import bench_speed, format_speed
from torchrec_compress.config import presets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-rows", type=int, default=2_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--ratio", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--schemes", default=",".join(presets()), help="comma-separated registry presets (default: all)")
    p.add_argument("--out", default="runs/gpu_bench.json")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible: nothing to do (run with --device cpu for a CPU smoke run)")
        return 0
    t0 = time.perf_counter()
    res = bench_speed(max_rows=a.max_rows, dim=a.dim, ratio=a.ratio, batch=a.batch, batches=a.batches, reps=a.reps,
                      schemes=[s for s in a.schemes.split(",") if s], device=a.device, inference=False)
    res["wall_s"] = time.perf_counter() - t0
    if a.device == "cuda":
        res["gpu"] = torch.cuda.get_device_name()
    print(format_speed(res))
    for name, r in res["runs"].items():
        if "cuda_sync_warnings_per_step" in r:
            print(f"{name}: {r['cuda_sync_warnings_per_step']} synchronizing calls per step (set_sync_debug_mode)")
    print(f"wall time {res['wall_s']:.0f} s")
    import os

    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
