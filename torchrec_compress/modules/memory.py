"""Honest memory accounting: every physical table and map a scheme keeps."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from tabulate import tabulate


@dataclass(frozen=True)
class TableMemory:
    """Bytes of one logical table (or the total). Optimizer state is not included.
    ``compressed_bytes`` is what the table deploys; ``training_bytes`` what it holds on top
    of that only while training (id counts, Saec's warm-up table, MPE's fp32 rows);
    ``paper_bytes`` the stored bytes as the scheme's paper counts them, where that leaves out
    state we count (FIITED: the kept chunks, without the free pool rows, the address
    structure and the utilities), else None. ``ratio`` is the honest one."""

    scheme: str
    compressed_bytes: int
    uncompressed_bytes: int
    parts: Dict[str, int] = field(default_factory=dict)
    training_bytes: int = 0
    paper_bytes: Optional[int] = None

    @property
    def ratio(self) -> float:
        return self.uncompressed_bytes / max(1, self.compressed_bytes)

    @property
    def paper_ratio(self) -> Optional[float]:
        """The ratio as the paper counts it (None where that is ``ratio``)."""
        return None if self.paper_bytes is None else self.uncompressed_bytes / max(1, self.paper_bytes)


@dataclass(frozen=True)
class MemoryReport:
    """``tables[name]`` per logical table; ``total`` sums them. ``uncompressed`` = fp32 rows x dim."""

    tables: Dict[str, TableMemory]

    @property
    def total(self) -> TableMemory:
        """The sums; ``paper_bytes`` (where any table has one) counts the other tables honestly."""
        tables = self.tables.values()
        paper = any(t.paper_bytes is not None for t in tables)
        return TableMemory(
            scheme="total",
            compressed_bytes=sum(t.compressed_bytes for t in tables),
            uncompressed_bytes=sum(t.uncompressed_bytes for t in tables),
            training_bytes=sum(t.training_bytes for t in tables),
            paper_bytes=sum(t.compressed_bytes if t.paper_bytes is None else t.paper_bytes for t in tables) if paper else None,
        )

    def __str__(self) -> str:
        paper = self.total.paper_bytes is not None  # a column only where a scheme's paper counts less
        rows: List[List[object]] = [
            [name, t.scheme, _fmt(t.uncompressed_bytes), _fmt(t.compressed_bytes), f"{t.ratio:.2f}x", _fmt(t.training_bytes)]
            + ([f"{t.paper_ratio:.2f}x" if t.paper_ratio is not None else "-"] if paper else [])
            for name, t in list(self.tables.items()) + [("TOTAL", self.total)]
        ]
        return tabulate(rows, headers=["table", "scheme", "fp32 bytes", "stored bytes", "ratio", "+ while training"]
                        + (["ratio as its paper counts"] if paper else []))


def _fmt(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)
