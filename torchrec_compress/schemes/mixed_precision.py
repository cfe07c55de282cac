"""A table stored at several precisions: what MPE exports (one physical table per precision).

Each id lives in exactly one physical table (or none: dropped ids read zeros), found
through an id -> (table, row) map, or, when ids are numbered by frequency (MPE's
``ids_by_frequency``), through G-entry maps of the G id ranges. Bags are routed raggedly: the virtual feature of the
b-bit table gets only the bag's b-bit ids, and the pooled parts add up to the bag's sum.
``quant.export`` stores each physical table at its own FBGEMM dtype.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

import torch
from torchrec.sparse.jagged_tensor import JaggedTensor

from ..config import SchemeConfig, register_scheme
from .base import PhysicalTable, Routed, TableScheme, ragged_parts

EXPORT_DTYPE = {2: "int2", 4: "int4", 8: "int8", 16: "fp16", 32: "fp32"}
DROPPED = 255


@dataclasses.dataclass(frozen=True)
class MixedPrecision(SchemeConfig):
    """``rows_per_bits``: ((bits, rows), ...) of the kept precisions (built by ``quant.export`` from a trained MPE table: ``MPEScheme.inference``)."""

    rows_per_bits: Tuple[Tuple[int, int], ...] = ()
    # G > 0: ids are numbered by frequency and grouped in G equal id ranges (group x * G // v),
    # each range stored contiguously in one table: G-entry maps instead of per-id ones
    ranked_groups: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ratio is not None:
            raise ValueError("MixedPrecision is built by export from a trained MPE table; it takes no ratio")
        if not self.rows_per_bits:
            raise ValueError("MixedPrecision: every id is dropped; keep at least one precision")
        if not isinstance(self.ranked_groups, int) or not 0 <= self.ranked_groups <= 256:
            raise ValueError(f"MixedPrecision: ranked_groups must be an int in [0, 256], got {self.ranked_groups!r}")
        for bits, rows in self.rows_per_bits:
            if bits not in EXPORT_DTYPE or not isinstance(rows, int) or rows <= 0:
                raise ValueError(f"MixedPrecision: ({bits}, {rows}) needs bits in {sorted(EXPORT_DTYPE)} and rows > 0")


@register_scheme(MixedPrecision)
class MixedPrecisionScheme(TableScheme):
    public = False  # built by export from an MPE table, not chosen by users
    ragged = True

    def initial_buffers(self) -> Dict[str, torch.Tensor]:
        G = self.config.ranked_groups
        if G:  # group g -> (table, row of the group's first id minus that id)
            return {"table_of": torch.full((G,), DROPPED, dtype=torch.uint8), "row_offset": torch.zeros(G, dtype=torch.int64)}
        v = self.table.num_embeddings
        return {"table_of": torch.full((v,), DROPPED, dtype=torch.uint8), "row_of": torch.zeros(v, dtype=torch.int32)}

    def physical_tables(self) -> List[PhysicalTable]:
        return [
            PhysicalTable(f"__b{bits}", rows, self.table.embedding_dim, export_dtype=EXPORT_DTYPE[bits])
            for bits, rows in self.config.rows_per_bits
        ]

    def route(self, jt: JaggedTensor) -> Routed:
        """Per kept precision k, laid end to end: rows of the bag's ids stored at k, per-bag counts, weights."""
        values = jt.values()
        G = self.config.ranked_groups
        if G:
            g = values.long() * G // self.table.num_embeddings
            table, rows = self.buffers.table_of[g], values.long() + self.buffers.row_offset[g]
        else:
            table, rows = self.buffers.table_of[values], self.buffers.row_of[values].long()
        return ragged_parts(jt, rows, [table == k for k in range(len(self.config.rows_per_bits))])

    def combine(self, parts: List[torch.Tensor], values: torch.Tensor) -> torch.Tensor:
        return torch.stack(parts).sum(dim=0)
