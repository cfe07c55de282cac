"""GPU smoke test: every scheme, sharded on all visible GPUs with NCCL, against the unsharded model.

    python examples/gpu_smoke.py            # all visible GPUs (needs the CUDA fbgemm-gpu build)

For each sharding type TorchRec offers on CUDA it trains Hashing, QR, MEmCom and an
uncompressed table for 3 steps (row-wise Adagrad and SGD) and prints the largest
difference to the unsharded model; exits non-zero above tolerance.
"""
from __future__ import annotations

import sys

import torch

from torchrec_compress.distributed.plans import SHARDING_TYPES
from torchrec_compress.testing.multiprocess import run_on_ranks
from torchrec_compress.testing.parity import sharded_parity_worker

TOL = 1e-4  # GPU kernels may use other summation orders (and TF32 is off for embeddings)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device visible: nothing to do")
        return 0
    world = torch.cuda.device_count()
    worst_all = 0.0
    for st in SHARDING_TYPES:
        results = run_on_ranks(sharded_parity_worker, st, "cuda", world_size=world, backend="nccl")
        worst = max(max(d["forward"] + d["params"]) for r in results for d in r.values())
        worst_all = max(worst_all, worst)
        print(f"{st:15s} ranks={world} max|sharded - unsharded| = {worst:.3e}")
    print("OK" if worst_all < TOL else "FAILED")
    return 0 if worst_all < TOL else 1


if __name__ == "__main__":
    sys.exit(main())
