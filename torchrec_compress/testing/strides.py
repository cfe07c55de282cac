"""2-rank worker: per-id lookups with a different per-id stride on each rank, and the
collectives their KJT costs (the stride agreement only where a reduce-scatter needs it)."""
from __future__ import annotations

import copy
from typing import Dict

import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from ..distributed.plans import uniform_plan
from ..distributed.sharders import sharders
from ..distributed.state import load_full_state_dict_
from ..modules.compressed_ebc import CompressedEmbeddingBagCollection
from ..schemes import QR, MEmCom
from .data import random_bags

TABLES = [EmbeddingBagConfig(name="t_qr", embedding_dim=8, num_embeddings=50, feature_names=["q"]),
          EmbeddingBagConfig(name="t_mc", embedding_dim=8, num_embeddings=60, feature_names=["m", "n"])]
SCHEMES = {"t_qr": QR(num_buckets=7), "t_mc": MEmCom(rows=9)}


def stride_worker(rank: int, world: int, sharding_type: str, pipelineable: bool = False) -> Dict[str, object]:
    """Rank r feeds bags of up to 2 + 4 r ids (so the per-id strides differ); returns the
    max forward difference from the unsharded module on the whole batch, the all-reduces
    one forward ran, and this rank's per-id stride."""
    torch.manual_seed(0)
    ref = CompressedEmbeddingBagCollection(copy.deepcopy(TABLES), SCHEMES)
    model = CompressedEmbeddingBagCollection(copy.deepcopy(TABLES), SCHEMES, device=torch.device("meta"))
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), sharders=sharders(pipelineable=pipelineable),
                                   plan=uniform_plan(model, sharding_type, world, pipelineable=pipelineable))
    load_full_state_dict_(dmp.state_dict(), ref.state_dict())
    parts = [random_bags(TABLES, 4, seed=10 + r, max_len=2 + 4 * r) for r in range(world)]
    mine = parts[rank].kjt()
    logic = dmp.module._logic[0] if pipelineable else dmp.module
    stride = max(logic.split(mine)[2].length_per_key())  # this rank's own: its largest per-id feature
    calls = []
    real = dist.all_reduce

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    dist.all_reduce = counted
    try:
        out = dmp(mine).values()
    finally:
        dist.all_reduce = real
    want = ref(parts[rank].kjt()).values()  # the unsharded module, on this rank's own bags
    return {"diff": (out - want).abs().max().item(), "all_reduces": len(calls), "stride": stride}
