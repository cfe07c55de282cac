"""Honest memory accounting: every physical table and map a scheme keeps."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

from tabulate import tabulate


@dataclass(frozen=True)
class TableMemory:
    """Bytes of one logical table (or the total). Optimizer state is not included.
    ``compressed_bytes`` is what the table deploys; ``training_bytes`` what it holds on top
    of that only while training (id counts, Saec's warm-up table, MPE's fp32 rows)."""

    scheme: str
    compressed_bytes: int
    uncompressed_bytes: int
    parts: Dict[str, int] = field(default_factory=dict)
    training_bytes: int = 0

    @property
    def ratio(self) -> float:
        return self.uncompressed_bytes / max(1, self.compressed_bytes)


@dataclass(frozen=True)
class MemoryReport:
    """``tables[name]`` per logical table; ``total`` sums them. ``uncompressed`` = fp32 rows x dim."""

    tables: Dict[str, TableMemory]

    @property
    def total(self) -> TableMemory:
        return TableMemory(
            scheme="total",
            compressed_bytes=sum(t.compressed_bytes for t in self.tables.values()),
            uncompressed_bytes=sum(t.uncompressed_bytes for t in self.tables.values()),
            training_bytes=sum(t.training_bytes for t in self.tables.values()),
        )

    def __str__(self) -> str:
        rows: List[List[object]] = [
            [name, t.scheme, _fmt(t.uncompressed_bytes), _fmt(t.compressed_bytes), f"{t.ratio:.2f}x", _fmt(t.training_bytes)]
            for name, t in list(self.tables.items()) + [("TOTAL", self.total)]
        ]
        return tabulate(rows, headers=["table", "scheme", "fp32 bytes", "stored bytes", "ratio", "+ while training"])


def _fmt(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)
