"""Frappe (Baltrunas et al. 2015) in libFM format: 10 one-hot fields, labels 1 / -1.

Rows read ``label idx:1 ... idx:1`` with one global index per field, in field order.
Global indices are mapped to per-field ids by the field offsets. The files live in
``../shared/data/frappe`` (not redistributable: read at run time, never copied).
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from typing import Iterator, List, Tuple

import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

FRAPPE_FIELDS: List[str] = ["user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather", "country", "city"]
FRAPPE_CARDINALITIES: List[int] = [957, 4082, 7, 7, 2, 3, 2, 9, 80, 233]
FRAPPE_FILES = {"train": "frappe.validation.libfm.gz", "test": "frappe.test.libfm.gz"}


@dataclass
class FrappeSplit:
    """``ids [N, 10]`` per-field ids, ``labels [N]`` in {0, 1}."""

    ids: torch.Tensor
    labels: torch.Tensor

    @property
    def keys(self) -> List[str]:
        """The KJT keys, in column order of ``ids``."""
        return FRAPPE_FIELDS

    def _batch(self, idx: torch.Tensor) -> Batch:
        b = idx.numel()
        return Batch(
            dense_features=torch.ones(b, 1),
            sparse_features=KeyedJaggedTensor(keys=list(self.keys), values=self.ids[idx].t().reshape(-1),
                                              lengths=torch.ones(b * self.ids.shape[1], dtype=torch.int64), stride=b),
            labels=self.labels[idx],
        )

    def batches(self, batch_size: int, shuffle_seed: int = -1, drop_last: bool = False) -> Iterator[Batch]:
        """``Batch`` objects: one constant dense feature (DLRM needs a dense input), one-hot
        features (``keys``); ``shuffle_seed >= 0``: a seeded permutation of the rows, else file order."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        n = self.ids.shape[0]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed)) if shuffle_seed >= 0 else torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        for s in range(0, stop, batch_size):
            yield self._batch(order[s:s + batch_size])

    def rank_batches(self, batch_size: int, rank: int, world: int) -> Iterator[Batch]:
        """This rank's share of every row, in file order, as the same number of batches on
        every rank (``k = ceil(N / (world x batch_size))``, sizes within one row of each other):
        evaluation steps ranks in lockstep, so uneven batch counts would drop rows."""
        n = self.ids.shape[0]
        k = max(1, -(-n // (world * batch_size)))
        chunks = torch.tensor_split(torch.arange(n), world * k)
        for i in range(k):
            yield self._batch(chunks[i * world + rank])

    def split(self, share: float, seed: int = 0) -> Tuple["FrappeSplit", "FrappeSplit"]:
        """``(rest, held_out)``: a fixed seeded permutation's last ``share`` of the rows is held out."""
        if not 0 < share < 1:
            raise ValueError(f"split share must be in (0, 1), got {share}")
        n = self.ids.shape[0]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        cut = n - max(1, int(round(n * share)))
        return FrappeSplit(self.ids[order[:cut]], self.labels[order[:cut]]), FrappeSplit(self.ids[order[cut:]], self.labels[order[cut:]])


def read_libfm(path: str) -> FrappeSplit:
    """Parse one Frappe libFM file (gzip or plain). Raises ``ValueError`` naming the line on a malformed row."""
    offsets = torch.tensor([0] + FRAPPE_CARDINALITIES).cumsum(0)[:-1]
    opener = gzip.open if path.endswith(".gz") else open
    rows, labels = [], []
    with opener(path, "rt") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 1 + len(FRAPPE_FIELDS) or parts[0] not in ("1", "-1"):
                raise ValueError(f"{path}:{lineno}: expected a label (1/-1) and {len(FRAPPE_FIELDS)} idx:1 entries, got {line.strip()[:80]!r}")
            labels.append(1.0 if parts[0] == "1" else 0.0)
            rows.append([int(p.split(":", 1)[0]) for p in parts[1:]])
    ids = torch.tensor(rows, dtype=torch.int64) - offsets
    card = torch.tensor(FRAPPE_CARDINALITIES)
    bad = (ids < 0) | (ids >= card)
    if bad.any():
        r, c = bad.nonzero()[0].tolist()
        raise ValueError(f"{path}: row {r + 1}, field {FRAPPE_FIELDS[c]!r}: global index {rows[r][c]} is outside that field's range")
    return FrappeSplit(ids, torch.tensor(labels))


def load_frappe(root: str) -> Tuple[FrappeSplit, FrappeSplit]:
    """(train, test): train = the validation file (57,722 rows), test = the test file (28,860)."""
    missing = [f for f in FRAPPE_FILES.values() if not os.path.exists(os.path.join(root, f))]
    if missing:
        raise FileNotFoundError(f"Frappe files {missing} not found under {root}")
    return tuple(read_libfm(os.path.join(root, FRAPPE_FILES[s])) for s in ("train", "test"))  # type: ignore[return-value]


def load_frappe_splits(root: str, validation_share: float = 0.1, seed: int = 0) -> Tuple[FrappeSplit, FrappeSplit, FrappeSplit]:
    """(train, validation, test): the validation file (57,722 rows) split 90/10 by a fixed
    seeded permutation into train (51,950) and validation (5,772), for model selection; the
    test file (28,860) is the held-out test split, never used for choices."""
    train, test = load_frappe(root)
    return (*train.split(validation_share, seed), test)
