"""Frequency threshold (the NVIDIA/MLPerf baseline): frequent ids keep their own row,
rare ids share a few hashed rows.

Storage: F private rows + S shared rows (d each) and the sorted ids of the frequent
set (the compact id -> row map: row = position in the sorted list, found with a binary
search; int32 where ids fit). Shapes are fixed by the config so the table can be
sharded before the data is seen. The scheme fits itself: it counts the ids of its first
``fit_steps`` training steps (summed over ranks), every id reading a shared row, then keeps
the ``capacity`` most frequent ids with at least ``min_count`` occurrences; each starts
from the shared row it trained so far. ``torchrec_compress.fit_`` fits it from
statistics given up front instead.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Hashable, List, Optional

import torch

from ..config import SchemeConfig, _check_positive_int, _check_steps, register_scheme
from ..ops import hash_constants, hash_with, py_hash, universal_hash
from .base import Constants, PhysicalTable, TableAccess, uniform_init
from .lifecycle import Scheduled

KEY_SPAN = 1 << 40  # ids of the table at index i of a batch are searched as x + i * KEY_SPAN (num_embeddings < 2^40)
SHARED_SHARE = 0.05  # share of the row budget given to the shared rows when sizes come from ratio=


@dataclasses.dataclass(frozen=True)
class FreqThreshold(SchemeConfig):
    """``FreqThreshold(ratio=27)`` or ``FreqThreshold(capacity=F, shared_rows=S)``; ``min_count`` = k;
    ``fit_steps``: training steps counted before the frequent set is chosen (0: only ``fit_``)."""

    capacity: Optional[int] = None
    shared_rows: Optional[int] = None
    min_count: int = 1
    seed: int = 0
    fit_steps: int = 50

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int("FreqThreshold", "capacity", self.capacity)
        _check_positive_int("FreqThreshold", "shared_rows", self.shared_rows)
        _check_positive_int("FreqThreshold", "min_count", self.min_count)
        self._ratio_or("capacity")
        _check_steps("FreqThreshold", "fit_steps", self.fit_steps)


@register_scheme(FreqThreshold)
class FreqThresholdScheme(Scheduled):
    presets = {"freq_threshold": lambda r, d: FreqThreshold(ratio=r)}
    identity_combine = True

    def __init__(self, table, config: FreqThreshold) -> None:
        super().__init__(table, config)
        v, d = table.num_embeddings, table.embedding_dim
        if v >= KEY_SPAN:
            raise ValueError(f"table {table.name!r}: FreqThreshold takes up to {KEY_SPAN - 1} rows, got num_embeddings={v}")
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

    @property
    def count_steps(self) -> int:
        return self.config.fit_steps

    def initial_buffers(self) -> Dict[str, torch.Tensor]:
        # sorted frequent ids, padded with a sentinel larger than any id
        return {"frequent_ids": torch.full((self.capacity,), torch.iinfo(self.id_dtype).max, dtype=self.id_dtype),
                **self.lifecycle_buffers()}

    def physical_tables(self) -> List[PhysicalTable]:
        return [PhysicalTable("__ft", self.capacity + self.shared, self.table.embedding_dim, uniform_init(self.table))]

    def batch_key(self) -> Hashable:
        return ("freq_threshold", self.table.embedding_dim)

    def constants(self) -> Dict[str, int]:
        return {"cap": self.capacity, **hash_constants("shared", self.shared, self.config.seed)}

    def batch_maps(self, index: int) -> Dict[str, torch.Tensor]:
        """The sorted frequent ids as int64 keys ``x + index * KEY_SPAN`` (the sentinel clamped
        below the next table's): laid end to end, every table's keys stay sorted."""
        return {"frequent": self.buffers.frequent_ids.long().clamp(max=KEY_SPAN - 1) + index * KEY_SPAN}

    def map_buffers(self) -> List[torch.Tensor]:
        return [self.buffers.frequent_ids]

    def transform(self, values: torch.Tensor, c: Optional[Constants] = None) -> List[torch.Tensor]:
        """``[N]`` ids -> ``[N]`` rows: position in the frequent set, else F + h(x) mod S (one
        binary search over every table of a batch: each id searches its own table's keys)."""
        if c is None:
            c = {**self.constants(), **self.batch_maps(0), "frequent_start": 0, "_table": 0}
        keys, start = c["frequent"], c["frequent_start"]
        key = values + c["_table"] * KEY_SPAN
        pos = torch.minimum(torch.searchsorted(keys, key), torch.as_tensor(start + c["cap"] - 1, device=key.device))
        hit = keys[pos] == key
        return [torch.where(hit, pos - start, c["cap"] + hash_with(values, c, "shared"))]

    def combine(self, parts: List[torch.Tensor], values: Optional[torch.Tensor], c: Optional[Constants] = None) -> torch.Tensor:
        return parts[0]

    @torch.no_grad()
    def event(self, tables: TableAccess) -> Dict[str, torch.Tensor]:
        """After ``fit_steps``: keep the most frequent counted ids; each private row starts as
        the shared row its id trained so far (the model goes on where it was)."""
        if self.stage == 0:
            ids = self._keep(self.counted())
            rows = tables.read("__ft")
            rows[: ids.numel()] = rows[self.capacity + universal_hash(ids, self.shared, self.config.seed)]
            tables.write("__ft", rows)
            self._set(ids)
        return {}

    def fit(self, counts: torch.Tensor, tables: TableAccess, embeddings: Optional[torch.Tensor] = None) -> None:
        """From id ``counts [v]`` given up front (``fit_``): keep the most frequent ids."""
        self._set(self._keep(counts))

    def _keep(self, counts: torch.Tensor) -> torch.Tensor:
        """Sorted ids of the ``capacity`` most frequent ids with count >= min_count (ties: lower id)."""
        counts = counts.cpu()
        ids = (counts >= self.config.min_count).nonzero().squeeze(1)
        if ids.numel() > self.capacity:
            ids = ids[torch.sort(-counts[ids], stable=True).indices[: self.capacity]]
        return ids.sort().values

    def _set(self, ids: torch.Tensor) -> None:
        frequent = self.buffers.frequent_ids
        fill = torch.full_like(frequent, torch.iinfo(self.id_dtype).max)
        fill[: ids.numel()] = ids.to(self.id_dtype).to(frequent.device)
        frequent.copy_(fill)
        self._set_host("stage", self.FITTED)

    def kept(self) -> int:
        """Ids that have a private row."""
        return int((self.buffers.frequent_ids != torch.iinfo(self.id_dtype).max).sum())

    # --- the plain-torch reference of the paper's equation (the tests compare against it) ----
    @staticmethod
    def reference(table, config, w, x: int, state) -> torch.Tensor:
        """Its own row (its rank among the frequent ids) if x is frequent, else E[F + h(x) mod S]."""
        n = table.name
        frequent = state["frequent_ids"].tolist()
        ids = [i for i in frequent if i < 2**31 - 1]  # drop the padding sentinel
        if x in ids:
            return w[f"{n}__ft"][sorted(ids).index(x)]
        cap = len(frequent)
        return w[f"{n}__ft"][cap + py_hash(x, w[f"{n}__ft"].shape[0] - cap, config.seed)]
