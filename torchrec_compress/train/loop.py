"""Train and evaluate a DLRM-style model under DistributedModelParallel.

The model's forward is ``model(dense [B, n_dense], sparse KJT) -> logits [B, 1]``
(``torchrec.models.dlrm.DLRM`` / ``DLRM_DCN``). Embeddings are updated by a fused
row-wise Adagrad inside backward (FBGEMM), so no dense ``[rows, dim]`` gradient is ever
formed; the remaining parameters by a dense optimizer.
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
import warnings
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.distributed.types import ShardingPlan
from torchrec.optim.optimizers import SGD, Adagrad
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
from tqdm import tqdm

from ..distributed.plans import uniform_plan
from ..modules.compressed_ebc import elementwise_tables, scheme_lr_scales
from ..distributed.sharders import sharders
from .metrics import binary_metrics

# fused embedding optimizers (FBGEMM EXACT_ROWWISE_ADAGRAD / EXACT_ADAGRAD / EXACT_SGD);
# MLPerf DLRMv2 uses full Adagrad: [rows, dim] state, row-wise keeps one float per row
SPARSE_OPTIMIZERS = {"rowwise_adagrad": RowWiseAdagrad, "adagrad": Adagrad, "sgd": SGD}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_process_group() -> Iterator[None]:
    """The process group DMP needs, unless one exists: from the environment when launched
    by torchrun / torchx (WORLD_SIZE > 1), else a local gloo group of world size 1."""
    own = not dist.is_initialized()
    if own and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    elif own:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        if own:
            if dist.get_world_size() > 1:  # no rank tears gloo down while another is still in a collective (SIGABRT)
                try:
                    dist.barrier()
                except RuntimeError:  # a peer is gone already (killed): nothing left to wait for
                    pass
            dist.destroy_process_group()


def lockstep(batches: Iterable[Batch]) -> Iterator[Batch]:
    """``batches`` while every rank still has one: ranks whose streams end at different
    points (a streaming reader cannot count its batches ahead) would otherwise wait
    forever in the next collective. One tiny all_reduce per step; none on one rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        yield from batches
        return
    it = iter(batches)
    while True:
        b = next(it, None)
        have = torch.tensor([0 if b is None else 1], dtype=torch.int64)
        dist.all_reduce(have, op=dist.ReduceOp.MIN)
        if not int(have):
            return
        yield b


def shard_for_training(
    model: nn.Module,
    embeddings: nn.Module,
    lr_sparse: float,
    lr_dense: float,
    sharding_type: str = "table_wise",
    device: torch.device = torch.device("cpu"),
    scheme_lr_scale: Optional[float] = None,
    plan: Optional[ShardingPlan] = None,
    sparse_optimizer: str = "rowwise_adagrad",
    pipelineable: bool = False,
) -> Tuple[DistributedModelParallel, torch.optim.Optimizer]:
    """A fused ``sparse_optimizer`` (FBGEMM, inside backward) on the tables of every EBC
    inside ``embeddings``, DMP over the current process group (``plan``, default: every table
    ``sharding_type``), Adagrad on everything else (dense layers; schemes' small parameters
    such as MPE's logits at ``scheme_lr_scale`` x ``lr_dense``, default each scheme's own
    ``parameter_lr_scale``). ``pipelineable``: compressed modules sharded as one module, so
    ``TrainPipelineSparseDist`` runs their transform in its input distribution. Returns
    ``(dmp, dense_optimizer)``."""
    if sparse_optimizer not in SPARSE_OPTIMIZERS:
        raise ValueError(f"sparse_optimizer {sparse_optimizer!r}; use one of {sorted(SPARSE_OPTIMIZERS)}")
    # packed per-id scalars (MEmCom's, Mem-Rec's weights) get element-wise Adagrad under
    # row-wise Adagrad, so that every id has its own state rather than one per 4 ids
    own_state = set(elementwise_tables(embeddings)) if sparse_optimizer == "rowwise_adagrad" else set()
    tables = [(n.split(".")[-2] in own_state, p) for m in embeddings.modules() if type(m) is EmbeddingBagCollection
              for n, p in m.named_parameters()]
    apply_optimizer_in_backward(SPARSE_OPTIMIZERS[sparse_optimizer], [p for own, p in tables if not own], {"lr": lr_sparse})
    if own_state:
        apply_optimizer_in_backward(Adagrad, [p for own, p in tables if own], {"lr": lr_sparse})
    world = dist.get_world_size()
    with warnings.catch_warnings():  # torchrec's own DDP wrapper uses a deprecated argument
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        dmp = DistributedModelParallel(
            model, device=device, sharders=sharders(pipelineable=pipelineable),
            plan=plan or uniform_plan(model, sharding_type, world, device_type=device.type, pipelineable=pipelineable),
        )
    # frozen: a table's own view of its family's flat parameter (FlatParameters), trained through it
    dense = {n: p for n, p in in_backward_optimizer_filter(dmp.named_parameters()) if p.requires_grad}
    scales = scheme_lr_scales(dmp)
    groups = [{"params": [p for p in dense.values() if id(p) not in scales]}]
    for scale in sorted(set(scales.values())):
        ps = [p for p in dense.values() if scales.get(id(p)) == scale]
        if ps:
            groups.append({"params": ps, "lr": lr_dense * (scale if scheme_lr_scale is None else scheme_lr_scale)})
    # fused: one kernel for every dense parameter; on CUDA its step counters stay on the device
    # (the default keeps them on the host and reads each one every step)
    return dmp, torch.optim.Adagrad(groups, lr=lr_dense, fused=device.type in ("cpu", "cuda"))


def train_steps(
    dmp: nn.Module,
    dense_opt: torch.optim.Optimizer,
    batches: Iterable[Batch],
    desc: str = "train",
    total: Optional[int] = None,
    progress: bool = True,
    extra_loss: Optional[Callable[[], torch.Tensor]] = None,
    before_step: Optional[Callable[[int], None]] = None,
    after_step: Optional[Callable[[int, float, torch.Tensor, torch.Tensor], bool]] = None,
) -> Tuple[List[float], float, int]:
    """One pass over ``batches`` with BCE loss (+ ``extra_loss()``, e.g. MPE's bit penalty).
    ``before_step(i)`` runs before the i-th batch (e.g. to set learning rates);
    ``after_step(i, loss, logits [B], labels [B])`` after its update (metrics, periodic
    evaluation, checkpoints); returning True stops the pass.
    Returns ``(losses, seconds, samples)``; losses are the BCE part."""
    losses: List[float] = []
    samples = 0
    dmp.train()
    t0 = time.perf_counter()
    with tqdm(total=total, desc=f"{desc:>8}", unit="samples", unit_scale=True, disable=not progress, mininterval=1.0) as bar:
        for i, b in enumerate(lockstep(batches)):
            if before_step is not None:
                before_step(i)
            logits = dmp(b.dense_features, b.sparse_features).squeeze(-1)  # [B]
            loss = F.binary_cross_entropy_with_logits(logits, b.labels)
            (loss + extra_loss() if extra_loss is not None else loss).backward()  # embeddings are updated here (fused)
            dense_opt.step()
            dense_opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            samples += b.labels.numel()
            bar.update(b.labels.numel())
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}", refresh=False)
            if after_step is not None and after_step(i, losses[-1], logits.detach(), b.labels):
                break
    return losses, time.perf_counter() - t0, samples


@torch.no_grad()
def predictions(dmp: nn.Module, batches: Iterable[Batch]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(logits [N], labels [N])`` over ``batches``, gathered from every rank when distributed."""
    dmp.eval()
    logits_all, labels_all = [], []
    for b in lockstep(batches):
        logits_all.append(dmp(b.dense_features, b.sparse_features).squeeze(-1))
        labels_all.append(b.labels)
    logits, labels = torch.cat(logits_all), torch.cat(labels_all)
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts: List = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (logits, labels))
        logits, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return logits, labels


def evaluate(dmp: nn.Module, batches: Iterable[Batch]) -> Tuple[float, float]:
    """``(AUC, log loss)`` over ``batches`` (all ranks' when distributed)."""
    m = binary_metrics(*predictions(dmp, batches))
    return m["auc"], m["logloss"]
