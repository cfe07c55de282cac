"""2-rank worker: TrainPipelineSparseDist over the pipelineable sharded module vs the same
model without pipelining vs the unsharded model (SGD everywhere: exact and scale-sensitive)."""
from __future__ import annotations

import copy
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter

from ..distributed.plans import uniform_plan
from ..distributed.sharders import sharders
from ..distributed.state import load_full_state_dict_
from ..modules import CompressedEmbeddingBagCollection
from .data import random_bags
from ..modules.compress import fit_
from ..schemes import MPE, FreqThreshold, Saec
from .parity import parity_schemes, parity_tables

LR = 0.05


def _tables():
    # FIITED is left out: pipelined, the transform (and a prune/grow event) of step k runs
    # before the backward of step k - 1, so its events see utilities one step later than
    # without pipelining; both are valid runs, but not equal ones.
    return [t for t in parity_tables() if not t.name.startswith("t_fiited")]


def _schemes(fitted_up_front: bool = True):
    """The parity schemes without FIITED. ``fitted_up_front``: the data-driven ones take their
    statistics from ``fit_`` instead of counting in their first steps. Their events read the
    tables (FreqThreshold's warm start, Saec's clustering) and, pipelined, the transform of
    step k runs before the update of step k - 1: a valid run, but not an equal one."""
    out = {k: v for k, v in parity_schemes().items() if not k.startswith("t_fiited")}
    if fitted_up_front:
        out.update(t_freq=FreqThreshold(capacity=20, shared_rows=5, fit_steps=0), t_saec=Saec(clusters=12, warm_steps=0),
                   t_mpe=MPE(ratio=4, groups=4, fit_steps=0, search_steps=10),
                   t_mpe_ranked=MPE(ratio=8, groups=4, fit_steps=0, search_steps=10, ids_by_frequency=True, retrain_from="search"))
    return out


def _fit(ebc: CompressedEmbeddingBagCollection) -> None:
    warm = torch.randn(300, 8, generator=torch.Generator().manual_seed(5))  # stands in for warmed-up embeddings
    fit_(ebc, [random_bags(_tables(), 64, seed=4242).kjt()], embeddings={"t_saec": warm})


class TinyModel(nn.Module):
    """KJT -> compressed embeddings -> linear logit; ``forward(Batch) -> (loss, loss.detach())``."""

    def __init__(self, device: torch.device, fitted_up_front: bool = True) -> None:
        super().__init__()
        self.ebc = CompressedEmbeddingBagCollection(copy.deepcopy(_tables()), _schemes(fitted_up_front), device=device)
        width = sum(t.embedding_dim * len(t.feature_names) for t in _tables())
        self.head = nn.Linear(width + 2, 1)

    def forward(self, batch: Batch):  # type: ignore[no-untyped-def]
        emb = self.ebc(batch.sparse_features).values()
        logit = self.head(torch.cat([emb, batch.dense_features], dim=1)).squeeze(1)
        loss = F.binary_cross_entropy_with_logits(logit, batch.labels)
        return loss, loss.detach()


def _batch(step: int, lo: int, hi: int, batch: int = 8) -> Batch:
    g = torch.Generator().manual_seed(1000 + step)
    dense, labels = torch.randn(batch, 2, generator=g), torch.randint(0, 2, (batch,), generator=g).float()
    bags = random_bags(_tables(), batch, seed=500 + step)
    return Batch(dense_features=dense[lo:hi], sparse_features=bags.slice(lo, hi).kjt(), labels=labels[lo:hi])


def pipeline_worker(rank: int, world: int, sharding_type: str, steps: int = 5) -> Dict[str, object]:
    torch.manual_seed(0)
    ref = TinyModel(torch.device("cpu"))
    _fit(ref.ebc)
    lo, hi = rank * 8 // world, (rank + 1) * 8 // world

    def sharded():
        model = TinyModel(torch.device("meta"))
        model.head = copy.deepcopy(ref.head)
        tables = [p for m in model.ebc.inner_collections() for p in m.parameters()]
        apply_optimizer_in_backward(torch.optim.SGD, tables, {"lr": LR})
        dmp = DistributedModelParallel(model, device=torch.device("cpu"), sharders=sharders(pipelineable=True),
                                       plan=uniform_plan(model, sharding_type, world, pipelineable=True))
        load_full_state_dict_(dmp.state_dict(), ref.state_dict())
        opt = torch.optim.SGD([p for _, p in in_backward_optimizer_filter(dmp.named_parameters())], lr=LR)
        return dmp, opt

    out: Dict[str, object] = {}
    dmp, opt = sharded()
    losses: List[float] = []
    for step in range(steps):
        loss, _ = dmp(_batch(step, lo, hi))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    out["plain"] = losses
    out["plain_state"] = _local(dmp.state_dict())

    dmp, opt = sharded()
    pipe = TrainPipelineSparseDist(dmp, opt, torch.device("cpu"))
    it = iter([_batch(step, lo, hi) for step in range(steps)])
    losses = []
    while True:
        try:
            losses.append(pipe.progress(it).item())
        except StopIteration:
            break
    out["pipelined"] = losses
    out["pipelined_state"] = _local(dmp.state_dict())
    out["is_pipelined"] = bool(getattr(dmp.module.ebc, "is_pipelined", False))
    out["module_type"] = type(dmp.module.ebc).__name__

    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)
    losses = []
    for step in range(steps):  # global batch; the mean loss equals the ranks' average
        loss, _ = ref(_batch(step, 0, 8))
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        losses.append(loss.item())
    out["unsharded"] = losses
    out["unsharded_state"] = {k: v.detach().clone() for k, v in ref.state_dict().items()}

    # the schemes' own procedures (count, fit, cluster, search, choose) inside the pipeline
    model = TinyModel(torch.device("meta"), fitted_up_front=False)
    apply_optimizer_in_backward(torch.optim.SGD, [p for m in model.ebc.inner_collections() for p in m.parameters()], {"lr": LR})
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), sharders=sharders(pipelineable=True),
                                   plan=uniform_plan(model, sharding_type, world, pipelineable=True))
    pipe = TrainPipelineSparseDist(dmp, torch.optim.SGD([p for _, p in in_backward_optimizer_filter(dmp.named_parameters())], lr=LR),
                                   torch.device("cpu"))
    it = iter([_batch(step, lo, hi) for step in range(steps)])
    while True:
        try:
            pipe.progress(it)
        except StopIteration:
            break
    logic = dmp.module.ebc._logic[0]
    out["lifecycle_fitted"] = [logic.scheme(t).fitted() for t in ("t_freq", "t_saec", "t_mpe", "t_mpe_ranked")]
    out["lifecycle_maps"] = {t: {k: v.detach().clone() for k, v in s.named_buffers()} for t, s in logic.scheme_states().items()}
    return out


def _local(sd: Dict[str, object]) -> Dict[str, List[tuple]]:
    """name -> [(row offset, col offset, tensor)] of this rank's shards (or the whole tensor)."""
    res: Dict[str, List[tuple]] = {}
    for k, v in sd.items():
        if hasattr(v, "local_shards"):
            res[k] = [(s.metadata.shard_offsets[0], s.metadata.shard_offsets[1], s.tensor.detach().clone()) for s in v.local_shards()]
        else:
            res[k] = [(0, 0, v.detach().clone())]
    return res
