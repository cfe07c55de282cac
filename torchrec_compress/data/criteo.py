"""Streaming Criteo TSV reader (Kaggle ``train.txt`` / 1TB ``day_N`` layout).

Rows: ``label, I1..I13, C1..C26`` tab-separated (test files: no label), empty field =
missing. Dense ints become ``log(1 + max(x, 0))`` (DLRM's transform; missing = 0).
Categorical 32-bit hex ids become ``int(hex, 16) mod num_embeddings[i]`` (missing = 0),
like TorchRec's ``hashes`` option. Rows shorter than the layout are padded with missing
values (files saved with trailing empty fields stripped); longer rows, non-numeric ints,
non-hex ids, bad labels and empty lines are counted and skipped; a truncated gzip ends
that file with a note. ``summary`` reports it all; a file that is mostly garbage raises.
"""
from __future__ import annotations

import gzip
import logging
import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from .synthetic import cat_names

NUM_INT, NUM_CAT = 13, 26
logger = logging.getLogger(__name__)


@dataclass
class ReadSummary:
    rows: int = 0
    padded: int = 0
    skipped: Dict[str, int] = field(default_factory=dict)
    truncated_files: List[str] = field(default_factory=list)

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1

    @property
    def bad(self) -> int:
        return sum(self.skipped.values())

    def __str__(self) -> str:
        parts = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none"
        trunc = f"; truncated gzip: {', '.join(self.truncated_files)}" if self.truncated_files else ""
        return f"criteo: {self.rows} rows read ({self.padded} short rows padded), skipped: {parts}{trunc}"


class CriteoTSV:
    """Iterable of ``Batch`` (dense ``[B, 13]``, KJT ``cat_0..cat_25`` one id each, labels ``[B]``).

    Args:
        paths: TSV files (``.gz`` accepted), read in order, streaming.
        num_embeddings: 26 table sizes (ids are taken modulo them).
        batch_size: rows per batch (the last batch may be smaller unless ``drop_last``).
        labelled: False for test files without the label column (labels are then 0).
        max_bad_fraction: stop with a ``ValueError`` once more than this share of at
            least ``min_rows_for_check`` lines is malformed.
        rank, world_size: under DMP each rank takes every world_size-th batch.
    """

    def __init__(self, paths: Sequence[str], num_embeddings: Sequence[int], batch_size: int, labelled: bool = True,
                 drop_last: bool = False, max_bad_fraction: float = 0.5, min_rows_for_check: int = 100,
                 rank: int = 0, world_size: int = 1) -> None:
        if len(num_embeddings) != NUM_CAT or min(num_embeddings) <= 0:
            raise ValueError(f"CriteoTSV: need 26 positive table sizes, got {list(num_embeddings)}")
        if batch_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"CriteoTSV: batch_size must be > 0 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
        self.paths, self.sizes, self.batch_size = list(paths), torch.tensor(list(num_embeddings)), batch_size
        self.labelled, self.drop_last, self.max_bad, self.min_rows = labelled, drop_last, max_bad_fraction, min_rows_for_check
        self.rank, self.world_size = rank, world_size
        self.summary = ReadSummary()

    def _parse(self, line: str) -> Optional[tuple]:
        cols = line.rstrip("\r\n").split("\t")
        width = 1 + NUM_INT + NUM_CAT if self.labelled else NUM_INT + NUM_CAT
        if cols == [""]:
            self.summary.skip("empty lines")
            return None
        if len(cols) > width:
            self.summary.skip("rows with too many columns")
            return None
        if len(cols) < width:
            self.summary.padded += 1
            cols += [""] * (width - len(cols))
        label = 0.0
        if self.labelled:
            if cols[0] not in ("0", "1"):
                self.summary.skip("bad labels")
                return None
            label = float(cols[0])
            cols = cols[1:]
        try:
            ints = [int(c) if c else 0 for c in cols[:NUM_INT]]
        except ValueError:
            self.summary.skip("non-numeric ints")
            return None
        try:
            cats = [int(c, 16) if c else 0 for c in cols[NUM_INT:]]
        except ValueError:
            self.summary.skip("non-hex ids")
            return None
        return label, ints, cats

    def _lines(self) -> Iterator[str]:
        for path in self.paths:
            opener = gzip.open if path.endswith(".gz") else open
            try:
                with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
                    yield from fh
            except (EOFError, zlib.error, gzip.BadGzipFile) as e:
                self.summary.truncated_files.append(f"{path} ({type(e).__name__})")
                logger.warning("criteo: %s is truncated or corrupt (%s); continuing with the next file", path, e)

    def _batch(self, rows: List[tuple]) -> Batch:
        labels = torch.tensor([r[0] for r in rows])
        dense = torch.log1p(torch.tensor([r[1] for r in rows], dtype=torch.float32).clamp(min=0))
        cats = torch.tensor([r[2] for r in rows], dtype=torch.int64) % self.sizes  # [B, 26]
        b = len(rows)
        kjt = KeyedJaggedTensor(keys=cat_names(NUM_CAT), values=cats.t().reshape(-1), lengths=torch.ones(b * NUM_CAT, dtype=torch.int64), stride=b)
        return Batch(dense_features=dense, sparse_features=kjt, labels=labels)

    def __iter__(self) -> Iterator[Batch]:
        self.summary = ReadSummary()
        rows: List[tuple] = []
        index = 0
        seen = 0
        for line in self._lines():
            seen += 1
            parsed = self._parse(line)
            if seen >= self.min_rows and self.summary.bad > self.max_bad * seen:
                raise ValueError(f"criteo: {self.summary.bad} of the first {seen} lines are malformed ({self}); is this a Criteo TSV file?")
            if parsed is None:
                continue
            self.summary.rows += 1
            rows.append(parsed)
            if len(rows) == self.batch_size:
                if index % self.world_size == self.rank:
                    yield self._batch(rows)
                rows, index = [], index + 1
        if rows and not self.drop_last and index % self.world_size == self.rank:
            yield self._batch(rows)
        if self.summary.bad or self.summary.truncated_files:
            logger.warning("%s", self.summary)

    def __repr__(self) -> str:
        return f"CriteoTSV({self.paths})"
