"""``train(cfg)``: one training run from a :class:`RunConfig`, in one process or under torchrun/torchx."""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import time
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torchrec.datasets.utils import Batch

from ..data.criteo import CriteoTSV
from ..data.frappe import FRAPPE_CARDINALITIES, FRAPPE_FIELDS, load_frappe_splits
from ..data.npy import CriteoNpy, MultiHotCriteoNpy
from ..data.realistic import RealisticSynthetic
from ..data.synthetic import CRITEO_KAGGLE_CARDINALITIES, SyntheticCriteo, cat_names
from ..distributed.planner import CompressionPlan, parse_bytes, plan_compression_
from ..models import build_dlrm, logical_tables
from ..modules.compressed_ebc import CompressedEmbeddingBagCollection
from .checkpoint import Progress, load_checkpoint, save_checkpoint
from .config import CSV_KINDS, SYNTHETIC_KINDS, RunConfig, lr_scale
from .faults import maybe_kill
from .loop import local_process_group, predictions, shard_for_training, train_steps
from .metrics import auc, binary_metrics, ne_from_states, ne_states
from .report import MLPerfLog, ScalarLog, plot_curves

if TYPE_CHECKING:
    from ..data.frappe import FrappeSplit
    from ..data.tabular import CtrData


@functools.lru_cache(maxsize=2)
def _in_memory(kind: str, source: str) -> Tuple["FrappeSplit", "FrappeSplit", "FrappeSplit"]:
    """(train, eval, test) of a data set held in memory (Frappe's folder, an Avazu /
    MovielensLatest CSV), read and split once per process rather than every epoch."""
    if kind == "frappe":
        return load_frappe_splits(source)
    return _csv(kind, source).splits


@functools.lru_cache(maxsize=2)
def _csv(kind: str, path: str) -> "CtrData":
    """An Avazu / MovielensLatest CSV, read once per process: its vocabularies size the tables."""
    from ..data.avazu import load_avazu
    from ..data.movielens import load_movielens

    return (load_avazu if kind == "avazu_csv" else load_movielens)(path)


def _features(cfg: RunConfig) -> Tuple[List[str], List[int], int]:
    """(feature names, table sizes, dense inputs) of the configured data."""
    if cfg.data.kind == "frappe":
        return FRAPPE_FIELDS, FRAPPE_CARDINALITIES, 1
    if cfg.data.kind in CSV_KINDS:
        d = _csv(cfg.data.kind, cfg.data.train_paths[0])
        return list(d.features), list(d.cardinalities), d.dense_in
    cards = cfg.data.cardinalities or CRITEO_KAGGLE_CARDINALITIES
    return cat_names(len(cards)), list(cards), 13


def has_test_split(cfg: RunConfig) -> bool:
    """Whether the data has a held-out test split besides the evaluation (validation) one."""
    return cfg.data.kind in SYNTHETIC_KINDS + ("frappe",) + CSV_KINDS


def _batches(cfg: RunConfig, split: str, epoch: int, rank: int, world: int) -> Iterator[Batch]:
    """``split``: ``train``, ``eval`` (validation: periodic evaluation, model selection) or
    ``test`` (held out, evaluated once at the end; see :func:`has_test_split`)."""
    d = cfg.data
    cards = d.cardinalities or CRITEO_KAGGLE_CARDINALITIES
    if d.kind in SYNTHETIC_KINDS:
        n = max(1, (d.train_batches if split == "train" else d.eval_batches) // world)
        # n global batches, split over the ranks (global batch i goes to rank i mod world); one hidden
        # model (train.seed), fresh training samples every epoch, the same evaluation samples
        generator = RealisticSynthetic if d.kind == "synthetic" else SyntheticCriteo
        yield from generator(cards, d.batch_size, n, seed=cfg.train.seed, split=split, rank=rank, world_size=world,
                                   multi_hot=d.multi_hot or None, start=epoch * n if split == "train" else 0)
    elif d.kind in ("frappe",) + CSV_KINDS:
        tr, va, te = _in_memory(d.kind, d.root if d.kind == "frappe" else d.train_paths[0])
        if split != "train":  # every row once, the same number of batches on every rank
            yield from (va if split == "eval" else te).rank_batches(d.batch_size, rank, world)
            return
        for i, b in enumerate(tr.batches(d.batch_size, shuffle_seed=cfg.train.seed * 100 + epoch)):
            if i % world == rank:
                yield b
    elif d.kind in ("criteo_npy", "criteo_multihot"):
        days, stage = (d.train_days, "train") if split == "train" else (d.eval_days, "val")
        if d.kind == "criteo_npy":
            yield from CriteoNpy(d.root, days, cards, d.batch_size, stage=stage, rank=rank, world_size=world)
        else:
            yield from MultiHotCriteoNpy(d.root, days, cards, d.multi_hot, d.batch_size, stage=stage, rank=rank, world_size=world)
    else:
        paths = d.train_paths if split == "train" else (d.eval_paths or d.train_paths)
        yield from CriteoTSV(paths, d.cardinalities, d.batch_size, rank=rank, world_size=world)


def _model(cfg: RunConfig, world: int = 1, table_device: torch.device = torch.device("meta")
           ) -> Tuple[torch.nn.Module, Optional[CompressionPlan]]:
    """DLRM / DLRM_DCN with tables on ``table_device`` (meta: for DMP), compressed by the
    configured schemes or, for ``schemes: auto``, by the planner (whose plan also holds the
    sharding plan)."""
    names, cards, n_dense = _features(cfg)
    m = cfg.model
    tables = logical_tables(names, cards, m.embedding_dim)
    unknown = sorted(set(cfg.schemes) - {t.name for t in tables})
    if unknown:
        raise ValueError(f"schemes: unknown tables {unknown}; tables are {[t.name for t in tables]}")
    model = build_dlrm(tables, n_dense, m.dense_arch, m.over_arch, None if cfg.auto else cfg.schemes, kind=m.kind,
                       table_device=table_device, dcn_num_layers=m.dcn_num_layers, dcn_low_rank_dim=m.dcn_low_rank_dim, seed=cfg.train.seed)
    if cfg.auto:
        pooling = {f"t_{f}": float(h) for f, h in zip(names, cfg.data.multi_hot)} if cfg.data.multi_hot else None
        plan = plan_compression_(model, world, parse_bytes(cfg.plan.memory_per_rank), pooling_factors=pooling,
                                 batch_size=cfg.data.batch_size)
        return model, plan
    return model, None


def _gathered(p: Progress) -> Progress:
    """``p`` with every rank's epoch metrics state (NE sums, AUC window) merged (collective)."""
    if dist.get_world_size() == 1:
        return p
    ne = p.ne.clone()
    dist.all_reduce(ne)
    parts: List = [None] * dist.get_world_size()
    dist.all_gather_object(parts, p.window_tensors())
    window = [(torch.cat([x[0] for x in parts]), torch.cat([x[1] for x in parts]))]
    return dataclasses.replace(p, ne=ne, window=window)


def _status(dmp: torch.nn.Module) -> Dict[str, Dict[str, object]]:
    """Where each scheme's own procedure stands (``TableScheme.status``; replicated state)."""
    return {t.name: m.scheme(t.name).status() for m in dmp.modules() if isinstance(m, CompressedEmbeddingBagCollection)
            for t in m.embedding_bag_configs() if m.scheme(t.name).status()}


def train(cfg: RunConfig, progress: bool = True, resume: bool = False) -> Dict[str, object]:
    """Train with periodic evaluation and checkpoints; rank 0 writes ``<out>/results.json``
    (and TensorBoard scalars, ``curves.png``). ``resume`` continues from the latest
    checkpoint, under any world size. Returns the results."""
    with local_process_group():
        return _train(cfg, progress, resume)


def _train(cfg: RunConfig, show: bool, resume: bool) -> Dict[str, object]:
    rank, world = dist.get_rank(), dist.get_world_size()
    tc = cfg.train
    show = show and rank == 0
    model, plan = _model(cfg, world)
    cebc = model.sparse_arch.embedding_bag_collection
    report = cebc.memory_report() if isinstance(cebc, CompressedEmbeddingBagCollection) else None
    full_bytes = sum(t.num_embeddings * t.embedding_dim * 4 for t in cebc.embedding_bag_configs())
    schemes = plan.schemes if plan is not None else cfg.schemes
    if plan is not None and show:
        print(plan, flush=True)
    dmp, opt = shard_for_training(model, model.sparse_arch, tc.lr_sparse, tc.lr_dense, sparse_optimizer=tc.sparse_optimizer,
                                  plan=plan.sharding_plan if plan is not None else None)
    base_lrs = [g["lr"] for g in opt.param_groups]  # before a checkpoint's (scheduled) rates are loaded
    p = load_checkpoint(cfg, dmp, opt) if resume else Progress()
    fused = dmp.fused_optimizer
    log = ScalarLog(os.path.join(cfg.out, "tensorboard") if tc.tensorboard and rank == 0 else None)
    if not resume:
        log.scalar("memory/embedding_bytes", report.total.compressed_bytes if report else full_bytes, 0)
    schedule = tc.lr_warmup_steps or tc.lr_decay_steps
    ml = MLPerfLog(os.path.join(cfg.out, "mlperf.log") if tc.mlperf_log and rank == 0 else None)
    ml.event("SUBMISSION_BENCHMARK", "dlrm_dcnv2")
    ml.event("GLOBAL_BATCH_SIZE", cfg.data.batch_size * world)
    ml.event("OPT_BASE_LR", tc.lr_sparse)
    ml.event("SEED", tc.seed)
    ml.start("RUN_START")

    def evaluate(tag: str) -> Dict[str, object]:
        ml.start("EVAL_START", epoch_num=p.epoch)
        ev = binary_metrics(*predictions(dmp, _batches(cfg, "eval", p.epoch, rank, world)))
        dmp.train()
        ml.event("EVAL_ACCURACY", ev["auc"], epoch_num=p.epoch, step=p.steps)
        status = _status(dmp)
        if status:
            ev["schemes"] = status
        ml.end("EVAL_STOP", epoch_num=p.epoch)
        for k in ("auc", "ne", "logloss"):
            log.scalar(f"eval/{k}", ev[k], p.steps)
        if show:
            print(f"{tag} (step {p.steps}): eval AUC {ev['auc']:.4f}, NE {ev['ne']:.4f}, logloss {ev['logloss']:.4f}", flush=True)
        if tc.target_auc and ev["auc"] >= tc.target_auc and not p.stopped:
            p.stopped = "target_auc"
        return ev

    def before_step(i: int) -> None:
        if schedule:
            scale = lr_scale(p.steps, tc)
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * scale
            for g in fused.param_groups:
                g["lr"] = tc.lr_sparse * scale
            fused.step()  # in-backward fused optimizers only take the new rate here

    def after_step(i: int, loss: float, logits: torch.Tensor, labels: torch.Tensor) -> bool:
        p.steps += 1
        p.global_batches += world
        maybe_kill("step", rank, p.steps)
        p.losses.append(loss)
        p.ne += ne_states(logits, labels)
        p.window.append((logits.float(), labels.float()))
        if len(p.window) >= 64:
            p.window = [p.window_tensors()]
        log.scalar("train/loss", loss, p.steps)
        if schedule:
            log.scalar("train/lr_scale", lr_scale(p.steps - 1, tc), p.steps)
        if tc.eval_every and p.steps % tc.eval_every == 0:
            p.evals.append({"step": p.steps, "epoch": p.epoch, **evaluate("eval")})
        if tc.max_steps and p.steps >= tc.max_steps and not p.stopped:
            p.stopped = "max_steps"
        if tc.checkpoint_every and p.steps % tc.checkpoint_every == 0 or p.stopped:
            save_checkpoint(cfg, dmp, opt, p)
        return bool(p.stopped)

    while p.epoch < tc.epochs and not p.stopped:
        skip = p.global_batches // world  # mid-epoch resume: this rank's batches already trained on
        p.global_batches = skip * world
        epoch_start = len(p.losses) - skip
        batches = itertools.islice(_batches(cfg, "train", p.epoch, rank, world), skip, None)
        ml.start("EPOCH_START", epoch_num=p.epoch)
        _, seconds, samples = train_steps(dmp, opt, batches, desc=f"epoch {p.epoch}", progress=show,
                                          before_step=before_step, after_step=after_step)
        ml.end("EPOCH_STOP", epoch_num=p.epoch)
        if p.stopped == "max_steps":
            break
        if tc.eval_every and p.evals and p.evals[-1]["step"] == p.steps:  # just evaluated at this step
            ev = {k: v for k, v in p.evals[-1].items() if k not in ("step", "epoch")}
        else:
            ev = evaluate(f"epoch {p.epoch}")
        merged = _gathered(p)
        losses = p.losses[epoch_start:]
        p.epochs.append({"epoch": p.epoch, "steps": len(losses), "train_loss": sum(losses) / max(1, len(losses)),
                         "train_ne": ne_from_states(merged.ne), "train_auc": auc(*merged.window_tensors()),
                         "samples_per_s": samples / max(seconds, 1e-9), **{f"eval_{k}": v for k, v in ev.items()}})
        p.epoch, p.global_batches, p.ne, p.window = p.epoch + 1, 0, torch.zeros(4, dtype=torch.float64), []
        if tc.checkpoint:
            save_checkpoint(cfg, dmp, opt, p)
    if report is not None:  # what the schemes deploy now (e.g. MPE's chosen precisions), not at the start
        report = cebc.memory_report()
    test = None
    if has_test_split(cfg) and p.stopped != "max_steps":  # held out: once, at the end, never for choices
        test = binary_metrics(*predictions(dmp, _batches(cfg, "test", p.epoch, rank, world)))
        if show:
            print(f"test: AUC {test['auc']:.4f}, NE {test['ne']:.4f}, logloss {test['logloss']:.4f}", flush=True)
    results = {
        "world_size": world, "epochs": p.epochs, "evals": p.evals, "test": test, "steps": p.steps, "stopped": p.stopped or None,
        "losses": p.losses, "schemes": {k: repr(v) for k, v in schemes.items() if v is not None},
        "embedding_bytes": report.total.compressed_bytes if report else full_bytes, "uncompressed_bytes": full_bytes,
        "ratio": report.total.ratio if report else 1.0, "training_bytes": report.total.training_bytes if report else 0,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if report is not None and report.total.paper_bytes is not None:  # e.g. FIITED: also as its paper counts (kept chunks only)
        results.update(paper_bytes=report.total.paper_bytes, paper_ratio=report.total.paper_ratio)
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        if tc.plots:
            plot_curves(results, os.path.join(cfg.out, "curves.png"))
    log.close()
    reached = not tc.target_auc or p.stopped == "target_auc"  # MLPerf: a run succeeds when it reaches the target
    ml.end("RUN_STOP", status="success" if reached else "aborted")
    return results
