"""Hand-built sharding plans for every physical table of a model.

TorchRec's planner (``EmbeddingShardingPlanner`` with :func:`sharders`) is the normal
way to plan; this helper builds a plan with one sharding type everywhere, which TorchRec's
planner cannot do for row-wise on CPU, and which tests and benchmarks use to pin a layout.
"""
from __future__ import annotations

from typing import Dict, Optional

from torch import nn
from torchrec.distributed.sharding_plan import (
    ParameterShardingGenerator,
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    row_wise,
    table_row_wise,
    table_wise,
)
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from .ebc_sharder import CpuRowWiseEmbeddingBagCollectionSharder

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")


def _generator(sharding_type: str, table: EmbeddingBagConfig, index: int, world_size: int) -> ParameterShardingGenerator:
    if sharding_type == "table_wise":
        return table_wise(rank=index % world_size)
    if sharding_type == "row_wise":
        return row_wise()
    if sharding_type == "table_row_wise":
        return table_row_wise(host_index=0)
    if sharding_type == "data_parallel":
        return data_parallel()
    if sharding_type == "column_wise":
        # each column shard needs a dim that is a multiple of 4 (FBGEMM); narrower tables,
        # e.g. MEmCom's packed [v/4, 4] weights, become a single column shard.
        ranks = [r for r in range(world_size)] if table.embedding_dim % (4 * world_size) == 0 else [index % world_size]
        return column_wise(ranks=ranks)
    raise ValueError(f"unknown sharding type {sharding_type!r}; use one of {SHARDING_TYPES}")


def uniform_plan(
    model: nn.Module,
    sharding_type: str,
    world_size: int,
    local_size: Optional[int] = None,
    device_type: str = "cpu",
    pipelineable: bool = False,
) -> ShardingPlan:
    """One ``sharding_type`` for every table of every EBC inside ``model`` (inner tables of
    CompressedEmbeddingBagCollections included). Returns a plan for ``DistributedModelParallel``.

    ``pipelineable=True`` plans each CompressedEmbeddingBagCollection as one module, to be
    sharded by ``CompressedEmbeddingBagCollectionSharder`` (pass ``sharders(pipelineable=True)``
    to DMP), which ``TrainPipelineSparseDist`` can pipeline."""
    from ..modules.compressed_ebc import INNER, CompressedEmbeddingBagCollection
    from .compressed_sharder import CompressedEmbeddingBagCollectionSharder

    plan: Dict[str, object] = {}
    index = 0
    skip: tuple = ()
    for path, module in model.named_modules():
        if skip and path.startswith(skip):
            continue
        if pipelineable and isinstance(module, CompressedEmbeddingBagCollection):
            inner_tables = [t for m in module.inner_collections() for t in m.embedding_bag_configs()]
            sharder: object = CompressedEmbeddingBagCollectionSharder()
            skip = tuple(f"{path}.{c}" for c in INNER)
        elif type(module) is EmbeddingBagCollection:
            inner_tables = module.embedding_bag_configs()
            sharder = CpuRowWiseEmbeddingBagCollectionSharder()
        else:
            continue
        per_param = {}
        for t in inner_tables:
            per_param[t.name] = _generator(sharding_type, t, index, world_size)
            index += 1
        plan[path] = construct_module_sharding_plan(
            module, per_param_sharding=per_param, local_size=local_size or world_size,
            world_size=world_size, device_type=device_type, sharder=sharder,
        )
    return ShardingPlan(plan)
