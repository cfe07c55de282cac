"""Quotient-remainder trick (Shi et al. 2020; facebookresearch/dlrm ``QREmbeddingBag``).

e(x) = E_q[x // m] (*|+|concat) E_r[x mod m]: two tables of ceil(v/m) and m rows give
every id a unique embedding. The ``mult`` combiner is a per-id product, so it runs on
per-id lookups pooled afterwards; ``add`` and ``concat`` commute with pooling.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Hashable, List, Optional

import torch

from ..config import SchemeConfig, _check_positive_int, register_scheme
from .base import Constants, PhysicalTable, TableScheme, ceil_div, constant_init, uniform_init

COMBINERS = ("mult", "add", "concat")


@dataclasses.dataclass(frozen=True)
class QR(SchemeConfig):
    """``QR(ratio=8)`` or ``QR(num_buckets=m)``; ``combiner`` in mult | add | concat."""

    num_buckets: Optional[int] = None
    combiner: str = "mult"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int("QR", "num_buckets", self.num_buckets)
        self._ratio_or("num_buckets")
        if self.combiner not in COMBINERS:
            raise ValueError(f"QR: combiner={self.combiner!r} is not allowed; use one of {COMBINERS}")


@register_scheme(QR)
class QRScheme(TableScheme):
    presets = {"qr": lambda r, d: QR(ratio=r), "qr_add": lambda r, d: QR(ratio=r, combiner="add")}
    def __init__(self, table, config: QR) -> None:
        super().__init__(table, config)
        v, d = table.num_embeddings, table.embedding_dim
        self.per_value = config.combiner == "mult"
        self.dim = d // 2 if config.combiner == "concat" else d
        if config.combiner == "concat" and d % 8 != 0:
            raise ValueError(
                f"table {table.name!r}: QR concat splits embedding_dim={d} into two halves that must be "
                "multiples of 4 for FBGEMM; use a dim divisible by 8 or another combiner"
            )
        if config.num_buckets is not None:
            self.buckets = min(config.num_buckets, v)
        else:
            # rows m + ceil(v/m) must fit the budget T; m + v/m >= 2 sqrt(v), so QR caps at ~sqrt(v)/2 x.
            budget_rows = self._target_bytes() / (4 * self.dim)
            disc = budget_rows * budget_rows - 4 * v
            if disc < 0:
                best = v * d / (2 * math.sqrt(v) * self.dim)
                raise self._too_small(f"QR needs at least 2*sqrt(v) rows, so at most ~{best:.1f}x is reachable")
            m = int((budget_rows + math.sqrt(disc)) / 2)
            while m > 1 and m + ceil_div(v, m) > budget_rows:
                m -= 1
            self.buckets = max(1, min(m, v))
        self.quotients = ceil_div(v, self.buckets)

    def physical_tables(self) -> List[PhysicalTable]:
        # mult: the quotient table starts at 1 so e(x) starts as E_r[x mod m] at the table's own scale.
        q_init = constant_init(1.0) if self.config.combiner == "mult" else uniform_init(self.table)
        return [
            PhysicalTable("__q", self.quotients, self.dim, q_init),
            PhysicalTable("__r", self.buckets, self.dim, uniform_init(self.table)),
        ]

    def batch_key(self) -> Hashable:
        return ("qr", self.config.combiner, self.table.embedding_dim)

    def constants(self) -> Dict[str, int]:
        return {"m": self.buckets}

    def transform(self, values: torch.Tensor, c: Optional[Constants] = None) -> List[torch.Tensor]:
        """``[N]`` ids -> (``[N]`` x // m, ``[N]`` x mod m)."""
        m = (c or self.constants())["m"]
        return [torch.div(values, m, rounding_mode="floor"), torch.remainder(values, m)]

    def combine(self, parts: List[torch.Tensor], values: Optional[torch.Tensor], c: Optional[Constants] = None) -> torch.Tensor:
        q, r = parts
        if self.config.combiner == "mult":
            return q * r
        if self.config.combiner == "add":
            return q + r
        return torch.cat([q, r], dim=-1)

    # --- the plain-torch reference of the paper's equation (the tests compare against it) ----
    @staticmethod
    def reference(table, config, w, x: int, state) -> torch.Tensor:
        """e(x) = E_q[x // m] (* | + | concat) E_r[x mod m]."""
        n = table.name
        m = w[f"{n}__r"].shape[0]
        q, r = w[f"{n}__q"][x // m], w[f"{n}__r"][x % m]
        return {"mult": lambda: q * r, "add": lambda: q + r, "concat": lambda: torch.cat([q, r])}[config.combiner]()
