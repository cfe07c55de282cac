"""Demo: DLRM on the realistic synthetic generator, uncompressed vs every registered scheme
and the equal-bytes baselines ``md`` (mixed dimension) and ``mch`` (TorchRec's managed
collisions) at the same ratio.

Every run trains ``torchrec.models.dlrm.DLRM`` at Criteo Kaggle cardinalities (capped at
``--max-rows``, 1M by default so that every scheme fits in the 5-minute demo) under
``DistributedModelParallel`` in one gloo process: the tables are built on ``meta`` and
materialized by DMP, and a fused row-wise Adagrad updates them inside backward. All runs
see the same seed, the same batches and the same dense initialisation; every scheme runs
its own procedure (counting, warm-up, search) inside the steps.
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

from .config import SchemeConfig, presets, ranked_presets
from .data.realistic import RealisticSynthetic
from .data.synthetic import CRITEO_KAGGLE_CARDINALITIES, NUM_DENSE, cat_names
from .models import build_dlrm, logical_tables
from .modules.compressed_ebc import CompressedEmbeddingBagCollection, replace_configs
from .modules.mch import ManagedCollisionTables, mch_bytes, zch_size_for
from .train.loop import evaluate, local_process_group, shard_for_training, train_steps

BASELINES = ("mch",)  # besides the registry's presets (md among them): TorchRec's managed-collision tables


def default_schemes() -> List[str]:
    """"none" (uncompressed), every registry preset (the baseline md among them; not those that
    assume ids numbered by frequency), then mch."""
    return ["none", *(p for p in presets() if p not in ranked_presets()), *BASELINES]  # the generator's ids are not ranked
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
    if scheme == "none" or scheme in BASELINES:
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


def mch_sizes(tables: Sequence[EmbeddingBagConfig], ratio: float, ids_per_step: int) -> Dict[str, int]:
    """zch_size per table that MCH can shrink ~``ratio``-fold with its id buffers counted."""
    out = {}
    for t in tables:
        try:
            zch = zch_size_for(t, ratio, ids_per_step)
        except ValueError:
            continue
        if t.num_embeddings * t.embedding_dim * 4 / mch_bytes(zch, t.embedding_dim, ids_per_step) >= 0.95 * ratio:
            out[t.name] = zch
    return out


def build_model(tables: Sequence[EmbeddingBagConfig], schemes: Dict[str, SchemeConfig], dim: int, seed: int,
                zch: Optional[Dict[str, int]] = None) -> torch.nn.Module:
    """DLRM with its embeddings on ``meta`` (DMP materializes them) and dense layers on CPU;
    the same dense initialisation (``seed``) for every scheme; ``zch``: TorchRec's MCH tables."""
    model = build_dlrm(replace_configs(list(tables)), NUM_DENSE, [64], [64, 32, 1], schemes, seed=seed)
    if zch:
        model.sparse_arch.embedding_bag_collection = ManagedCollisionTables(replace_configs(list(tables)), zch, device=META)
    return model


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
    zch: Optional[Dict[str, int]] = None,
) -> RunResult:
    """Train one DLRM under single-process DMP on ``train``, evaluate on ``held_out``."""
    t0 = time.perf_counter()
    model = build_model(tables, schemes, dim, seed, zch)
    ebc = model.sparse_arch.embedding_bag_collection
    if not isinstance(ebc, CompressedEmbeddingBagCollection):  # uncompressed or MCH: the plain tables' accounting
        ebc = CompressedEmbeddingBagCollection(replace_configs(list(ebc.embedding_bag_configs())), {}, device=META)
    report = ebc.memory_report()
    batch_size = train[0].labels.numel()  # one-hot: also each table's ids per step (MCH's history buffer)
    stored = {t: (mch_bytes(zch[t], dim, batch_size) if zch and t in zch else m.compressed_bytes) for t, m in report.tables.items()}
    dmp, dense_opt = shard_for_training(model, model.sparse_arch, lr_sparse, lr_dense)
    setup_s = time.perf_counter() - t0
    losses, train_s, _ = train_steps(dmp, dense_opt, train, desc=name, total=len(train) * batch_size, progress=progress)
    auc, logloss = evaluate(dmp, held_out)
    result = RunResult(
        scheme=name,
        compressed_tables=sorted(zch or schemes),
        embedding_bytes=sum(stored.values()),
        uncompressed_bytes=report.total.uncompressed_bytes,
        ratio=report.total.uncompressed_bytes / sum(stored.values()),
        table_ratios={t: m.uncompressed_bytes / stored[t] for t, m in report.tables.items()},
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
    steps: int = 160,
    batch_size: int = 2048,
    dim: int = 32,
    ratio: float = 8.0,
    eval_batches: int = 10,
    seed: int = 0,
    schemes: Optional[Sequence[str]] = None,
    out: Optional[str] = "runs/demo.json",
    cardinalities: Sequence[int] = tuple(min(v, 1_000_000) for v in CRITEO_KAGGLE_CARDINALITIES),
    lr_sparse: float = 0.05,
    lr_dense: float = 0.05,
    progress: bool = True,
) -> Dict[str, object]:
    """Train and evaluate DLRM once per scheme (default: :func:`default_schemes`); print a
    table, write JSON to ``out`` and the AUC-vs-bytes frontier beside it (``.png``).

    Returns ``{"config": ..., "results": [RunResult as dict, ...], "wall_s": ...}``.
    """
    schemes = list(default_schemes() if schemes is None else schemes)
    known = default_schemes()
    unknown = [s for s in schemes if s not in known]
    if unknown:
        raise ValueError(f"unknown schemes {unknown}; choose from {known}")
    if steps < 1 or batch_size < 1 or eval_batches < 1:
        raise ValueError(f"steps, batch_size and eval_batches must be >= 1, got {steps}, {batch_size}, {eval_batches}")
    t0 = time.perf_counter()
    tables = make_tables(cardinalities, dim)
    # the same batches for every run, generated once (a 4096 batch is ~5 ms)
    world = RealisticSynthetic(cardinalities, batch_size, steps, seed=seed, split="train")
    train = list(world)
    held_out = list(RealisticSynthetic(cardinalities, batch_size, eval_batches, seed=seed, split="eval"))

    results: List[RunResult] = []
    with local_process_group():  # DMP needs a process group; world size 1, local only
        for name in schemes:
            plan = qualifying_schemes(tables, name, ratio)
            zch = mch_sizes(tables, ratio, batch_size) if name == "mch" else None
            if progress:
                skipped = [t.name for t in tables if t.name not in (zch or plan)]
                print(f"{name}: uncompressed baseline, {len(tables)} tables" if name == "none" else
                      f"{name}: compressing {len(zch or plan)} tables at {ratio:g}x; left uncompressed (too small): {', '.join(skipped) or '-'}")
            results.append(train_and_eval(name, tables, plan, train, held_out, dim, seed, lr_sparse, lr_dense, progress, zch))

    wall_s = time.perf_counter() - t0
    summary: Dict[str, object] = {
        "config": dict(steps=steps, batch_size=batch_size, dim=dim, ratio=ratio, eval_batches=eval_batches, seed=seed,
                       schemes=list(schemes), cardinalities=list(cardinalities), lr_sparse=lr_sparse, lr_dense=lr_dense),
        "results": [asdict(r) for r in results],
        "data": f"RealisticSynthetic(seed={seed}): Bayes-optimal AUC {world.bayes_auc():.4f}",
        "wall_s": wall_s,
    }
    plot = None
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(summary, f, indent=1)
        plot = plot_frontier(summary, os.path.splitext(out)[0] + ".png")
    if progress:
        print(format_table(results))
        print(summary["data"])
        print(f"wall time {wall_s:.1f} s" + (f"; results in {out}" if out else "") + (f", frontier plot {plot}" if plot else ""))
    return summary


def plot_frontier(summary: Dict[str, object], path: str) -> Optional[str]:
    """Eval AUC against embedding bytes (log x), one point per run; baselines hollow."""
    from .train.report import _pyplot

    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(summary["results"]):
        baseline = r["scheme"] in ("none", "md", *BASELINES)
        color = plt.cm.tab20(i % 20)  # 13+ variants: tab10 would repeat colours
        ax.scatter(r["embedding_bytes"], r["eval_auc"], s=50, color=color, facecolors="none" if baseline else color,
                   label=r["scheme"] + (" (baseline)" if baseline and r["scheme"] != "none" else ""))
    ax.set_xscale("log")
    ax.set(xlabel="embedding bytes (log scale)", ylabel="eval AUC",
           title=f"demo: {summary['config']['ratio']:g}x, {summary['config']['steps']} steps, {summary['data']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
