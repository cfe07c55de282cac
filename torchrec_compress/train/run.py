"""``train(cfg)``: one training run from a :class:`RunConfig`, in one process or under torchrun/torchx."""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import shutil
import time
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM, DLRM_DCN

from ..data.criteo import CriteoTSV
from ..data.frappe import FRAPPE_CARDINALITIES, FRAPPE_FIELDS, load_frappe
from ..data.npy import CriteoNpy, MultiHotCriteoNpy
from ..data.synthetic import CRITEO_KAGGLE_CARDINALITIES, SyntheticCriteo, cat_names
from ..distributed.planner import CompressionPlan, parse_bytes, plan_compression_
from ..modules.compress import compress_
from ..modules.compressed_ebc import CompressedEmbeddingBagCollection
from .config import RunConfig, lr_scale
from .faults import maybe_kill
from .loop import local_process_group, predictions, shard_for_training, train_steps
from .metrics import auc, binary_metrics, ne_from_states, ne_states
from .report import MLPerfLog, ScalarLog, plot_curves

logger = logging.getLogger(__name__)
TRAIN_AUC_WINDOW = 1 << 20  # train AUC over at most the last 1M samples of an epoch (a torchrec.metrics-style window)


def _features(cfg: RunConfig) -> Tuple[List[str], List[int], int]:
    """(feature names, table sizes, dense inputs) of the configured data."""
    if cfg.data.kind == "frappe":
        return FRAPPE_FIELDS, FRAPPE_CARDINALITIES, 1
    cards = cfg.data.cardinalities or CRITEO_KAGGLE_CARDINALITIES
    return cat_names(len(cards)), list(cards), 13


def _batches(cfg: RunConfig, split: str, epoch: int, rank: int, world: int) -> Iterator[Batch]:
    d = cfg.data
    cards = d.cardinalities or CRITEO_KAGGLE_CARDINALITIES
    if d.kind == "synthetic":
        n = max(1, (d.train_batches if split == "train" else d.eval_batches) // world)
        # n global batches, split over the ranks (global batch i goes to rank i mod world); one hidden
        # model (train.seed), fresh training samples every epoch, the same evaluation samples
        yield from SyntheticCriteo(cards, d.batch_size, n, seed=cfg.train.seed, split=split, rank=rank, world_size=world,
                                   multi_hot=d.multi_hot or None, start=epoch * n if split == "train" else 0)
    elif d.kind == "frappe":
        tr, te = load_frappe(d.root)
        data = tr.batches(d.batch_size, shuffle_seed=cfg.train.seed * 100 + epoch) if split == "train" else te.batches(d.batch_size)
        for i, b in enumerate(data):
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


def _model(cfg: RunConfig, world: int = 1) -> Tuple[torch.nn.Module, Optional[CompressionPlan]]:
    """DLRM / DLRM_DCN with tables on meta, compressed by the configured schemes or, for
    ``schemes: auto``, by the planner (whose plan also holds the sharding plan)."""
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
    if cfg.auto:
        pooling = {f"t_{f}": float(h) for f, h in zip(names, cfg.data.multi_hot)} if cfg.data.multi_hot else None
        plan = plan_compression_(model, world, parse_bytes(cfg.plan.memory_per_rank), pooling_factors=pooling,
                                 batch_size=cfg.data.batch_size)
        return model, plan
    if cfg.schemes:
        compress_(model, dict(cfg.schemes))
    return model, None


@dataclasses.dataclass
class Progress:
    """Everything a resumed run needs besides model and optimizer state. ``ne`` and
    ``window`` are this rank's; a checkpoint stores every rank's."""

    epoch: int = 0
    global_batches: int = 0  # in this epoch, over all ranks (a rank's step s consumed global batches < (s+1) x world)
    steps: int = 0  # optimizer steps in all
    epochs: List[Dict[str, object]] = dataclasses.field(default_factory=list)
    losses: List[float] = dataclasses.field(default_factory=list)  # rank 0's train loss at every step
    evals: List[Dict[str, object]] = dataclasses.field(default_factory=list)  # periodic evaluations
    ne: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(4, dtype=torch.float64))  # epoch's NE sums
    window: List[Tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=list)  # epoch's (logits, labels)
    stopped: str = ""  # why the run ended early ("max_steps", "target_auc")

    def window_tensors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.window:
            return torch.zeros(0), torch.zeros(0)
        return torch.cat([w[0] for w in self.window])[-TRAIN_AUC_WINDOW:], torch.cat([w[1] for w in self.window])[-TRAIN_AUC_WINDOW:]


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


def _ckpt_root(cfg: RunConfig) -> str:
    return os.path.join(cfg.out, "checkpoints")


def save_checkpoint(cfg: RunConfig, dmp: torch.nn.Module, opt: torch.optim.Optimizer, progress: Progress) -> str:
    """DCP checkpoint of the sharded model and fused optimizer state, plus the dense
    optimizer, :class:`Progress` and RNG (rank 0 writes them). Written to a temporary
    folder and renamed, then ``latest`` is replaced atomically, so a crash never leaves a
    half-written checkpoint behind ``latest``; the previous checkpoint is kept as a fallback."""
    import torch.distributed.checkpoint as dcp

    root = _ckpt_root(cfg)
    name = f"step_{progress.steps}"
    tmp, final = os.path.join(root, f".{name}.tmp"), os.path.join(root, name)
    rank = dist.get_rank()
    per_rank: List = [None] * dist.get_world_size()  # collective: every rank takes part
    dist.all_gather_object(per_rank, (progress.ne, progress.window_tensors()))
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save({"model": dmp.state_dict(), "fused": dmp.fused_optimizer.state_dict()}, checkpoint_id=tmp)
    maybe_kill("save", rank, progress.steps)
    if rank == 0:
        state = dataclasses.asdict(dataclasses.replace(progress, ne=None, window=[])) | {"per_rank": per_rank}
        torch.save({"dense": opt.state_dict(), "progress": state, "rng": torch.get_rng_state()}, os.path.join(tmp, "replicated.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        previous = _read_pointer(root)
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(name)
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        for old in os.listdir(root):  # keep the new one and its predecessor
            if old.startswith(("step_", "epoch_")) and old not in (name, previous):
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    dist.barrier()
    return final


def _read_pointer(root: str) -> Optional[str]:
    try:
        with open(os.path.join(root, "latest")) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def _load_one(path: str, dmp: torch.nn.Module, opt: torch.optim.Optimizer) -> Dict[str, object]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        state = {"model": dmp.state_dict(), "fused": dmp.fused_optimizer.state_dict()}
        dcp.load(state, checkpoint_id=path)
        replicated = torch.load(os.path.join(path, "replicated.pt"), weights_only=False)
    except (Exception, CheckpointException) as e:  # corrupted/truncated: never start a run silently
        raise ValueError(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e)[:200]})") from e
    dmp.load_state_dict(state["model"])
    dmp.fused_optimizer.load_state_dict(state["fused"])
    opt.load_state_dict(replicated["dense"])
    torch.set_rng_state(replicated["rng"])
    return replicated["progress"]


def load_checkpoint(cfg: RunConfig, dmp: torch.nn.Module, opt: torch.optim.Optimizer) -> Progress:
    """Load ``latest`` into a (possibly differently sharded) model. An unreadable checkpoint
    is reported and the previous good one is used; none readable raises ``ValueError``."""
    root = _ckpt_root(cfg)
    latest = _read_pointer(root)
    if latest is None:
        raise ValueError(f"--resume: no checkpoint under {root} (no 'latest' file)")
    candidates = [latest] + sorted((d for d in os.listdir(root) if d.startswith("step_") and d != latest),
                                   key=lambda d: -int(d.split("_")[1]))
    errors = []
    for name in candidates:
        try:
            state = _load_one(os.path.join(root, name), dmp, opt)
        except ValueError as e:
            errors.append(str(e))
            if dist.get_rank() == 0:
                logger.warning("--resume: %s; trying the previous checkpoint", e)
                print(f"warning: {e}; trying the previous checkpoint", flush=True)
            continue
        per_rank = state.pop("per_rank")
        saved_world, rank, world = len(per_rank), dist.get_rank(), dist.get_world_size()
        p = Progress(**{**state, "stopped": ""})  # a resumed run goes on past the max_steps / target that stopped it
        if saved_world == world:  # each rank takes its own metric state back: bit-identical sums
            p.ne, p.window = per_rank[rank][0], [per_rank[rank][1]]
        elif rank == 0:  # another world size: rank 0 carries all ranks' metric state
            p.ne = torch.stack([x[0] for x in per_rank]).sum(0)
            p.window = [(torch.cat([x[1][0] for x in per_rank]), torch.cat([x[1][1] for x in per_rank]))]
        else:
            p.ne, p.window = torch.zeros(4, dtype=torch.float64), []
        if p.global_batches % world:
            print(f"warning: checkpoint taken mid-epoch with {saved_world} ranks after {p.global_batches} global batches, "
                  f"which {dist.get_world_size()} ranks cannot split: resuming at the previous whole step", flush=True)
        return p
    raise ValueError(f"--resume: no readable checkpoint under {root}: " + "; ".join(errors))


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
        if _status(dmp):
            ev["schemes"] = _status(dmp)
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
    results = {
        "world_size": world, "epochs": p.epochs, "evals": p.evals, "steps": p.steps, "stopped": p.stopped or None,
        "losses": p.losses, "schemes": {k: repr(v) for k, v in schemes.items() if v is not None},
        "embedding_bytes": report.total.compressed_bytes if report else full_bytes, "uncompressed_bytes": full_bytes,
        "ratio": report.total.ratio if report else 1.0, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
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
