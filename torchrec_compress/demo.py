"""Demo: DLRM on synthetic Criteo-like data, uncompressed vs each scheme at the same ratio.

Every run trains ``torchrec.models.dlrm.DLRM`` at the full Criteo Kaggle cardinalities
(33.8M rows; 4.3 GB of fp32 embeddings at dim 32) under ``DistributedModelParallel`` in
one gloo process: the tables are built on ``meta`` and materialized by DMP, and a fused
row-wise Adagrad updates them inside backward, so no dense [rows, dim] gradient is ever
formed. All runs see the same seed, the same batches and the same dense initialisation.
"""
from __future__ import annotations

import gc
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from tabulate import tabulate
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from .config import SchemeConfig, presets
from .data.synthetic import CRITEO_KAGGLE_CARDINALITIES, NUM_DENSE, SyntheticCriteo, cat_names
from .models import build_dlrm, logical_tables
from .modules.compressed_ebc import CompressedEmbeddingBagCollection, replace_configs
from .train.loop import evaluate, local_process_group, shard_for_training, train_steps

DEFAULT_SCHEMES = ("none", "hashing", "qr", "memcom")  # "none" = uncompressed; any registry preset may be named
META = torch.device("meta")
CPU = torch.device("cpu")


@dataclass
class RunResult:
    """One row of the demo table."""

    scheme: str
    compressed_tables: List[str]
    embedding_bytes: int
    uncompressed_bytes: int
    ratio: float
    table_ratios: Dict[str, float]
    train_loss: float
    eval_auc: float
    eval_logloss: float
    samples_per_s: float
    setup_s: float
    train_s: float
    losses: List[float] = field(repr=False, default_factory=list)


def make_tables(cardinalities: Sequence[int], dim: int) -> List[EmbeddingBagConfig]:
    """One table ``t_cat_i`` of ``cardinalities[i]`` rows x ``dim`` per feature ``cat_i``."""
    return logical_tables(cat_names(len(cardinalities)), cardinalities, dim)


def qualifying_schemes(tables: Sequence[EmbeddingBagConfig], scheme: str, ratio: float) -> Dict[str, SchemeConfig]:
    """``{table: scheme(ratio=ratio)}`` for the tables the scheme can compress by ~``ratio``.

    A table qualifies when the scheme config accepts it (QR raises ``ValueError`` below
    ~(2 ratio)^2 rows, MEmCom below ~ratio x dim) and reaches at least 95% of the ratio
    (Hashing always builds, but a 10-row table cannot be compressed 16x: it keeps >= 1 row).
    """
    if scheme == "none":
        return {}
    make = presets()[scheme]
    out: Dict[str, SchemeConfig] = {}
    for t in tables:
        cfg = make(ratio, t.embedding_dim)
        try:
            probe = CompressedEmbeddingBagCollection([t], {t.name: cfg}, device=META)
        except ValueError:
            continue
        if probe.memory_report().total.ratio >= 0.95 * ratio:
            out[t.name] = cfg
    return out


def build_model(tables: Sequence[EmbeddingBagConfig], schemes: Dict[str, SchemeConfig], dim: int, seed: int) -> torch.nn.Module:
    """DLRM with its embeddings on ``meta`` (DMP materializes them) and dense layers on CPU;
    the same dense initialisation (``seed``) for every scheme."""
    return build_dlrm(replace_configs(list(tables)), NUM_DENSE, [64], [64, 32, 1], schemes, seed=seed)


def train_and_eval(
    name: str,
    tables: Sequence[EmbeddingBagConfig],
    schemes: Dict[str, SchemeConfig],
    train: Sequence[Batch],
    held_out: Sequence[Batch],
    dim: int,
    seed: int,
    lr_sparse: float,
    lr_dense: float,
    progress: bool = True,
) -> RunResult:
    """Train one DLRM under single-process DMP on ``train``, evaluate on ``held_out``."""
    t0 = time.perf_counter()
    model = build_model(tables, schemes, dim, seed)
    ebc = model.sparse_arch.embedding_bag_collection
    if not isinstance(ebc, CompressedEmbeddingBagCollection):  # uncompressed: same accounting, no scheme
        ebc = CompressedEmbeddingBagCollection(replace_configs(list(ebc.embedding_bag_configs())), {}, device=META)
    report = ebc.memory_report()
    dmp, dense_opt = shard_for_training(model, model.sparse_arch, lr_sparse, lr_dense)
    setup_s = time.perf_counter() - t0
    batch_size = train[0].labels.numel()
    losses, train_s, _ = train_steps(dmp, dense_opt, train, desc=name, total=len(train) * batch_size, progress=progress)
    auc, logloss = evaluate(dmp, held_out)
    result = RunResult(
        scheme=name,
        compressed_tables=sorted(schemes),
        embedding_bytes=report.total.compressed_bytes,
        uncompressed_bytes=report.total.uncompressed_bytes,
        ratio=report.total.ratio,
        table_ratios={t: m.ratio for t, m in report.tables.items()},
        train_loss=sum(losses[-20:]) / len(losses[-20:]),
        eval_auc=auc,
        eval_logloss=logloss,
        samples_per_s=len(train) * batch_size / train_s,
        setup_s=setup_s,
        train_s=train_s,
        losses=losses,
    )
    del dmp, model, ebc, dense_opt  # one model alive at a time: the uncompressed one is 4.3 GB
    gc.collect()
    return result


def run_demo(
    steps: int = 300,
    batch_size: int = 4096,
    dim: int = 32,
    ratio: float = 16.0,
    eval_batches: int = 10,
    seed: int = 0,
    schemes: Sequence[str] = ("none", "hashing", "qr", "memcom"),
    out: Optional[str] = "runs/demo.json",
    cardinalities: Sequence[int] = CRITEO_KAGGLE_CARDINALITIES,
    lr_sparse: float = 0.05,
    lr_dense: float = 0.05,
    progress: bool = True,
) -> Dict[str, object]:
    """Train and evaluate DLRM once per scheme; print a table, write JSON to ``out``.

    Returns ``{"config": ..., "results": [RunResult as dict, ...], "wall_s": ...}``.
    """
    known = ["none", *presets()]
    unknown = [s for s in schemes if s not in known]
    if unknown:
        raise ValueError(f"unknown schemes {unknown}; choose from {known}")
    if steps < 1 or batch_size < 1 or eval_batches < 1:
        raise ValueError(f"steps, batch_size and eval_batches must be >= 1, got {steps}, {batch_size}, {eval_batches}")
    t0 = time.perf_counter()
    tables = make_tables(cardinalities, dim)
    # the same batches for every run, generated once (a 4096 batch is ~5 ms)
    train = list(SyntheticCriteo(cardinalities, batch_size, steps, seed=seed, split="train"))
    held_out = list(SyntheticCriteo(cardinalities, batch_size, eval_batches, seed=seed, split="eval"))

    results: List[RunResult] = []
    with local_process_group():  # DMP needs a process group; world size 1, local only
        for name in schemes:
            plan = qualifying_schemes(tables, name, ratio)
            if progress:
                skipped = [t.name for t in tables if t.name not in plan]
                print(f"{name}: uncompressed baseline, {len(tables)} tables" if name == "none" else
                      f"{name}: compressing {len(plan)} tables at {ratio:g}x; left uncompressed (too small): {', '.join(skipped) or '-'}")
            results.append(train_and_eval(name, tables, plan, train, held_out, dim, seed, lr_sparse, lr_dense, progress))

    wall_s = time.perf_counter() - t0
    summary: Dict[str, object] = {
        "config": dict(steps=steps, batch_size=batch_size, dim=dim, ratio=ratio, eval_batches=eval_batches, seed=seed,
                       schemes=list(schemes), cardinalities=list(cardinalities), lr_sparse=lr_sparse, lr_dense=lr_dense),
        "results": [asdict(r) for r in results],
        "wall_s": wall_s,
    }
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(summary, f, indent=1)
    if progress:
        print(format_table(results))
        print(f"wall time {wall_s:.1f} s" + (f"; results in {out}" if out else ""))
    return summary


def format_table(results: Sequence[RunResult]) -> str:
    rows = [
        [r.scheme, _fmt_bytes(r.embedding_bytes), f"{r.ratio:.2f}x", len(r.compressed_tables),
         f"{r.train_loss:.4f}", f"{r.eval_auc:.4f}", f"{r.eval_logloss:.4f}", f"{r.samples_per_s:,.0f}"]
        for r in results
    ]
    return tabulate(rows, headers=["scheme", "emb bytes", "ratio", "tables", "train loss", "eval AUC", "eval logloss", "samples/s"])


def _fmt_bytes(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB")
    i = min(len(units) - 1, int(math.log(max(n, 1), 1024)))
    return f"{n / 1024 ** i:.1f} {units[i]}"
