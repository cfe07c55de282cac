"""MemRec at MLPerf DLRMv2 scale on one CPU process: memory report and DLRM_DCN training steps.

    python examples/memrec_criteotb.py --steps 5 --batch-size 2048

The 26 CriteoTB tables (204M rows x 128 = 104.5 GB fp32) are compressed with MemRec:
5000x for tables of >= 1M rows, 100x for 10k..1M rows; smaller tables stay exact. The
model is torchrec's DLRM_DCN with the MLPerf DLRMv2 dense/cross/over sizes, one-hot
synthetic input at the CriteoTB cardinalities. Prints ratio, peak RSS and step time.
"""
from __future__ import annotations

import argparse
import json
import resource

import torch

from torchrec_compress import CompressedEmbeddingBagCollection, MemRec
from torchrec_compress.data.mlperf import DLRMV2_CARDINALITIES, DLRMV2_DIM
from torchrec_compress.data.synthetic import SyntheticCriteo, cat_names
from torchrec_compress.models import build_dlrm, logical_tables
from torchrec_compress.train import local_process_group, shard_for_training, train_steps


def memrec_plan(tables):
    plan = {}
    for t in tables:
        if t.num_embeddings >= 1_000_000:
            plan[t.name] = MemRec(ratio=5000, hashes=2)
        elif t.num_embeddings >= 10_000:
            plan[t.name] = MemRec(ratio=100, hashes=2)
    return plan


def peak_rss_gib() -> float:
    """This process's peak resident set (Linux: VmHWM, which exec resets; ``ru_maxrss`` keeps
    the peak of the process that forked us, e.g. a large test runner)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    tables = logical_tables(cat_names(26), DLRMV2_CARDINALITIES, DLRMV2_DIM)
    model = build_dlrm(tables, 13, [512, 256], [1024, 1024, 512, 256, 1], memrec_plan(tables), kind="dlrm_dcn",
                       dcn_num_layers=3, dcn_low_rank_dim=512)
    cebc = model.sparse_arch.embedding_bag_collection
    assert isinstance(cebc, CompressedEmbeddingBagCollection)
    report = cebc.memory_report()
    print(report)
    data = list(SyntheticCriteo(DLRMV2_CARDINALITIES, args.batch_size, args.steps, seed=0, split="train"))
    with local_process_group():
        dmp, dense_opt = shard_for_training(model, model.sparse_arch, lr_sparse=0.005, lr_dense=0.005)
        losses, seconds, _ = train_steps(dmp, dense_opt, data, desc="memrec", total=args.steps * args.batch_size)
    result = {
        "ratio": report.total.ratio,
        "embedding_bytes": report.total.compressed_bytes,
        "uncompressed_bytes": report.total.uncompressed_bytes,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "losses": losses,
        "step_s": seconds / max(1, args.steps),
        "peak_rss_gib": peak_rss_gib(),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f)
    return result


if __name__ == "__main__":
    main()
