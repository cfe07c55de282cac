"""Categorical-only CTR data held in memory: split three ways, ids from train-only vocabularies.

Shared by the Avazu and MovielensLatest readers: :class:`CtrSplit` (``ids [N, F]``,
``labels [N]``, one-hot batches with one constant dense feature), :class:`CtrData` (the
three splits and the table sizes), :func:`split_indices` (a fixed seeded permutation),
:func:`build_vocabulary` / :func:`encode` (ids by train frequency rank, 0 = out of
vocabulary), :func:`stable_hash`, and :func:`read_csv_rows`, the robust line loop (bad rows
counted and skipped, truncated gzip noted, mostly-garbage files raise).
"""
from __future__ import annotations

import gzip
import logging
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from .criteo import ReadSummary
from .frappe import FrappeSplit

logger = logging.getLogger(__name__)

DEFAULT_FRACTIONS: Tuple[float, float, float] = (0.8, 0.1, 0.1)
OOV = 0  # the out-of-vocabulary id in "vocab" mode


@dataclass
class CsvReadSummary(ReadSummary):
    """What a CSV reader read: ``rows`` kept, ``skipped`` counts by reason, truncated files,
    and whether the file had a header line."""

    name: str = "csv"
    header: bool = False

    def __str__(self) -> str:
        parts = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none"
        trunc = f"; truncated gzip: {', '.join(self.truncated_files)}" if self.truncated_files else ""
        return f"{self.name}: {self.rows} rows read ({'with' if self.header else 'no'} header), skipped: {parts}{trunc}"


@dataclass
class CtrSplit(FrappeSplit):
    """One split: ``ids [N, F]`` int64 per-field ids, ``labels [N]`` float in {0, 1},
    ``features`` the F feature names (the KJT keys, in column order of ``ids``)."""

    features: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def keys(self) -> List[str]:
        return list(self.features)


@dataclass
class CtrData:
    """A categorical-only CTR data set split three ways.

    ``features`` (F names) and ``cardinalities`` (F table sizes; every id of every split is
    below them) describe the tables; ``train`` / ``validation`` / ``test`` are
    :class:`CtrSplit` s (``ids [N, F]``, ``labels [N]``); ``summary`` is what the reader
    skipped; ``vocabularies[i]`` maps raw value -> id for feature i (``None`` in hash mode);
    ``dense_in`` = 1 (the constant dense feature)."""

    name: str
    features: List[str]
    cardinalities: List[int]
    train: CtrSplit
    validation: CtrSplit
    test: CtrSplit
    summary: CsvReadSummary
    vocabularies: Optional[List[Dict[Hashable, int]]] = None
    dense_in: int = 1

    @property
    def splits(self) -> Tuple[CtrSplit, CtrSplit, CtrSplit]:
        """``(train, validation, test)``."""
        return self.train, self.validation, self.test


def split_indices(n: int, seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row indices ``(train, validation, test)`` of a fixed seeded permutation of ``n`` rows
    (``torch.randperm`` with ``Generator().manual_seed(seed)``): ``int(n * fractions[0])``
    train rows, ``int(n * fractions[1])`` validation rows, the rest test. Each part is sorted
    (file order); together they are a partition of ``0..n-1``."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be 3 non-negative shares summing to 1, got {list(fractions)}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    a, b = int(n * fractions[0]), int(n * fractions[1])
    return tuple(p.sort().values for p in (perm[:a], perm[a:a + b], perm[a + b:]))  # type: ignore[return-value]


def build_vocabulary(values: Sequence[Hashable], min_count: int = 2) -> Dict[Hashable, int]:
    """Raw value -> id ``1..V`` by descending frequency (ties: ascending raw value), for values
    seen at least ``min_count`` times; everything else maps to :data:`OOV` (0) in :func:`encode`."""
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    kept = sorted(((c, v) for v, c in Counter(values).items() if c >= min_count), key=lambda cv: (-cv[0], cv[1]))
    return {v: i for i, (_, v) in enumerate(kept, 1)}


def encode(values: Sequence[Hashable], vocabulary: Dict[Hashable, int]) -> torch.Tensor:
    """``[N]`` int64 ids of ``values`` under ``vocabulary`` (unknown values -> :data:`OOV`)."""
    get = vocabulary.get
    return torch.tensor([get(v, OOV) for v in values], dtype=torch.int64)


def stable_hash(values: Sequence[Hashable], num_embeddings: int) -> torch.Tensor:
    """``[N]`` int64 ``crc32(str(value)) mod num_embeddings`` (stable across runs and machines)."""
    return torch.tensor([zlib.crc32(str(v).encode()) % num_embeddings for v in values], dtype=torch.int64)


def make_ctr_data(name: str, features: Sequence[str], columns: Sequence[Sequence[Hashable]], labels: torch.Tensor,
                  summary: CsvReadSummary, seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS, mode: str = "vocab",
                  min_count: int = 2, num_embeddings: Union[None, int, Sequence[int]] = None) -> CtrData:
    """Split ``columns`` (F lists of N raw values) and ``labels [N]`` with :func:`split_indices`
    and turn raw values into ids: ``mode="vocab"`` with vocabularies built from the train split
    only (see :func:`build_vocabulary`; tables ``V + 1`` rows, validation / test values unseen
    in train -> 0), ``mode="hash"`` with :func:`stable_hash` mod ``num_embeddings`` (one size
    or F sizes)."""
    f = len(features)
    if len(columns) != f:
        raise ValueError(f"{name}: {f} features but {len(columns)} columns")
    n = int(labels.numel())
    parts = split_indices(n, seed, fractions)
    if mode == "vocab":
        if num_embeddings is not None:
            raise ValueError(f"{name}: num_embeddings is for mode='hash'; vocab mode sizes the tables to the vocabulary")
        train_rows = parts[0].tolist()
        vocabs = [build_vocabulary([col[r] for r in train_rows], min_count) for col in columns]
        ids = torch.stack([encode(col, v) for col, v in zip(columns, vocabs)], 1) if f else torch.zeros(n, 0, dtype=torch.int64)
        cards: List[int] = [len(v) + 1 for v in vocabs]
    elif mode == "hash":
        sizes = [num_embeddings] * f if isinstance(num_embeddings, int) else list(num_embeddings or [])
        if len(sizes) != f or min(sizes, default=1) <= 0:
            raise ValueError(f"{name}: mode='hash' needs num_embeddings (one positive size or {f}), got {num_embeddings}")
        vocabs = None
        ids = torch.stack([stable_hash(col, s) for col, s in zip(columns, sizes)], 1)
        cards = [int(s) for s in sizes]
    else:
        raise ValueError(f"{name}: mode {mode!r}; use 'vocab' or 'hash'")
    splits = [CtrSplit(ids[p], labels[p], list(features)) for p in parts]
    return CtrData(name, list(features), cards, *splits, summary=summary, vocabularies=vocabs)


def read_csv_rows(path: str, summary: CsvReadSummary, parse: Callable[[List[str]], Optional[tuple]],
                  header: Sequence[str], max_bad_fraction: float = 0.5, min_rows_for_check: int = 100) -> Iterator[tuple]:
    """The robust line loop both readers share: yields ``parse(fields)`` of every good line
    of ``path`` (gzip or plain, comma-separated). ``parse`` returns ``None`` after counting
    why it skipped a line in ``summary``. A first line whose first field is ``header[0]`` is
    the header: it must equal ``header`` (else ``ValueError``, another layout), later copies
    are skipped as repeated headers;
    empty lines are skipped; a truncated gzip ends the file with a note; more than
    ``max_bad_fraction`` malformed lines (checked from ``min_rows_for_check`` lines on, and
    at the end) raise ``ValueError`` naming the file."""
    opener = gzip.open if path.endswith(".gz") else open
    seen = 0  # lines other than the header
    first = True  # no non-empty line yet

    def check(final: bool) -> None:
        if (seen >= min_rows_for_check or final) and summary.bad > max_bad_fraction * seen:
            raise ValueError(f"{path}: {summary.bad} of the {'' if final else 'first '}{seen} lines are malformed ({summary}); "
                             f"is this a {summary.name} CSV file?")

    try:
        with opener(path, "rt", encoding="utf-8", errors="replace", newline="") as fh:
            for line in fh:
                cols = line.rstrip("\r\n").split(",")
                seen += 1
                parsed = None
                if cols == [""]:
                    summary.skip("empty lines")
                elif cols[0] == header[0]:
                    if first and cols != list(header):
                        raise ValueError(f"{path}: header {','.join(cols)[:200]!r} is not the {summary.name} layout "
                                         f"{','.join(header)!r}")
                    if first:
                        summary.header, first = True, False
                        seen -= 1
                        continue
                    summary.skip("repeated header lines")
                else:
                    first = False
                    parsed = parse(cols)
                check(final=False)
                if parsed is not None:
                    summary.rows += 1
                    yield parsed
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        summary.truncated_files.append(f"{path} ({type(e).__name__})")
        logger.warning("%s: %s is truncated or corrupt (%s); keeping the %d rows before it", summary.name, path, e, summary.rows)
    if summary.rows == 0:
        raise ValueError(f"{path}: no valid rows ({summary}); is this a {summary.name} CSV file?")
    check(final=True)
    if summary.bad or summary.truncated_files:
        logger.warning("%s", summary)


