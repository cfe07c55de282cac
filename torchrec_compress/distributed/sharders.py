"""Sharders for models holding CompressedEmbeddingBagCollections.

The physical tables live in ordinary inner ``EmbeddingBagCollection`` children, so the
stock EBC sharder shards them (``ebc_sharder``: with row-wise offered on CPU too); DMP and
the planner walk into our module to find them.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ModuleSharder
from torch import nn

from .compressed_sharder import CompressedEmbeddingBagCollectionSharder
from .ebc_sharder import CpuRowWiseEmbeddingBagCollectionSharder


def sharders(fused_params: Optional[Dict[str, Any]] = None, pipelineable: bool = False) -> List[ModuleSharder[nn.Module]]:
    """Everything DMP and the planner need: TorchRec's default sharders with the EBC sharder
    replaced by :class:`CpuRowWiseEmbeddingBagCollectionSharder` (``fused_params`` go to it).

    ``pipelineable=True`` adds ``CompressedEmbeddingBagCollectionSharder``: compressed
    modules are then sharded as one module whose transform runs in its input
    distribution, so ``TrainPipelineSparseDist`` overlaps it with compute."""
    ebc = CpuRowWiseEmbeddingBagCollectionSharder(fused_params=fused_params)
    out: List[ModuleSharder[nn.Module]] = [ebc]
    if pipelineable:
        out.append(CompressedEmbeddingBagCollectionSharder(ebc_sharder=ebc))
    out += [s for s in get_default_sharders() if type(s) is not EmbeddingBagCollectionSharder]
    return out
