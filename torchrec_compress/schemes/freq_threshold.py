"""Frequency threshold (the NVIDIA/MLPerf baseline): frequent ids keep their own row,
rare ids share a few hashed rows.

Storage: F private rows + S shared rows (d each) and the sorted ids of the frequent
set (the compact id -> row map: row = position in the sorted list, found with a binary
search; int32 where ids fit). Shapes are fixed by the config so the table can be
sharded before the data is seen; :func:`fit_frequency_` fills the map from
:class:`~torchrec_compress.stats.FrequencyStats` (the ``capacity`` most frequent ids with
at least ``min_count`` occurrences). Until then every id reads a shared row.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import torch

from ..config import SchemeConfig, _check_positive_int, register_scheme
from ..ops import universal_hash
from .base import PhysicalTable, TableScheme, uniform_init

SHARED_SHARE = 0.05  # share of the row budget given to the shared rows when sizes come from ratio=


@dataclasses.dataclass(frozen=True)
class FreqThreshold(SchemeConfig):
    """``FreqThreshold(ratio=27)`` or ``FreqThreshold(capacity=F, shared_rows=S)``; ``min_count`` = k."""

    capacity: Optional[int] = None
    shared_rows: Optional[int] = None
    min_count: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int("FreqThreshold", "capacity", self.capacity)
        _check_positive_int("FreqThreshold", "shared_rows", self.shared_rows)
        _check_positive_int("FreqThreshold", "min_count", self.min_count)
        self._ratio_or("capacity")


@register_scheme(FreqThreshold)
class FreqThresholdScheme(TableScheme):
    def __init__(self, table, config: FreqThreshold) -> None:
        super().__init__(table, config)
        v, d = table.num_embeddings, table.embedding_dim
        self.id_dtype = torch.int32 if v < 2**31 - 1 else torch.int64
        id_bytes = 4 if self.id_dtype == torch.int32 else 8
        if config.capacity is not None:
            self.capacity = min(config.capacity, v)
            self.shared = config.shared_rows or max(1, self.capacity // 20)
        else:
            budget = self._target_bytes()
            self.shared = config.shared_rows or max(1, int(budget * SHARED_SHARE / (4 * d)))
            self.capacity = min(v, int((budget - self.shared * 4 * d) // (4 * d + id_bytes)))
            if self.capacity < 1:
                raise self._too_small(f"no private row fits beside {self.shared} shared rows")

    def initial_buffers(self) -> Dict[str, torch.Tensor]:
        # sorted frequent ids, padded with a sentinel larger than any id
        return {"frequent_ids": torch.full((self.capacity,), torch.iinfo(self.id_dtype).max, dtype=self.id_dtype)}

    def physical_tables(self) -> List[PhysicalTable]:
        return [PhysicalTable("__ft", self.capacity + self.shared, self.table.embedding_dim, uniform_init(self.table))]

    def transform(self, values: torch.Tensor) -> List[torch.Tensor]:
        """``[N]`` ids -> ``[N]`` rows: position in the frequent set, else F + h(x) mod S."""
        frequent = self.buffers.frequent_ids
        pos = torch.searchsorted(frequent, values.to(self.id_dtype))
        pos_c = pos.clamp(max=self.capacity - 1)
        hit = frequent[pos_c] == values.to(self.id_dtype)
        shared = self.capacity + universal_hash(values, self.shared, self.config.seed)
        return [torch.where(hit, pos_c.to(torch.int64), shared)]

    def combine(self, parts: List[torch.Tensor], values: torch.Tensor) -> torch.Tensor:
        return parts[0]

    def fit(self, counts_ids: torch.Tensor, counts: torch.Tensor) -> int:
        """Keep the ``capacity`` most frequent ids with count >= min_count. Returns how many."""
        keep = counts >= self.config.min_count
        ids, counts = counts_ids[keep], counts[keep]
        if ids.numel() > self.capacity:
            ids = ids[counts.topk(self.capacity).indices]
        frequent = self.buffers.frequent_ids
        fill = torch.full_like(frequent, torch.iinfo(self.id_dtype).max)
        fill[: ids.numel()] = ids.sort().values.to(self.id_dtype).to(frequent.device)
        frequent.copy_(fill)
        return ids.numel()
