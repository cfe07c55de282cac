"""Mem-Rec (Jha et al. 2023): e(x) = alpha(x) * SUM_k T[h_k(x) mod D],
alpha(x) = SUM_j A[g_j(x) mod W].

A token table T (D x d) read through K independent hashes of the id (a Bloom-filter
signature: two ids rarely share all K rows) and a weight alpha(x) Bloom-encoded the same
way in a much smaller weight table A, through K' hashes of its own (``weight_hashes``; the
paper encodes both; K' = 1 is a single hashed weight). Neither table depends on the
vocabulary size v, so the ratio is unbounded (1000x+ on CriteoTB). Scalar weights are
packed 4 per physical row (FBGEMM dims are multiples of 4) and start at 1 / K', so that
alpha starts at 1. With a scalar alpha the token lookups are pooled bags weighted by
alpha(x) (FBGEMM's weighted TBE, like MEmCom); a vector alpha (``weight_dim="full"``) makes
this a per-id scheme.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Hashable, List, Optional

import torch

from ..config import SchemeConfig, _check_positive_int, register_scheme
from ..ops import hash_constants, hash_with, py_hash
from .base import Constants, PhysicalTable, TableScheme, ceil_div, constant_init, uniform_init

PACK = 4
WEIGHT_SHARE = 0.1  # share of the budget given to the weight table when sizes come from ratio=


@dataclasses.dataclass(frozen=True)
class MemRec(SchemeConfig):
    """``MemRec(ratio=1000)`` or ``MemRec(rows=D, weight_rows=W)``; ``hashes`` = K, ``weight_hashes`` = K';
    ``seed`` picks the hashes.

    ``weight_dim``: 1 (a scalar alpha(x), packed 4 per row) or ``"full"`` (a vector
    alpha(x) of the embedding dim, applied elementwise)."""

    rows: Optional[int] = None
    weight_rows: Optional[int] = None
    hashes: int = 2
    weight_dim: object = 1
    seed: int = 0
    weight_hashes: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int("MemRec", "rows", self.rows)
        _check_positive_int("MemRec", "weight_rows", self.weight_rows)
        _check_positive_int("MemRec", "hashes", self.hashes)
        _check_positive_int("MemRec", "weight_hashes", self.weight_hashes)
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
        self.id_weighted = config.weight_dim == 1  # a scalar alpha: pooled, weighted token bags
        self.per_value = not self.id_weighted  # a vector alpha: per-id products
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
            PhysicalTable("__alpha", ceil_div(self.weight_rows, self.pack), self.wdim, constant_init(1.0 / self.config.weight_hashes),
                          role="hashed weights", lookups=self.config.weight_hashes, elementwise_optimizer=self.pack > 1),
        ]

    def batch_key(self) -> Hashable:
        return ("memrec", self.table.embedding_dim, self.config.hashes, self.config.weight_hashes, self.config.weight_dim)

    def constants(self) -> Dict[str, int]:
        """The K token hashes ``h{k}`` (seed * 1000 + k, m rows) and K' weight hashes ``g{j}`` (W slots)."""
        out: Dict[str, int] = {}
        for k in range(self.config.hashes):
            out.update(hash_constants(f"h{k}", self.rows, self.config.seed * 1000 + k))
        for j in range(self.config.weight_hashes):
            out.update(hash_constants(f"g{j}", self.weight_rows, weight_seed(self.config.seed, j)))
        return out

    def _weight_slots(self, values: torch.Tensor, c: Constants) -> List[torch.Tensor]:
        """K' x ``[N]`` weight slots g_j(x) in [0, W)."""
        return [hash_with(values, c, f"g{j}") for j in range(self.config.weight_hashes)]

    def transform(self, values: torch.Tensor, c: Optional[Constants] = None) -> List[torch.Tensor]:
        """``[N]`` ids -> K x ``[N]`` token rows h_k(x), then K' x ``[N]`` weight rows g_j(x) // pack."""
        c = c or self.constants()
        toks = [hash_with(values, c, f"h{k}") for k in range(self.config.hashes)]
        return toks + [torch.div(s, self.pack, rounding_mode="floor") for s in self._weight_slots(values, c)]

    def id_weight(self, parts: List[torch.Tensor], values: torch.Tensor, c: Optional[Constants] = None) -> torch.Tensor:
        """K' x ``[N, 4]`` packed weight rows (row g_j(x) // 4) -> ``[N]`` alpha(x) = SUM_j A[g_j(x)]."""
        slots = torch.stack(self._weight_slots(values, c or self.constants()), dim=1)  # [N, K']
        return torch.stack(parts, dim=1).gather(2, torch.remainder(slots, self.pack).unsqueeze(2)).sum(dim=(1, 2))

    def combine(self, parts: List[torch.Tensor], values: torch.Tensor, c: Optional[Constants] = None) -> torch.Tensor:
        """K x ``[N, d]`` token rows, K' x (``[N, 4]`` packed scalars or ``[N, d]`` vectors) -> ``[N, d]``."""
        toks, alphas = parts[:self.config.hashes], parts[self.config.hashes:]
        alpha = self.id_weight(alphas, values, c).unsqueeze(1) if self.pack > 1 else torch.stack(alphas).sum(dim=0)
        return alpha * torch.stack(toks).sum(dim=0)

    # --- the plain-torch reference of the paper's equation (the tests compare against it) ----
    @staticmethod
    def reference(table, config, w, x: int, state) -> torch.Tensor:
        """(SUM_j A[g_j(x)]) * SUM_k T[h_k(x)]; W (weight slots) is a derived size, not stored in the table shape."""
        n = table.name
        tok, alpha = w[f"{n}__tok"], w[f"{n}__alpha"]
        slots = [py_hash(x, MemRecScheme(table, config).weight_rows, weight_seed(config.seed, j)) for j in range(config.weight_hashes)]
        a = sum(alpha.reshape(-1)[s] if config.weight_dim == 1 else alpha[s] for s in slots)
        return a * sum(tok[py_hash(x, tok.shape[0], config.seed * 1000 + k)] for k in range(config.hashes))


def weight_seed(seed: int, j: int) -> int:
    """Seed of the j-th weight hash (apart from the token hashes' ``seed * 1000 + k``)."""
    return seed * 1000 + 999 - j
