"""Preprocessed Criteo in TorchRec's binary layouts.

* one-hot: ``day_{d}_dense.npy`` (float32 ``[N, 13]``, already ``log(x + 3)``),
  ``day_{d}_sparse.npy`` (int ``[N, 26]``), ``day_{d}_labels.npy`` (int ``[N, 1]``), as
  written by ``torchrec/datasets/scripts/npy_preproc_criteo.py``; read by TorchRec's own
  ``InMemoryBinaryCriteoIterDataPipe`` (memory-mapped, ids taken modulo the table sizes).
* MLPerf DLRMv2 multi-hot: the same dense and labels files plus
  ``day_{d}_sparse_multi_hot.npz`` holding one int array ``[N, hotness_f]`` per feature,
  named ``"0" .. "25"`` (``materialize_synthetic_multihot_dataset.py`` of the MLPerf
  reference). TorchRec's pip package has no reader for it, so :class:`MultiHotCriteoNpy`
  is one.

Batches are ``torchrec.datasets.utils.Batch`` with float labels ``[B]``; global batch i goes
to rank ``i mod world_size``; each split yields the same number of batches on every rank
(the rows that cannot be shared evenly are dropped and reported).
"""
from __future__ import annotations

import os
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch
from torchrec.datasets.criteo import InMemoryBinaryCriteoIterDataPipe
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from .synthetic import cat_names

STAGES = ("train", "val", "test")


def day_paths(root: str, days: Sequence[int], part: str) -> List[str]:
    """``root/day_{d}_{part}`` for each day; raises naming the first missing file."""
    paths = [os.path.join(root, f"day_{d}_{part}") for d in days]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"criteo npy: {missing[0]} not found ({len(missing)} of {len(paths)} day files missing under {root})")
    return paths


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


class CriteoNpy:
    """One-hot Criteo npy days through TorchRec's ``InMemoryBinaryCriteoIterDataPipe``.

    Args:
        root: folder with the ``day_{d}_{dense,sparse,labels}.npy`` files.
        days: which days; ``stage`` ``val`` / ``test`` read the first / second half of
            the first day given (TorchRec's convention for the last day).
        num_embeddings: 26 table sizes; ids are taken modulo them.
    """

    def __init__(self, root: str, days: Sequence[int], num_embeddings: Sequence[int], batch_size: int,
                 stage: str = "train", rank: int = 0, world_size: int = 1) -> None:
        _check_stage(stage)
        if len(num_embeddings) != 26:
            raise ValueError(f"criteo npy: 26 table sizes needed, got {len(num_embeddings)}")
        self.pipe = InMemoryBinaryCriteoIterDataPipe(
            stage, day_paths(root, days, "dense.npy"), day_paths(root, days, "sparse.npy"), day_paths(root, days, "labels.npy"),
            batch_size=batch_size, rank=rank, world_size=world_size, drop_last=True, mmap_mode=True, hashes=list(num_embeddings))

    def __len__(self) -> int:
        return len(self.pipe)

    def __iter__(self) -> Iterator[Batch]:
        for b in self.pipe:  # int32 ids and labels on disk; the model wants int64 ids, float labels
            kjt = b.sparse_features
            yield Batch(b.dense_features.float(),
                        KeyedJaggedTensor(kjt.keys(), kjt.values().long(), lengths=kjt.lengths().long(), stride=kjt.stride()),
                        b.labels.float().reshape(-1))


class MultiHotCriteoNpy:
    """MLPerf DLRMv2 multi-hot days: ``Batch`` with bags of ``hotness_f`` ids per feature.

    Args:
        root, days, stage: as :class:`CriteoNpy`.
        num_embeddings: 26 table sizes (ids are taken modulo them, as in MLPerf).
        multi_hot: expected ids per sample of each feature; a file that disagrees raises.

    The npz members are read one day at a time (an ``.npz`` cannot be memory-mapped): a
    full CriteoTB day needs ~170 GB of RAM, as in the MLPerf reference.
    """

    def __init__(self, root: str, days: Sequence[int], num_embeddings: Sequence[int], multi_hot: Sequence[int], batch_size: int,
                 stage: str = "train", rank: int = 0, world_size: int = 1) -> None:
        _check_stage(stage)
        if len(num_embeddings) != len(multi_hot):
            raise ValueError(f"criteo multi-hot: {len(num_embeddings)} table sizes but {len(multi_hot)} multi-hot sizes")
        self.dense = day_paths(root, days, "dense.npy")
        self.labels = day_paths(root, days, "labels.npy")
        self.sparse = day_paths(root, days, "sparse_multi_hot.npz")
        if stage != "train":
            self.dense, self.labels, self.sparse = self.dense[:1], self.labels[:1], self.sparse[:1]
        self.cards = torch.tensor(list(num_embeddings), dtype=torch.int64)
        self.multi_hot = [int(h) for h in multi_hot]
        self.keys = cat_names(len(self.multi_hot))
        self.batch_size, self.stage, self.rank, self.world_size = batch_size, stage, rank, world_size
        rows = [np.load(p, mmap_mode="r").shape[0] for p in self.dense]
        self.ranges = [self._rows(n) for n in rows]
        total = sum(b - a for a, b in self.ranges)
        self.num_batches = total // batch_size // world_size  # per rank
        self.dropped_rows = total - self.num_batches * batch_size * world_size

    def _rows(self, n: int) -> tuple:
        half = (n + 1) // 2
        return {"train": (0, n), "val": (0, half), "test": (half, n)}[self.stage]

    def __len__(self) -> int:
        return self.num_batches

    def _load_day(self, i: int):
        a, b = self.ranges[i]
        dense = np.load(self.dense[i], mmap_mode="r")[a:b]
        labels = np.load(self.labels[i], mmap_mode="r")[a:b].reshape(-1)
        with np.load(self.sparse[i]) as z:
            missing = [str(f) for f in range(len(self.keys)) if str(f) not in z.files]
            if missing:
                raise ValueError(f"{self.sparse[i]}: no array for feature(s) {missing} (expected members '0'..'{len(self.keys) - 1}')")
            sparse = [z[str(f)][a:b] for f in range(len(self.keys))]
        for f, (arr, h) in enumerate(zip(sparse, self.multi_hot)):
            if arr.ndim != 2 or arr.shape[1] != h or arr.shape[0] != b - a:
                raise ValueError(f"{self.sparse[i]}: feature {self.keys[f]} has shape {arr.shape}, expected [{b - a}, {h}] (multi_hot[{f}] = {h})")
            if arr.size and arr.min() < 0:
                raise ValueError(f"{self.sparse[i]}: feature {self.keys[f]} has negative id {int(arr.min())}")
        return dense, labels, sparse

    def __iter__(self) -> Iterator[Batch]:
        batch, bs, world = 0, self.batch_size, self.world_size
        carry: Optional[tuple] = None  # rows left over at the end of a day
        for i in range(len(self.dense)):
            if batch >= self.num_batches * world:
                return
            dense, labels, sparse = self._load_day(i)
            if carry is not None:  # a batch may straddle two days
                dense, labels = np.concatenate([carry[0], dense]), np.concatenate([carry[1], labels])
                sparse = [np.concatenate([c, s]) for c, s in zip(carry[2], sparse)]
            start = 0
            while start + bs <= len(labels) and batch < self.num_batches * world:
                if batch % world == self.rank:
                    yield self._batch(dense[start:start + bs], labels[start:start + bs], [s[start:start + bs] for s in sparse])
                start, batch = start + bs, batch + 1
            carry = (dense[start:], labels[start:], [s[start:] for s in sparse])

    def _batch(self, dense: np.ndarray, labels: np.ndarray, sparse: List[np.ndarray]) -> Batch:
        b = len(labels)
        values = torch.cat([torch.remainder(torch.from_numpy(np.ascontiguousarray(s)).long().reshape(-1), self.cards[f])
                            for f, s in enumerate(sparse)])
        lengths = torch.tensor(self.multi_hot, dtype=torch.int64).repeat_interleave(b)
        return Batch(torch.from_numpy(np.array(dense, dtype=np.float32)),
                     KeyedJaggedTensor(self.keys, values, lengths=lengths, stride=b),
                     torch.from_numpy(np.array(labels, dtype=np.float32)))
