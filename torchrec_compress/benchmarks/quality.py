"""Quality against compression: every scheme at every reachable ratio vs the same DLRM uncompressed.

Same model (DLRM, dim ``dim``), seeds, epochs, batches and optimizers (fused row-wise
Adagrad for tables, Adagrad for the rest) for every run; only the large tables (``>=
min_rows`` rows) are compressed, as a planner would leave the small ones exact. Every
scheme (its preset from the registry) runs its own procedure inside training, as under
``torchrec-compress train``: FreqThreshold counts then fits, Saec warms up, clusters and
fine-tunes, MPE counts, searches and retrains (QAT); ``int8`` /
``int4`` are the uncompressed model exported with FBGEMM row-wise quantization of the
large tables (their ratio is fixed by the format). Reported per (scheme, ratio): test AUC,
log loss and NE (mean and spread over seeds), embedding bytes and achieved ratio (of the
compressed tables, counting every map; FIITED also as its paper counts, ``paper_ratio``:
the kept chunks only), train seconds.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Optional, Sequence

import torch
from tabulate import tabulate
from torchrec import EmbeddingBagConfig
from torchrec.modules.embedding_configs import DataType
from torchrec.datasets.utils import Batch
from tqdm import tqdm

from ..config import SchemeConfig, presets, ranked_presets
from ..distributed.state import single_rank_full_state_dict
from ..models import build_dlrm, logical_tables
from ..modules.compressed_ebc import CompressedEmbeddingBagCollection
from ..modules.mch import ManagedCollisionTables, mch_bytes, zch_size_for
from ..quant.export import export, quantized_memory_report
from ..train.loop import local_process_group, predictions, shard_for_training, train_steps
from ..train.metrics import binary_metrics

if TYPE_CHECKING:
    from ..data.tabular import CtrData

QUANT = ("int8", "int4")  # FBGEMM row-wise quantization of the uncompressed tables
STORAGE = ("fp16",)  # the large tables trained and stored as TorchRec DataType.FP16 (an equal-bytes baseline, 2x)
FIXED = QUANT + STORAGE  # formats whose ratio is fixed by the format
TORCHREC = ("mch",)  # TorchRec's managed-collision tables (LFU), sized to each ratio: an equal-bytes baseline
BASELINES = ("md",) + TORCHREC + FIXED  # the equal-bytes alternatives a scheme has to beat


def all_schemes() -> List[str]:
    """Every benchmark name: the registry's presets (``TableScheme.presets``), TorchRec's MCH,
    fp16 storage and the post-training formats."""
    return list(presets()) + list(TORCHREC) + list(FIXED)


@dataclasses.dataclass
class QualityData:
    """A data set for the benchmark: features, table sizes and batch streams."""

    name: str
    features: List[str]
    cardinalities: List[int]
    dense_in: int
    train: Callable[[int, int], Iterable[Batch]]  # (epoch, seed) -> training batches
    validation: Callable[[], Iterable[Batch]]  # for every choice (presets, epochs): model selection
    test: Callable[[], Iterable[Batch]]  # held out: reported, never tuned on
    split: str = ""  # how the rows were split, for the results
    ids_by_frequency: bool = False  # ids numbered by descending train frequency (vocabularies built by count)

    def tables(self, dim: int) -> List[EmbeddingBagConfig]:
        return logical_tables(self.features, self.cardinalities, dim)


def frappe_data(root: str, batch_size: int = 512) -> QualityData:
    """Frappe: the validation file split 90/10 (seeded) into train and validation, the test file held out."""
    from ..data.frappe import FRAPPE_CARDINALITIES, FRAPPE_FIELDS, load_frappe_splits

    train, val, test = load_frappe_splits(root)
    return QualityData("frappe", FRAPPE_FIELDS, FRAPPE_CARDINALITIES, 1,
                       lambda e, s: train.batches(batch_size, shuffle_seed=s * 100 + e), lambda: val.batches(4096),
                       lambda: test.batches(4096), split=f"train {train.labels.numel()} / validation {val.labels.numel()} "
                                                            f"(frappe.validation.libfm, seeded 90/10) / test {test.labels.numel()} (frappe.test.libfm)")


def ctr_data(d: "CtrData", batch_size: int = 512) -> QualityData:
    """A categorical-only CTR set read into memory (Avazu, MovielensLatest): its fixed splits."""
    train, val, test = d.splits
    return QualityData(d.name, list(d.features), list(d.cardinalities), d.dense_in,
                       lambda e, s: train.batches(batch_size, shuffle_seed=s * 100 + e), lambda: val.batches(4096),
                       lambda: test.batches(4096), split=f"seeded 80/10/10: train {len(train)} / validation {len(val)} / test {len(test)} rows",
                       ids_by_frequency=True)  # build_vocabulary numbers ids by train frequency


def avazu_data(path: str, batch_size: int = 128) -> QualityData:
    """The Avazu sample (one hour, 9,999 rows), train-only vocabularies (ids seen once share the
    OOV row); batches of 128, so that 2 epochs (125 steps) finish every scheme's procedure."""
    from ..data.avazu import load_avazu

    return ctr_data(load_avazu(path), batch_size)


def movielens_data(path: str, batch_size: int = 2048) -> QualityData:
    """MovielensLatest_x1's test split (200,686 rows), re-split 80/10/10, train-only vocabularies."""
    from ..data.movielens import load_movielens

    return ctr_data(load_movielens(path), batch_size)


def synthetic_data(cardinalities: Sequence[int], batches: int = 200, batch_size: int = 512, test_batches: int = 20,
                   first_order: bool = False) -> QualityData:
    """The realistic synthetic generator (``RealisticSynthetic``; ``first_order``: the older
    ``SyntheticCriteo``, kept for regression): fresh samples every epoch, fixed validation and
    test streams."""
    from ..data.realistic import RealisticSynthetic
    from ..data.synthetic import SyntheticCriteo, cat_names

    cards = list(cardinalities)
    gen = SyntheticCriteo if first_order else RealisticSynthetic
    return QualityData("synthetic_first_order" if first_order else "synthetic", cat_names(len(cards)), cards, 13,
                       lambda e, s: gen(cards, batch_size, batches, seed=0, split="train", start=e * batches),
                       lambda: gen(cards, batch_size, test_batches, seed=0, split="eval"),
                       lambda: gen(cards, batch_size, test_batches, seed=0, split="test"),
                       split=f"fresh train samples every epoch; validation and test: {test_batches} x {batch_size} samples of disjoint streams")


def criteo_tsv_data(path: str, cardinalities: Sequence[int], batch_size: int = 125, held_out: float = 0.1) -> QualityData:
    """A Criteo TSV file (e.g. the 10k-row Kaggle sample, rows in time order): the first 80%
    of its batches train, the next ``held_out`` validate, the last ``held_out`` test. Batches
    of 125: the sample's 64 training batches per epoch let 2 epochs finish every procedure."""
    from ..data.criteo import CriteoTSV
    from ..data.synthetic import cat_names

    batches = list(CriteoTSV([path], list(cardinalities), batch_size))
    n = max(1, int(round(len(batches) * held_out)))
    if len(batches) < 3 * n:
        raise ValueError(f"{path}: {len(batches)} batches of {batch_size} are too few for train / validation / test splits")
    train, val, test = batches[:-2 * n], batches[-2 * n:-n], batches[-n:]
    return QualityData("criteo", cat_names(26), list(cardinalities), 13, lambda e, s: train, lambda: val, lambda: test,
                       split=f"rows in file order: train {len(train)} / validation {n} / test {n} batches of {batch_size}")


def _tables(data: QualityData, dim: int, fp16: Sequence[str] = ()) -> List[EmbeddingBagConfig]:
    return [dataclasses.replace(t, data_type=DataType.FP16) if t.name in fp16 else t for t in data.tables(dim)]


def _model(data: QualityData, dim: int, schemes: Optional[Dict[str, SchemeConfig]], seed: int, fp16: Sequence[str] = (),
           zch: Optional[Dict[str, int]] = None):
    model = build_dlrm(_tables(data, dim, fp16), data.dense_in, [32], [64, 32, 1], schemes, seed=seed)
    if zch:  # TorchRec's MCH in place of the large tables
        model.sparse_arch.embedding_bag_collection = ManagedCollisionTables(data.tables(dim), zch, device=torch.device("meta"))
    dmp, opt = shard_for_training(model, model.sparse_arch, lr_sparse=0.05, lr_dense=0.01)
    return model, dmp, opt


def _unsharded(data: QualityData, dim: int, schemes: Optional[Dict[str, SchemeConfig]], state: Dict[str, torch.Tensor]) -> torch.nn.Module:
    model = build_dlrm(data.tables(dim), data.dense_in, [32], [64, 32, 1], schemes, table_device=torch.device("cpu"))
    model.load_state_dict(state)
    return model


def run_one(data: QualityData, scheme: str, ratio: float, seed: int, epochs: int = 5, dim: int = 16, min_rows: int = 500
            ) -> Dict[str, object]:
    """Train and test one (scheme, ratio, seed); ``scheme`` "none" is the uncompressed baseline.
    Every scheme runs its own procedure inside training (counting, warm-up, search), exactly
    as under ``torchrec-compress train``. Raises ValueError when the scheme cannot reach
    ``ratio`` on these tables."""
    big = [f"t_{f}" for f, v in zip(data.features, data.cardinalities) if v >= min_rows]
    if scheme in ranked_presets() and not data.ids_by_frequency:
        raise ValueError(f"{scheme} assumes ids numbered by frequency; {data.name}'s are not")
    make = presets().get(scheme)
    cfg = make(ratio, dim) if make is not None else None
    schemes = {t: cfg for t in big} if cfg is not None else None
    if schemes:  # fail fast (unreachable ratio) before any training
        CompressedEmbeddingBagCollection(data.tables(dim), schemes, device=torch.device("meta"))
    zch, ids = None, {}
    if scheme == "mch":
        first = next(iter(data.train(0, seed))).sparse_features
        ids = {f"t_{f}": first[f].values().numel() for f in data.features}
        zch = {t.name: zch_size_for(t, ratio, ids[t.name]) for t in data.tables(dim) if t.name in big}
        cfg = {"zch_size": zch, "eviction": "LFU", "eviction_interval": 1}
    t0 = time.perf_counter()
    fp16 = big if scheme == "fp16" else []
    model, dmp, opt = _model(data, dim, schemes, seed, fp16, zch)
    steps = 0
    for e in range(epochs):
        losses, _, _ = train_steps(dmp, opt, data.train(e, seed), progress=False)
        steps += len(losses)
    seconds = time.perf_counter() - t0
    ebc = model.sparse_arch.embedding_bag_collection
    if isinstance(ebc, CompressedEmbeddingBagCollection):  # a row must be what the scheme deploys, not its warm-up
        unfinished = {t: ebc.scheme(t).status() for t in big if not ebc.scheme(t).fitted()}
        if unfinished:
            raise ValueError(f"its procedure did not finish in {steps} steps ({epochs} epochs): {unfinished}")
    if scheme in QUANT:  # evaluated as exported to FBGEMM's quantized tables
        unsharded = _unsharded(data, dim, schemes, single_rank_full_state_dict(dmp))
        inference = export(unsharded, dtypes={t: scheme for t in big}, default="fp32")
        rep = quantized_memory_report(inference)
        evaluated = inference
    else:
        if not isinstance(ebc, CompressedEmbeddingBagCollection):  # uncompressed, fp16 or MCH: sized as the plain tables
            ebc = CompressedEmbeddingBagCollection(_tables(data, dim, fp16), {}, device=torch.device("meta"))
        rep = ebc.memory_report()
        evaluated = dmp
    metrics = binary_metrics(*predictions(evaluated, data.test()))
    metrics.update({f"val_{k}": v for k, v in binary_metrics(*predictions(evaluated, data.validation())).items() if k != "samples"})
    stored = sum(mch_bytes(zch[t], dim, ids[t]) if zch else rep.tables[t].compressed_bytes for t in big)
    full = sum(rep.tables[t].uncompressed_bytes for t in big)
    out = {**metrics, "bytes": stored, "uncompressed_bytes": full, "achieved_ratio": full / stored, "train_s": seconds,
           "steps": steps, "config": repr(cfg) if cfg is not None else None}
    paper = [rep.tables[t].paper_bytes for t in big] if not zch else []
    if any(b is not None for b in paper):  # e.g. FIITED: also as its paper counts (kept chunks only), beside the honest bytes
        kept = sum(rep.tables[t].compressed_bytes if b is None else b for t, b in zip(big, paper))
        out.update(paper_bytes=kept, paper_ratio=full / max(1, kept))
    return out


def bench_quality(data: QualityData, schemes: Sequence[str], ratios: Sequence[float], seeds: Sequence[int], epochs: int = 5,
                  dim: int = 16, min_rows: int = 500, progress: bool = True) -> Dict[str, object]:
    """Every (scheme, ratio) and the uncompressed baseline over ``seeds``; one process."""
    unknown = sorted(set(schemes) - set(all_schemes()))
    if unknown:
        raise ValueError(f"bench quality: unknown schemes {unknown}; use any of {all_schemes()}")
    jobs = [("none", 1.0)] + [(s, 0.0) for s in schemes if s in FIXED] + [(s, float(r)) for s in schemes if s not in FIXED for r in ratios]
    rows: List[Dict[str, object]] = []
    with local_process_group(), tqdm(total=len(jobs) * len(seeds), desc="bench quality", disable=not progress) as bar:
        for scheme, ratio in jobs:
            runs, skipped = [], None
            for seed in seeds:
                try:
                    runs.append(run_one(data, scheme, ratio, seed, epochs, dim, min_rows))
                except ValueError as e:  # unreachable ratio, or a procedure longer than the run: recorded, not fatal
                    skipped = str(e)
                bar.update(1)
                if skipped:
                    bar.update(len(seeds) - len(runs) - 1)
                    break
            rows.append(_summary(scheme, ratio, runs, skipped))
    base = rows[0]["auc"]
    for r in rows:
        r["d_auc"] = None if r["auc"] is None else r["auc"] - base
    return {"data": data.name, "split": data.split, "epochs": epochs, "dim": dim, "min_rows": min_rows, "seeds": list(seeds), "rows": rows,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def _summary(scheme: str, ratio: float, runs: List[Dict[str, object]], skipped: Optional[str]) -> Dict[str, object]:
    if not runs:
        return {"scheme": scheme, "ratio": ratio, "auc": None, "skipped": skipped}
    out: Dict[str, object] = {"scheme": scheme, "ratio": ratio, "runs": runs}
    paper = ("paper_ratio", "paper_bytes") if all("paper_ratio" in r for r in runs) else ()
    for k in ("auc", "logloss", "ne", "val_auc", "val_logloss", "achieved_ratio", "bytes", "train_s") + paper:
        vals = [float(r[k]) for r in runs]
        out[k] = statistics.mean(vals)
        out[f"{k}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return out


def format_quality(res: Dict[str, object], fmt: str = "simple") -> str:
    """The results as a table (``fmt``: a tabulate format, e.g. ``github`` for BENCHMARKS.md)."""
    table = []
    paper = any("paper_ratio" in r for r in res["rows"])  # a column only where a scheme's paper counts fewer bytes (FIITED)
    for r in res["rows"]:
        if r["auc"] is None:
            table.append([name(r), f"{r['ratio']:g}x", "-"] + ["-"] * paper + ["-"] * 5 + [f"skipped: {r['skipped'][:70]}"])
            continue
        target = "" if r["scheme"] == "none" else f"{r['ratio']:g}x" if r["ratio"] else "fixed"
        row = [name(r), target, f"{r['achieved_ratio']:.2f}x"]
        if paper:
            row.append(f"{r['paper_ratio']:.2f}x" if "paper_ratio" in r else "-")
        table.append(row + [f"{r['bytes'] / 2**20:.3f} MiB", f"{r['auc']:.4f} +- {r['auc_std']:.4f}", f"{r['d_auc']:+.4f}",
                            f"{r['logloss']:.4f}", f"{r['val_auc']:.4f}" if "val_auc" in r else "-", f"{r['train_s']:.1f}"])
    return tabulate(table, headers=["scheme", "target", "achieved"] + ["as its paper counts"] * paper
                    + ["bytes (compressed tables)", "test AUC (mean +- std)", "dAUC", "test logloss", "val AUC", "train s"], tablefmt=fmt)


def name(row: Dict[str, object]) -> str:
    """A row's scheme, with equal-bytes baselines marked."""
    return f"{row['scheme']} (baseline)" if row["scheme"] in BASELINES else str(row["scheme"])


def plot_frontier(res: Dict[str, object], path: str) -> Optional[str]:
    """AUC against bytes of the compressed tables (log x), one line per scheme, error bars = std over seeds."""
    from ..train.report import _pyplot

    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    rows = [r for r in res["rows"] if r["auc"] is not None]
    base = rows[0]
    ax.axhline(base["auc"], color="k", ls="--", lw=1, label=f"uncompressed ({base['bytes'] / 2**20:.2f} MiB)")
    ax.axhspan(base["auc"] - 0.002, base["auc"] + 0.002, color="0.9", label="uncompressed +- 0.002")
    for i, scheme in enumerate(dict.fromkeys(r["scheme"] for r in rows[1:])):
        pts = sorted((r["bytes"], r["auc"], r["auc_std"]) for r in rows if r["scheme"] == scheme)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], capsize=3, color=plt.cm.tab20(i % 20),
                    marker="s" if scheme in BASELINES else "o", ls="--" if scheme in BASELINES else "-",
                    label=f"{scheme} (baseline)" if scheme in BASELINES else scheme)  # baselines dashed, square
    ax.set_xscale("log")
    lo = min(r["auc"] for r in rows)
    ax.set_ylim(max(lo - 0.01, 0.5), base["auc"] + 0.01 if not math.isnan(base["auc"]) else None)
    ax.set(xlabel="bytes of the compressed tables (log scale)", ylabel="test AUC",
           title=f"{res['data']}: quality vs memory ({len(res['seeds'])} seeds, {res['epochs']} epochs)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
