"""FIITED: quality against uncompressed at the same budget, kept chunks over training, and
peak memory against the uncompressed run.

    python examples/fiited_budget.py quality --ratios 4,10 --seeds 0,1,2          # synthetic
    python examples/fiited_budget.py frappe --ratios 2,4,10,20 --seeds 0,1,2      # ../shared/data/frappe
    python examples/fiited_budget.py memory --ratio 10                           # peak RSS, Criteo Kaggle sizes

Every run is `torchrec_compress.train.train` (DLRM, fused row-wise Adagrad, DMP in one
process) on the same data, seeds and steps; FIITED compresses the tables above
``--min-rows`` rows (the others stay exact, as a planner would leave them).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, List

from tabulate import tabulate

from torchrec_compress.data.frappe import FRAPPE_CARDINALITIES, FRAPPE_FIELDS
from torchrec_compress.data.synthetic import CRITEO_KAGGLE_CARDINALITIES
from torchrec_compress.train.config import parse_config
from torchrec_compress.train.run import train

KAGGLE = CRITEO_KAGGLE_CARDINALITIES  # the memory mode's subprocess reads it from this module
SYNTH_CARDS = [1000, 500, 20000, 20000, 300, 24, 5000, 600, 3, 20000, 5000, 20000, 3000]


def _raw(data: Dict, ratio: float, cards: List[int], names: List[str], min_rows: int, seed: int, out: str, chunks: int,
         interval: int, dim: int, epochs: int, position_decay: float = 1.0) -> Dict:
    schemes = {} if ratio <= 1 else {f"t_{f}": {"type": "FIITED", "ratio": ratio, "chunks": chunks, "interval": interval,
                                                "position_decay": position_decay}
                                     for f, v in zip(names, cards) if v >= min_rows}
    return {"data": data, "model": {"kind": "dlrm", "embedding_dim": dim, "dense_arch": [32], "over_arch": [64, 32, 1]},
            "train": {"epochs": epochs, "lr_sparse": 0.05, "lr_dense": 0.01, "seed": seed, "checkpoint": False, "tensorboard": False,
                      "plots": False, "eval_every": interval * 5},
            "schemes": schemes, "out": out}


def _runs(args: argparse.Namespace, data: Dict, cards: List[int], names: List[str]) -> List[Dict]:
    rows = []
    for ratio in [1.0] + [float(r) for r in args.ratios.split(",")]:
        res = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            with tempfile.TemporaryDirectory() as out:
                cfg = parse_config(_raw(dict(data), ratio, cards, names, args.min_rows, seed, out, args.chunks, args.interval, args.dim, args.epochs,
                                      args.position_decay))
                res.append(train(cfg, progress=False))
        last = [r["epochs"][-1] for r in res]
        kept = [_kept(r["epochs"][-1].get("eval_schemes")) for r in res]
        total_chunks = sum(v * args.chunks for v in cards if v >= args.min_rows)
        rows.append({
            "ratio": ratio, "achieved": res[0]["ratio"], "embedding_bytes": res[0]["embedding_bytes"],
            "auc": statistics.mean(e["eval_auc"] for e in last), "auc_std": statistics.pstdev(e["eval_auc"] for e in last),
            "logloss": statistics.mean(e["eval_logloss"] for e in last),
            "pruned_fraction": (1 - statistics.mean(kept) / total_chunks) if ratio > 1 else 0.0,
            "kept_over_training": [(e["step"], _kept(e.get("schemes"))) for e in res[0]["evals"]], "seeds": len(res),
        })
        print(f"ratio {ratio:g}: AUC {rows[-1]['auc']:.4f} +- {rows[-1]['auc_std']:.4f}, pruned {rows[-1]['pruned_fraction']:.3f}", flush=True)
    base = rows[0]["auc"]
    print(tabulate([[f"{r['ratio']:g}x" if r["ratio"] > 1 else "uncompressed", f"{r['achieved']:.2f}x", f"{r['embedding_bytes'] / 2**20:.2f} MiB",
                     f"{r['auc']:.4f} +- {r['auc_std']:.4f}", f"{r['auc'] - base:+.4f}", f"{r['logloss']:.4f}", f"{r['pruned_fraction']:.3f}"] for r in rows],
                   headers=["FIITED", "achieved", "emb bytes", "AUC (mean +- std)", "dAUC", "logloss", "pruned fraction"]))
    return rows


def _kept(status) -> int:
    """Chunks kept by the FIITED tables, from a run's per-table scheme status."""
    return sum(s.get("kept_chunks", 0) for s in (status or {}).values())


def _memory(args: argparse.Namespace) -> Dict:
    """Peak RSS of a short training run at Criteo Kaggle sizes, uncompressed vs FIITED (separate processes)."""
    out = {}
    for ratio in (1.0, args.ratio):
        code = ("import json, resource, sys; sys.argv=['x']; from torchrec_compress.train.config import parse_config;"
                "from torchrec_compress.train.run import train; import examples.fiited_budget as f;"
                f"cfg=parse_config(f._raw({{'kind': 'synthetic', 'batch_size': 2048, 'train_batches': {args.steps}, 'eval_batches': 2}},"
                f"{ratio}, f.KAGGLE, ['cat_%d' % i for i in range(26)], 100000, 0, '{tempfile.mkdtemp()}', 2, 10, 32, 1));"
                "r=train(cfg, progress=False); print(json.dumps({'rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,"
                "'embedding_bytes': r['embedding_bytes'], 'uncompressed_bytes': r['uncompressed_bytes'], 'auc': r['epochs'][-1]['eval_auc'],"
                "'kept': f._kept(r['epochs'][-1].get('eval_schemes'))}))")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        p = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": root})
        if p.returncode:
            raise SystemExit(p.stderr[-3000:])
        out["uncompressed" if ratio == 1 else f"fiited_{ratio:g}x"] = json.loads(p.stdout.strip().splitlines()[-1])
        print(out, flush=True)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["quality", "frappe", "memory"])
    p.add_argument("--ratios", default="4,10")
    p.add_argument("--ratio", type=float, default=10.0)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--chunks", type=int, default=None, help="C (default: chunks of 4 dims, dim / 4)")
    p.add_argument("--position-decay", type=float, default=1.0, help="FIITED position_decay (1 = the paper's ranking)")
    p.add_argument("--interval", type=int, default=100, help="steps between prune/grow events")
    p.add_argument("--min-rows", type=int, default=1000)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps", type=int, default=30, help="memory mode: training steps")
    p.add_argument("--train-batches", type=int, default=400)
    p.add_argument("--root", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "frappe"))
    p.add_argument("--out", default=None, help="results JSON")
    a = p.parse_args(argv)
    a.chunks = a.chunks or a.dim // 4
    if a.mode == "quality":
        res = _runs(a, {"kind": "synthetic", "batch_size": 512, "train_batches": a.train_batches, "eval_batches": 20, "cardinalities": SYNTH_CARDS},
                    SYNTH_CARDS, [f"cat_{i}" for i in range(len(SYNTH_CARDS))])
    elif a.mode == "frappe":
        res = _runs(a, {"kind": "frappe", "root": a.root, "batch_size": 512}, FRAPPE_CARDINALITIES, FRAPPE_FIELDS)
    else:
        res = _memory(a)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
