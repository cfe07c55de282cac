"""Hashing trick (baseline): E[h(x) mod m], h a seeded universal hash (not raw-id modulo).

Ids >= num_embeddings are valid input by design: any non-negative int64 id hashes to
a row, so a Hashing table also serves open vocabularies.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Hashable, List, Optional

import torch

from ..config import SchemeConfig, _check_positive_int, register_scheme
from ..ops import hash_constants, hash_with, py_hash
from .base import Constants, PhysicalTable, TableScheme, uniform_init


@dataclasses.dataclass(frozen=True)
class Hashing(SchemeConfig):
    """``Hashing(ratio=16)`` or ``Hashing(rows=m)``; ``seed`` picks the hash function."""

    rows: Optional[int] = None
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int("Hashing", "rows", self.rows)
        self._ratio_or("rows")


@register_scheme(Hashing)
class HashingScheme(TableScheme):
    presets = {"hashing": lambda r, d: Hashing(ratio=r)}  # bench quality / speed / demo: (ratio, dim) -> config
    accepts_any_id = True
    identity_combine = True

    def __init__(self, table, config: Hashing) -> None:
        super().__init__(table, config)
        if config.rows is not None:
            self.rows = config.rows
        else:
            self.rows = int(table.num_embeddings / config.ratio)
            if self.rows < 1:
                raise self._too_small(f"one row is the least a hashed table keeps, so at most {table.num_embeddings}x is reachable")

    def physical_tables(self) -> List[PhysicalTable]:
        return [PhysicalTable("__hash", self.rows, self.table.embedding_dim, uniform_init(self.table))]

    def batch_key(self) -> Hashable:
        return ("hashing", self.table.embedding_dim)

    def constants(self) -> Dict[str, int]:
        return hash_constants("rows", self.rows, self.config.seed)

    def transform(self, values: torch.Tensor, c: Optional[Constants] = None) -> List[torch.Tensor]:
        """``[N]`` ids -> ``[N]`` rows ``h(x) mod m``."""
        return [hash_with(values, c or self.constants(), "rows")]

    def combine(self, parts: List[torch.Tensor], values: Optional[torch.Tensor], c: Optional[Constants] = None) -> torch.Tensor:
        return parts[0]

    # --- the plain-torch reference of the paper's equation (the tests compare against it) ----
    @staticmethod
    def reference(table, config, w, x: int, state) -> torch.Tensor:
        """e(x) = E[h(x) mod m]."""
        n = table.name
        return w[f"{n}__hash"][py_hash(x, w[f"{n}__hash"].shape[0], config.seed)]
