"""Random jagged batches kept both as a KJT and as plain per-bag Python lists."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor


@dataclass
class Bags:
    """``ids[f][b]`` / ``weights[f][b]``: the ids (weights) of bag b of feature f."""

    keys: List[str]
    ids: Dict[str, List[List[int]]]
    weights: Optional[Dict[str, List[List[float]]]] = None

    @property
    def batch(self) -> int:
        return len(self.ids[self.keys[0]])

    def kjt(self, device: Optional[torch.device] = None) -> KeyedJaggedTensor:
        values = [i for f in self.keys for bag in self.ids[f] for i in bag]
        lengths = [len(bag) for f in self.keys for bag in self.ids[f]]
        weights = None
        if self.weights is not None:
            weights = torch.tensor([w for f in self.keys for bag in self.weights[f] for w in bag], dtype=torch.float32, device=device)
        return KeyedJaggedTensor.from_lengths_sync(
            keys=self.keys,
            values=torch.tensor(values, dtype=torch.int64, device=device),
            lengths=torch.tensor(lengths, dtype=torch.int64, device=device),
            weights=weights,
        )

    def slice(self, start: int, stop: int) -> "Bags":
        return Bags(
            self.keys,
            {f: v[start:stop] for f, v in self.ids.items()},
            None if self.weights is None else {f: v[start:stop] for f, v in self.weights.items()},
        )


def random_bags(
    tables: Sequence[EmbeddingBagConfig],
    batch: int,
    seed: int,
    max_len: int = 4,
    weighted: bool = False,
    keys: Optional[List[str]] = None,
) -> Bags:
    """Bags of 0..max_len ids (empty bags included) per feature, ids uniform in [0, rows)."""
    g = torch.Generator().manual_seed(seed)
    keys = keys or [f for t in tables for f in t.feature_names]
    rows = {f: t.num_embeddings for t in tables for f in t.feature_names}
    ids: Dict[str, List[List[int]]] = {}
    wts: Dict[str, List[List[float]]] = {}
    for f in keys:
        lens = torch.randint(0, max_len + 1, (batch,), generator=g).tolist()
        ids[f] = [torch.randint(0, rows[f], (n,), generator=g).tolist() for n in lens]
        wts[f] = [torch.rand(n, generator=g).add(0.5).tolist() for n in lens]
    return Bags(keys, ids, wts if weighted else None)


def write_lines(path, lines: Sequence[str], header: Optional[str] = None, gz: bool = True) -> str:
    """Write ``lines`` (after ``header`` when given) as a text file, gzip-compressed when ``gz``; returns the path."""
    import gzip

    text = "\n".join(([header] if header is not None else []) + list(lines)) + "\n"
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return str(path)
