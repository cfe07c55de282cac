"""Mem-Rec (Jha et al. 2023): e(x) = alpha(x) * SUM_k T[h_k(x) mod D].

A token table T (D x d) read through K independent hashes of the id (a Bloom-filter
signature: two ids rarely share all K rows) and a scalar weight alpha(x) from a much
smaller weight table addressed by its own hash. Neither table depends on the vocabulary
size v, so the ratio is unbounded (1000x+ on CriteoTB). The weights are packed 4 per
physical row (FBGEMM dims are multiples of 4); the product makes this a per-id scheme.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch

from ..config import SchemeConfig, _check_positive_int, register_scheme
from ..ops import universal_hash, py_hash
from .base import PhysicalTable, TableScheme, ceil_div, constant_init, uniform_init

PACK = 4
WEIGHT_SHARE = 0.1  # share of the budget given to the weight table when sizes come from ratio=


@dataclasses.dataclass(frozen=True)
class MemRec(SchemeConfig):
    """``MemRec(ratio=1000)`` or ``MemRec(rows=D, weight_rows=W)``; ``hashes`` = K; ``seed`` picks the hashes.

    ``weight_dim``: 1 (a scalar alpha(x), packed 4 per row) or ``"full"`` (a vector
    alpha(x) of the embedding dim, applied elementwise)."""

    rows: Optional[int] = None
    weight_rows: Optional[int] = None
    hashes: int = 2
    weight_dim: object = 1
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int("MemRec", "rows", self.rows)
        _check_positive_int("MemRec", "weight_rows", self.weight_rows)
        _check_positive_int("MemRec", "hashes", self.hashes)
        self._ratio_or("rows")
        if self.ratio is not None and self.weight_rows is not None:
            raise ValueError("MemRec: weight_rows= goes with rows=, not with ratio=")
        if self.weight_dim not in (1, "full"):
            raise ValueError(f"MemRec: weight_dim must be 1 (scalar) or 'full' (embedding dim), got {self.weight_dim!r}")


@register_scheme(MemRec)
class MemRecScheme(TableScheme):
    presets = {"memrec": lambda r, d: MemRec(ratio=r, hashes=2)}
    per_value = True
    accepts_any_id = True  # every id is hashed, so any non-negative id has an embedding

    def __init__(self, table, config: MemRec) -> None:
        super().__init__(table, config)
        d = table.embedding_dim
        self.pack = PACK if config.weight_dim == 1 else 1  # ids per physical weight row
        self.wdim = PACK if config.weight_dim == 1 else d
        if config.rows is not None:
            self.rows = config.rows
            self.weight_rows = config.weight_rows or max(PACK, config.rows)
        else:
            elems = self._target_bytes() / 4
            physical = max(1, int(elems * WEIGHT_SHARE) // self.wdim)
            self.weight_rows = self.pack * physical
            self.rows = int((elems - physical * self.wdim) // d)
            if self.rows < 1:
                raise self._too_small(f"the budget of {elems:.0f} floats holds no row of dim {d}")

    def physical_tables(self) -> List[PhysicalTable]:
        return [
            PhysicalTable("__tok", self.rows, self.table.embedding_dim, uniform_init(self.table), lookups=self.config.hashes),
            PhysicalTable("__alpha", ceil_div(self.weight_rows, self.pack), self.wdim, constant_init(1.0), role="hashed weights",
                          elementwise_optimizer=self.pack > 1),
        ]

    def _weight_slot(self, values: torch.Tensor) -> torch.Tensor:
        return universal_hash(values, self.weight_rows, self.config.seed * 1000 + 999)

    def transform(self, values: torch.Tensor) -> List[torch.Tensor]:
        """``[N]`` ids -> K x ``[N]`` token rows h_k(x), then ``[N]`` weight rows h_w(x) // pack."""
        toks = [universal_hash(values, self.rows, self.config.seed * 1000 + k) for k in range(self.config.hashes)]
        return toks + [torch.div(self._weight_slot(values), self.pack, rounding_mode="floor")]

    def combine(self, parts: List[torch.Tensor], values: torch.Tensor) -> torch.Tensor:
        """K x ``[N, d]`` token rows, ``[N, 4]`` packed scalars or ``[N, d]`` vectors -> ``[N, d]``."""
        *toks, alpha = parts
        if self.pack > 1:
            alpha = alpha.gather(1, torch.remainder(self._weight_slot(values), self.pack).unsqueeze(1))
        return alpha * torch.stack(toks).sum(dim=0)

    # --- the plain-torch reference of the paper's equation (the tests compare against it) ----
    @staticmethod
    def reference(table, config, w, x: int, state) -> torch.Tensor:
        """alpha(x) * SUM_k T[h_k(x)]; W (weight slots) is a derived size, not stored in the table shape."""
        n = table.name
        tok, alpha = w[f"{n}__tok"], w[f"{n}__alpha"]
        slot = py_hash(x, MemRecScheme(table, config).weight_rows, config.seed * 1000 + 999)
        a = alpha.reshape(-1)[slot] if config.weight_dim == 1 else alpha[slot]
        return a * sum(tok[py_hash(x, tok.shape[0], config.seed * 1000 + k)] for k in range(config.hashes))
