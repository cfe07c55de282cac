"""Sharders for models holding CompressedEmbeddingBagCollections.

The physical tables live in ordinary inner ``EmbeddingBagCollection`` children, so the
stock EBC sharder shards them; DMP and the planner walk into our module to find them.
TorchRec's EBC sharder offers row-wise and table-row-wise only on CUDA; on CPU a hand-
built plan with them runs under gloo (DESIGN.md section 8), so our subclass offers them
on CPU too and the planner can choose them there.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ModuleSharder, ShardingType
from torch import nn


class CpuRowWiseEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """``EmbeddingBagCollectionSharder`` that also offers ROW_WISE and TABLE_ROW_WISE on CPU."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == "cpu":
            types += [t.value for t in (ShardingType.ROW_WISE, ShardingType.TABLE_ROW_WISE) if t.value not in types]
        return types


def sharders(fused_params: Optional[Dict[str, Any]] = None, pipelineable: bool = False) -> List[ModuleSharder[nn.Module]]:
    """Everything DMP and the planner need: TorchRec's default sharders with the EBC sharder
    replaced by :class:`CpuRowWiseEmbeddingBagCollectionSharder` (``fused_params`` go to it).

    ``pipelineable=True`` adds ``CompressedEmbeddingBagCollectionSharder``: compressed
    modules are then sharded as one module whose transform runs in its input
    distribution, so ``TrainPipelineSparseDist`` overlaps it with compute."""
    ebc = CpuRowWiseEmbeddingBagCollectionSharder(fused_params=fused_params)
    out: List[ModuleSharder[nn.Module]] = [ebc]
    if pipelineable:
        from .compressed_sharder import CompressedEmbeddingBagCollectionSharder

        out.append(CompressedEmbeddingBagCollectionSharder(ebc_sharder=ebc))
    out += [s for s in get_default_sharders() if type(s) is not EmbeddingBagCollectionSharder]
    return out
