"""2-rank DCP checkpoint worker: train sharded, save with torch.distributed.checkpoint."""
from __future__ import annotations

from typing import Dict, List

import copy

import torch
import torch.distributed.checkpoint as dcp
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from ..distributed.plans import uniform_plan
from ..distributed.sharders import sharders
from ..modules import CompressedEmbeddingBagCollection
from .data import random_bags
from .parity import parity_schemes, parity_tables


def train_and_save_worker(rank: int, world: int, sharding_type: str, path: str, batch: int = 8) -> torch.Tensor:
    """Train 2 steps sharded, save a DCP checkpoint, return this rank's output on batch seed 999."""
    torch.manual_seed(0)
    model = CompressedEmbeddingBagCollection(copy.deepcopy(parity_tables()), parity_schemes(), device=torch.device("meta"))
    apply_optimizer_in_backward(RowWiseAdagrad, [p for m in model.inner_collections() for p in m.parameters()], {"lr": 0.1})
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=uniform_plan(model, sharding_type, world), sharders=sharders())
    lo, hi = rank * batch // world, (rank + 1) * batch // world
    for step in range(2):
        dmp(random_bags(parity_tables(), batch, seed=step).slice(lo, hi).kjt()).values().sum().backward()
    dcp.save(dmp.state_dict(), checkpoint_id=path)
    with torch.no_grad():
        return dmp(random_bags(parity_tables(), batch, seed=999).slice(lo, hi).kjt()).values()


def planner_worker(rank: int, world: int) -> dict:
    """TorchRec's planner with our sharders, row-wise asked for on CPU: plan, train one step."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    import torch.distributed as dist

    torch.manual_seed(0)
    model = CompressedEmbeddingBagCollection(copy.deepcopy(parity_tables()), parity_schemes(), device=torch.device("meta"))
    apply_optimizer_in_backward(RowWiseAdagrad, [p for m in model.inner_collections() for p in m.parameters()], {"lr": 0.1})
    names = [t.name for inner in model.inner_collections() for t in inner.embedding_bag_configs()]
    constraints = {n: ParameterConstraints(sharding_types=["row_wise"]) for n in names}
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu"), constraints=constraints)
    plan = planner.collective_plan(model, sharders(), dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders())
    out = dmp(random_bags(parity_tables(), 4, seed=rank).kjt()).values()
    out.sum().backward()
    return {n: ps.sharding_type for mod in plan.plan.values() for n, ps in mod.items()}


def compression_plan_worker(rank: int, world: int) -> dict:
    """Plan a budget that forces compression, shard with the plan, train two steps."""
    from torchrec import EmbeddingBagConfig

    from ..distributed.planner import plan_compression_, tables_module

    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=v, feature_names=[f"f{i}"])
              for i, v in enumerate([200_000, 50_000, 3_000, 40])]
    model = tables_module(tables)
    plan = plan_compression_(model, world, 4 * 2**20)  # 4 MiB per rank: the 200k x 16 table alone is 13 MiB
    table_params = [p for m in model.modules() if type(m).__name__ == "EmbeddingBagCollection" for p in m.parameters()]
    apply_optimizer_in_backward(RowWiseAdagrad, table_params, {"lr": 0.1})
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan.sharding_plan, sharders=sharders())
    losses = []
    for step in range(2):
        out = dmp.module.ebc(random_bags(tables, 8, seed=10 * step + rank).kjt()).values()
        loss = out.pow(2).sum()
        loss.backward()
        losses.append(loss.item())
    return {"schemes": {k: repr(v) for k, v in plan.schemes.items()}, "per_rank": plan.per_rank_bytes, "losses": losses}


def eval_run_checkpoint_worker(rank: int, world: int, config: str, out: str, overrides: List[str]) -> Dict[str, float]:
    """Load the latest checkpoint of a ``torchrec-compress train`` run (``config`` + ``overrides``,
    output folder ``out``) into a DMP model of ``world`` ranks and evaluate it."""
    from torchrec_compress.train.config import load_config
    from torchrec_compress.train.loop import predictions, shard_for_training
    from torchrec_compress.train.metrics import binary_metrics
    from torchrec_compress.train.run import _batches, _model, load_checkpoint

    cfg = load_config(config, [f"out={out}", *overrides])
    model, _ = _model(cfg, world)
    dmp, opt = shard_for_training(model, model.sparse_arch, cfg.train.lr_sparse, cfg.train.lr_dense)
    load_checkpoint(cfg, dmp, opt)
    return binary_metrics(*predictions(dmp, _batches(cfg, "eval", 0, rank, world)))
