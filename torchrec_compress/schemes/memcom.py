"""MEmCom (Pansare et al., arXiv 2203.10135): e(x) = w[x] * E[h(x) mod m].

A shared hashed table E (m x d) plus one trainable scalar per id. The scalars live in
an ordinary TorchRec table of ceil(v/4) rows x 4 (FBGEMM needs dims that are multiples
of 4): id x reads row x // 4, column x mod 4, so no memory is wasted on padding. Both
scalars are looked up per id; E is looked up in pooled bags with each id weighted by its
w[x] (FBGEMM's weighted TBE: sum_i w[x_i] E[h(x_i)] is the pooled product). The weights
are computed after the input distribution and fetched by position, so their gradient
(FBGEMM's per-sample-weight gradient) reaches w under every sharding type
(``distributed.positions``).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Hashable, List, Optional

import torch

from ..config import SchemeConfig, _check_positive_int, register_scheme
from ..ops import hash_constants, hash_with, py_hash
from .base import Constants, PhysicalTable, TableScheme, ceil_div, constant_init, uniform_init

PACK = 4  # scalars per physical row of the weight table


@dataclasses.dataclass(frozen=True)
class MEmCom(SchemeConfig):
    """``MEmCom(ratio=16)`` or ``MEmCom(rows=m)`` (rows of the shared table); ``seed`` picks the hash."""

    rows: Optional[int] = None
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int("MEmCom", "rows", self.rows)
        self._ratio_or("rows")


@register_scheme(MEmCom)
class MEmComScheme(TableScheme):
    presets = {"memcom": lambda r, d: MEmCom(ratio=r)}
    id_weighted = True

    def __init__(self, table, config: MEmCom) -> None:
        super().__init__(table, config)
        v, d = table.num_embeddings, table.embedding_dim
        self.weight_rows = ceil_div(v, PACK)
        if config.rows is not None:
            self.rows = config.rows
        else:
            shared_elems = self._target_bytes() / 4 - self.weight_rows * PACK
            self.rows = int(shared_elems // d)
            if self.rows < 1:
                raise self._too_small(
                    f"MEmCom keeps one fp32 weight per id, so its ratio must stay below embedding_dim={d} "
                    f"(at most ~{v * d / (v + d):.1f}x here)"
                )

    def physical_tables(self) -> List[PhysicalTable]:
        return [
            PhysicalTable("__shared", self.rows, self.table.embedding_dim, uniform_init(self.table)),
            PhysicalTable("__w", self.weight_rows, PACK, constant_init(1.0), role="per-id weights", elementwise_optimizer=True),
        ]

    def batch_key(self) -> Hashable:
        return ("memcom", self.table.embedding_dim)

    def constants(self) -> Dict[str, int]:
        return hash_constants("rows", self.rows, self.config.seed)

    def transform(self, values: torch.Tensor, c: Optional[Constants] = None) -> List[torch.Tensor]:
        """``[N]`` ids -> (``[N]`` h(x) mod m, ``[N]`` x // 4)."""
        return [hash_with(values, c or self.constants(), "rows"), torch.div(values, PACK, rounding_mode="floor")]

    def id_weight(self, parts: List[torch.Tensor], values: torch.Tensor, c: Optional[Constants] = None) -> torch.Tensor:
        """``[N, 4]`` packed weight rows (row x // 4) -> ``[N]`` w[x] (column x mod 4)."""
        return parts[0].gather(1, torch.remainder(values, PACK).unsqueeze(1)).squeeze(1)

    def combine(self, parts: List[torch.Tensor], values: torch.Tensor, c: Optional[Constants] = None) -> torch.Tensor:
        """``[N, d]`` shared rows, ``[N, 4]`` packed weights -> ``[N, d]`` = w[x] * E[h(x)]."""
        return parts[0] * self.id_weight(parts[1:], values, c).unsqueeze(1)

    # --- the plain-torch reference of the paper's equation (the tests compare against it) ----
    @staticmethod
    def reference(table, config, w, x: int, state) -> torch.Tensor:
        """Paper eq.: e(x) = w_x * E[h(x)]; the packed [v/4, 4] table read flat is w."""
        n = table.name
        shared = w[f"{n}__shared"]
        return w[f"{n}__w"].reshape(-1)[x] * shared[py_hash(x, shared.shape[0], config.seed)]
