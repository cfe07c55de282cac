"""Frappe (real data): DLRM uncompressed vs compressed user/item tables, AUC and log loss.

    python examples/frappe_schemes.py --ratio 4 --epochs 5 --seeds 0,1,2

Trains on the validation split (57,722 rows), evaluates on the test split (28,860);
reads ../shared/data/frappe at run time. The user (957) and item (4,082) tables are
compressed at --ratio; the 8 small context tables stay exact. FreqThreshold is fitted
from the training split's id counts before training. Saec warms up uncompressed for
--warm-epochs, clusters user/item by their embeddings, then fine-tunes for the rest. MPE
searches precisions for --warm-epochs (bit penalty), retrains (QAT) for the rest, and is
evaluated both as trained and as the exported FBGEMM model (the reported AUC and ratio
are the exported model's).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from typing import Dict

import torch
from tabulate import tabulate
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.models.dlrm import DLRM

from torchrec_compress import MPE, QR, CompressedEmbeddingBagCollection, FreqThreshold, Hashing, MEmCom, MemRec, Saec, compress_, fit_frequency_, fit_mpe_groups_, fit_saec_, mpe_finalize, run_mpe
from torchrec_compress.quant import export, quantized_memory_report
from torchrec_compress.distributed.state import copy_full_into_, single_rank_full_state_dict
from torchrec_compress.data.frappe import FRAPPE_CARDINALITIES, FRAPPE_FIELDS, load_frappe
from torchrec_compress.stats import FrequencyStats
from torchrec_compress.train import evaluate, local_process_group, shard_for_training, train_steps

DEFAULT_ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "frappe")
SCHEMES = {
    "none": lambda r: None,
    "hashing": lambda r: Hashing(ratio=r),
    "qr": lambda r: QR(ratio=r),
    "memcom": lambda r: MEmCom(ratio=r),
    "memrec": lambda r: MemRec(ratio=r, hashes=2),
    "freq_threshold": lambda r: FreqThreshold(ratio=r),
    "saec": lambda r: Saec(ratio=r),
    "mpe": lambda r: MPE(ratio=r, groups=32, penalty=0.1),
}
COMPRESSED = ("t_user", "t_item")


def _model(tables, schemes, seed: int, dim: int):
    torch.manual_seed(seed)
    model = DLRM(embedding_bag_collection=EmbeddingBagCollection(tables, device=torch.device("meta")), dense_in_features=1,
                 dense_arch_layer_sizes=[16, dim], over_arch_layer_sizes=[64, 32, 1], dense_device=torch.device("cpu"))
    if schemes:
        compress_(model, schemes)
    dmp, opt = shard_for_training(model, model.sparse_arch, lr_sparse=0.05, lr_dense=0.01)
    return model, dmp, opt


def _unsharded(tables, schemes, dim: int, state: Dict[str, torch.Tensor]):
    """A CPU copy of the trained model (world size 1: every shard is the full table)."""
    model = DLRM(embedding_bag_collection=EmbeddingBagCollection(tables), dense_in_features=1,
                 dense_arch_layer_sizes=[16, dim], over_arch_layer_sizes=[64, 32, 1])
    compress_(model, schemes)
    model.load_state_dict(state)
    return model


def run(scheme: str, ratio: float, seed: int, epochs: int, dim: int, root: str, warm_epochs: int = 2) -> Dict[str, float]:
    train, test = load_frappe(root)
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=dim, num_embeddings=v, feature_names=[f])
              for f, v in zip(FRAPPE_FIELDS, FRAPPE_CARDINALITIES)]
    cfg = SCHEMES[scheme](ratio)
    stats = FrequencyStats(dict(zip(FRAPPE_FIELDS, FRAPPE_CARDINALITIES)))
    stats.update_from(train.batches(4096), progress=False)
    first = 0
    if scheme == "saec":  # warm up uncompressed, then cluster the warmed embeddings
        _, dmp, opt = _model(tables, None, seed, dim)
        for e in range(warm_epochs):
            train_steps(dmp, opt, train.batches(512, shuffle_seed=seed * 100 + e), desc=scheme, progress=False)
        warm = single_rank_full_state_dict(dmp)
        first = warm_epochs
    model, dmp, opt = _model(tables, {t: cfg for t in COMPRESSED} if cfg is not None else None, seed, dim)
    if scheme == "freq_threshold":
        fit_frequency_(dmp, stats)
    if scheme == "saec":
        state = dmp.state_dict()
        for k, v in warm.items():  # dense layers and the exact context tables continue from the warm-up
            if k in state:
                copy_full_into_(state[k], v)
        prefix = "sparse_arch.embedding_bag_collection.embedding_bags."
        fit_saec_(dmp, {t: warm[f"{prefix}{t}.weight"] for t in COMPRESSED}, stats)
    if scheme == "mpe":
        fit_mpe_groups_(dmp, stats)
        epochs_of = lambda lo, hi: (b for e in range(lo, hi) for b in train.batches(512, shuffle_seed=seed * 100 + e))  # noqa: E731
        chosen = run_mpe(dmp, opt, epochs_of(0, warm_epochs), epochs_of(warm_epochs, epochs), progress=False)["chosen"]
        qat_auc, _ = evaluate(dmp, test.batches(4096))
        unsharded = _unsharded(tables, {t: cfg for t in COMPRESSED}, dim, single_rank_full_state_dict(dmp))
        inference = export(mpe_finalize(unsharded), default="fp32")
        auc, logloss = evaluate(inference, test.batches(4096))
        rep = quantized_memory_report(inference)
        big = sum(rep.tables[t].compressed_bytes for t in COMPRESSED)
        big_u = sum(rep.tables[t].uncompressed_bytes for t in COMPRESSED)
        return {"auc": auc, "logloss": logloss, "qat_auc": qat_auc, "user_item_ratio": big_u / big, "total_ratio": rep.total.ratio,
                "chosen_bits": chosen}
    for e in range(first, epochs):
        train_steps(dmp, opt, train.batches(512, shuffle_seed=seed * 100 + e), desc=scheme, progress=False)
    auc, logloss = evaluate(dmp, test.batches(4096))
    ebc = model.sparse_arch.embedding_bag_collection
    if not isinstance(ebc, CompressedEmbeddingBagCollection):
        ebc = CompressedEmbeddingBagCollection(tables, {}, device=torch.device("meta"))
    rep = ebc.memory_report()
    big = sum(rep.tables[t].compressed_bytes for t in COMPRESSED)
    big_u = sum(rep.tables[t].uncompressed_bytes for t in COMPRESSED)
    return {"auc": auc, "logloss": logloss, "user_item_ratio": big_u / big, "total_ratio": rep.total.ratio}


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ratio", type=float, default=4.0)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--root", default=DEFAULT_ROOT)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    rows, out = [], {}
    with local_process_group():
        for scheme in a.schemes.split(","):
            rs = [run(scheme, a.ratio, s, a.epochs, a.dim, a.root) for s in seeds]
            aucs = [r["auc"] for r in rs]
            out[scheme] = rs
            rows.append([scheme, f"{rs[0]['user_item_ratio']:.2f}x", f"{statistics.mean(aucs):.4f}",
                         f"{statistics.stdev(aucs) if len(aucs) > 1 else 0:.4f}", f"{statistics.mean(r['logloss'] for r in rs):.4f}"])
    print(tabulate(rows, headers=["scheme", "user+item ratio", "test AUC (mean)", "AUC std", "logloss"]))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "results": out}, f, indent=1)


if __name__ == "__main__":
    main()
