"""DCP checkpoints of a training run: the sharded model and fused optimizer state, the dense
optimizer, :class:`Progress` and the RNG; atomic ``latest`` pointer, fallback to the previous
checkpoint, resumable under another world size."""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .config import RunConfig
from .faults import maybe_kill

logger = logging.getLogger(__name__)
TRAIN_AUC_WINDOW = 1 << 20  # train AUC over at most the last 1M samples of an epoch (a torchrec.metrics-style window)


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
