"""``train(cfg)``: one training run from a :class:`RunConfig`, in one process or under torchrun/torchx."""
from __future__ import annotations

import json
import os
import time
from typing import Dict, Iterator, List, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.datasets.utils import Batch
from torchrec.metrics.ne import compute_ne, get_ne_states
from torchrec.models.dlrm import DLRM, DLRM_DCN

from ..data.criteo import CriteoTSV
from ..data.frappe import FRAPPE_CARDINALITIES, FRAPPE_FIELDS, load_frappe
from ..data.synthetic import CRITEO_KAGGLE_CARDINALITIES, SyntheticCriteo, cat_names
from ..modules.compress import compress_
from ..modules.compressed_ebc import CompressedEmbeddingBagCollection
from .config import RunConfig, lr_scale
from .loop import local_process_group, predictions, shard_for_training, train_steps


def _features(cfg: RunConfig) -> Tuple[List[str], List[int], int]:
    """(feature names, table sizes, dense inputs) of the configured data."""
    if cfg.data.kind == "frappe":
        return FRAPPE_FIELDS, FRAPPE_CARDINALITIES, 1
    cards = cfg.data.cardinalities or CRITEO_KAGGLE_CARDINALITIES
    return cat_names(len(cards)), list(cards), 13


def _batches(cfg: RunConfig, split: str, epoch: int, rank: int, world: int) -> Iterator[Batch]:
    d = cfg.data
    if d.kind == "synthetic":
        n = d.train_batches if split == "train" else d.eval_batches
        cards = d.cardinalities or CRITEO_KAGGLE_CARDINALITIES
        seed = cfg.train.seed + (1000 * epoch if split == "train" else 0)
        # n global batches, split over the ranks (global batch i goes to rank i mod world)
        yield from SyntheticCriteo(cards, d.batch_size, max(1, n // world), seed=seed, split=split, rank=rank, world_size=world)
    elif d.kind == "frappe":
        tr, te = load_frappe(d.root)
        data = tr.batches(d.batch_size, shuffle_seed=cfg.train.seed * 100 + epoch) if split == "train" else te.batches(d.batch_size)
        for i, b in enumerate(data):
            if i % world == rank:
                yield b
    else:
        paths = d.train_paths if split == "train" else (d.eval_paths or d.train_paths)
        yield from CriteoTSV(paths, d.cardinalities, d.batch_size, rank=rank, world_size=world)


def _model(cfg: RunConfig) -> torch.nn.Module:
    names, cards, n_dense = _features(cfg)
    m = cfg.model
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=m.embedding_dim, num_embeddings=v, feature_names=[f]) for f, v in zip(names, cards)]
    unknown = sorted(set(cfg.schemes) - {t.name for t in tables})
    if unknown:
        raise ValueError(f"schemes: unknown tables {unknown}; tables are {[t.name for t in tables]}")
    ebc = EmbeddingBagCollection(tables, device=torch.device("meta"))
    torch.manual_seed(cfg.train.seed)
    kw = dict(embedding_bag_collection=ebc, dense_in_features=n_dense, dense_arch_layer_sizes=list(m.dense_arch) + [m.embedding_dim],
              over_arch_layer_sizes=list(m.over_arch), dense_device=torch.device("cpu"))
    model = DLRM(**kw) if m.kind == "dlrm" else DLRM_DCN(**kw, dcn_num_layers=m.dcn_num_layers, dcn_low_rank_dim=m.dcn_low_rank_dim)
    if cfg.schemes:
        compress_(model, dict(cfg.schemes))
    return model


def normalized_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """NE = cross entropy / entropy of the base rate, with torchrec.metrics' own formulas."""
    states = get_ne_states(labels.double(), torch.sigmoid(logits).double(), torch.ones_like(labels, dtype=torch.float64), 1e-12)
    return compute_ne(states["cross_entropy_sum"], states["weighted_num_samples"], states["pos_labels"], states["neg_labels"], 1e-12).item()


def _evaluate(dmp: torch.nn.Module, batches: Iterator[Batch]) -> Dict[str, float]:
    """AUC, log loss, NE and sample count over all ranks' evaluation batches."""
    logits, labels = predictions(dmp, batches)
    return {"auc": binary_auroc(torch.sigmoid(logits), labels.long()).item(), "ne": normalized_entropy(logits, labels),
            "logloss": F.binary_cross_entropy_with_logits(logits, labels).item(), "samples": int(labels.numel())}


def _ckpt_root(cfg: RunConfig) -> str:
    return os.path.join(cfg.out, "checkpoints")


def save_checkpoint(cfg: RunConfig, dmp: torch.nn.Module, opt: torch.optim.Optimizer, epochs: List[Dict[str, object]]) -> str:
    """DCP checkpoint of the sharded model and fused optimizer state, plus the dense
    optimizer, finished epochs and RNG (replicated: rank 0 writes them). Written to a
    temporary folder and renamed, then ``latest`` is replaced atomically, so a crash never
    leaves a half-written checkpoint behind ``latest``."""
    import torch.distributed.checkpoint as dcp

    root = _ckpt_root(cfg)
    name = f"epoch_{len(epochs) - 1}"
    tmp, final = os.path.join(root, f".{name}.tmp"), os.path.join(root, name)
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            import shutil

            shutil.rmtree(tmp)
    dist.barrier()
    dcp.save({"model": dmp.state_dict(), "fused": dmp.fused_optimizer.state_dict()}, checkpoint_id=tmp)
    if rank == 0:
        torch.save({"dense": opt.state_dict(), "epochs": epochs, "rng": torch.get_rng_state()}, os.path.join(tmp, "replicated.pt"))
        os.replace(tmp, final)
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(name)
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
    dist.barrier()
    return final


def load_checkpoint(cfg: RunConfig, dmp: torch.nn.Module, opt: torch.optim.Optimizer) -> List[Dict[str, object]]:
    """Load ``latest`` into a (possibly differently sharded) model; returns the finished epochs."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    root = _ckpt_root(cfg)
    pointer = os.path.join(root, "latest")
    if not os.path.exists(pointer):
        raise ValueError(f"--resume: no checkpoint under {root} (no 'latest' file)")
    with open(pointer) as f:
        path = os.path.join(root, f.read().strip())
    try:
        state = {"model": dmp.state_dict(), "fused": dmp.fused_optimizer.state_dict()}
        dcp.load(state, checkpoint_id=path)
        replicated = torch.load(os.path.join(path, "replicated.pt"), weights_only=False)
    except (Exception, CheckpointException) as e:  # corrupted/truncated: never start a run silently
        raise ValueError(f"--resume: checkpoint {path} is unreadable ({type(e).__name__}: {str(e)[:200]})") from e
    dmp.load_state_dict(state["model"])
    dmp.fused_optimizer.load_state_dict(state["fused"])
    opt.load_state_dict(replicated["dense"])
    torch.set_rng_state(replicated["rng"])
    return list(replicated["epochs"])


def train(cfg: RunConfig, progress: bool = True, resume: bool = False) -> Dict[str, object]:
    """Train and evaluate once per epoch (checkpointing after each); rank 0 writes
    ``<out>/results.json``. ``resume`` continues from the latest checkpoint. Returns the results."""
    with local_process_group():
        return _train(cfg, progress, resume)


def _train(cfg: RunConfig, progress: bool, resume: bool) -> Dict[str, object]:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model(cfg)
    cebc = model.sparse_arch.embedding_bag_collection
    report = cebc.memory_report() if isinstance(cebc, CompressedEmbeddingBagCollection) else None
    dmp, opt = shard_for_training(model, model.sparse_arch, cfg.train.lr_sparse, cfg.train.lr_dense)
    epochs: List[Dict[str, object]] = load_checkpoint(cfg, dmp, opt) if resume else []
    base_lrs = [g["lr"] for g in opt.param_groups]
    fused = dmp.fused_optimizer

    def set_lr(i: int) -> None:  # global step = steps of finished epochs + i (the same after --resume)
        scale = lr_scale(done + i, cfg.train)
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * scale
        for g in fused.param_groups:
            g["lr"] = cfg.train.lr_sparse * scale
        fused.step()  # in-backward fused optimizers only take the new rate here

    schedule = cfg.train.lr_warmup_steps or cfg.train.lr_decay_steps
    for epoch in range(len(epochs), cfg.train.epochs):
        done = sum(int(e["steps"]) for e in epochs)
        losses, seconds, samples = train_steps(dmp, opt, _batches(cfg, "train", epoch, rank, world),
                                               desc=f"epoch {epoch}", progress=progress and rank == 0,
                                               before_step=set_lr if schedule else None)
        ev = _evaluate(dmp, _batches(cfg, "eval", epoch, rank, world))
        epochs.append({"epoch": epoch, "train_loss": sum(losses) / max(1, len(losses)), "samples_per_s": samples / max(seconds, 1e-9),
                       "steps": len(losses), **{f"eval_{k}": v for k, v in ev.items()}})
        if progress and rank == 0:
            print(f"epoch {epoch}: train loss {epochs[-1]['train_loss']:.4f}, eval AUC {ev['auc']:.4f}, NE {ev['ne']:.4f}, logloss {ev['logloss']:.4f}")
        if cfg.train.checkpoint:
            save_checkpoint(cfg, dmp, opt, epochs)
    results = {
        "world_size": world, "epochs": epochs, "schemes": {k: repr(v) for k, v in cfg.schemes.items()},
        "embedding_bytes": report.total.compressed_bytes if report else None,
        "ratio": report.total.ratio if report else 1.0, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    return results
