"""TorchRec's EBC sharder, offering row-wise and table-row-wise on CPU as well.

TorchRec's EBC sharder offers row-wise and table-row-wise only on CUDA; on CPU a hand-
built plan with them runs under gloo (DESIGN.md section 8), so this subclass offers them
on CPU too and the planner can choose them there.
"""
from __future__ import annotations

from typing import List

from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import ShardingType


class CpuRowWiseEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """``EmbeddingBagCollectionSharder`` that also offers ROW_WISE and TABLE_ROW_WISE on CPU."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == "cpu":
            types += [t.value for t in (ShardingType.ROW_WISE, ShardingType.TABLE_ROW_WISE) if t.value not in types]
        return types
