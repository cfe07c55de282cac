"""Per-feature id frequencies from a stream of KJTs, mergeable across ranks and saveable.

Small vocabularies keep exact counts (one int64 per id). Large ones (e.g. the 40M-row
CriteoTB tables) keep a count-min sketch (Cormode & Muthukrishnan 2005: ``depth`` rows
of ``width`` counters; estimate = min over rows, never below the true count, above it
by at most e*N/width with probability 1 - exp(-depth)) plus a bounded set of heavy-hitter
candidates ranked by their sketch estimate, so memory does not grow with the vocabulary.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from tqdm import tqdm

from ..ops import universal_hash


class CountMinSketch:
    """``depth x width`` int64 counters; ``add(ids)``, ``estimate(ids)``; seeds pick the hashes."""

    def __init__(self, width: int = 1 << 20, depth: int = 4, seed: int = 0, device: Optional[torch.device] = None) -> None:
        if width <= 0 or depth <= 0:
            raise ValueError(f"CountMinSketch: width and depth must be > 0, got width={width}, depth={depth}")
        self.width, self.depth, self.seed = width, depth, seed
        self.table = torch.zeros(depth, width, dtype=torch.int64, device=device)

    def _cols(self, ids: torch.Tensor) -> List[torch.Tensor]:
        return [universal_hash(ids, self.width, self.seed * 1000 + r) for r in range(self.depth)]

    def add(self, ids: torch.Tensor, counts: Optional[torch.Tensor] = None) -> None:
        """``ids``: ``[N]`` int64; ``counts``: ``[N]`` increments (default 1 each)."""
        counts = torch.ones_like(ids) if counts is None else counts
        for r, c in enumerate(self._cols(ids)):
            self.table[r].index_add_(0, c, counts.to(torch.int64))

    def estimate(self, ids: torch.Tensor) -> torch.Tensor:
        """``[N]`` upper bounds of the counts of ``ids``."""
        cols = self._cols(ids)
        return torch.stack([self.table[r][c] for r, c in enumerate(cols)]).min(dim=0).values

    def nbytes(self) -> int:
        return self.table.numel() * self.table.element_size()


class FrequencyStats:
    """Id counts per feature.

    Args:
        num_embeddings: feature name -> vocabulary size (rows of its table).
        exact_limit: vocabularies up to this size are counted exactly.
        sketch_width, sketch_depth: count-min sketch shape for larger vocabularies.
        top_k: heavy-hitter candidates kept per sketched feature.

    Example::

        stats = FrequencyStats({"user": 40_000_000, "ad": 10_000})
        stats.update_from(loader)                  # batches with .sparse_features, or KJTs
        stats.all_reduce()                         # under torch.distributed: every rank sees the global counts
        stats.count("user", torch.tensor([1, 2])) # exact or an upper bound
        ids, counts = stats.top_k("user", 100)
    """

    def __init__(
        self,
        num_embeddings: Mapping[str, int],
        exact_limit: int = 1 << 22,
        sketch_width: int = 1 << 20,
        sketch_depth: int = 4,
        top_k: int = 65536,
    ) -> None:
        if top_k <= 0:
            raise ValueError(f"FrequencyStats: top_k must be > 0, got {top_k}")
        self.num_embeddings = dict(num_embeddings)
        self.top_k_size = top_k
        self.exact: Dict[str, torch.Tensor] = {}
        self.sketch: Dict[str, CountMinSketch] = {}
        self.heavy: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.totals: Dict[str, int] = {f: 0 for f in self.num_embeddings}
        for f, v in self.num_embeddings.items():
            if v <= 0:
                raise ValueError(f"FrequencyStats: feature {f!r} has num_embeddings={v}; must be > 0")
            if v <= exact_limit:
                self.exact[f] = torch.zeros(v, dtype=torch.int64)
            else:
                self.sketch[f] = CountMinSketch(sketch_width, sketch_depth, seed=len(self.sketch))
                self.heavy[f] = (torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))

    # ------------------------------------------------------------------ counting
    def update(self, kjt: KeyedJaggedTensor) -> None:
        """Count the ids of every known feature of ``kjt`` (other keys are ignored)."""
        for f, jt in kjt.to_dict().items():
            if f not in self.num_embeddings:
                continue
            ids = jt.values().detach().to("cpu", torch.int64)
            if ids.numel() == 0:
                continue
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.num_embeddings[f]:
                bad = lo if lo < 0 else hi
                raise ValueError(f"FrequencyStats: feature {f!r}: id {bad} outside [0, {self.num_embeddings[f]})")
            self.totals[f] += ids.numel()
            if f in self.exact:
                self.exact[f] += torch.bincount(ids, minlength=self.num_embeddings[f])
            else:
                uniq, counts = torch.unique(ids, return_counts=True)
                self.sketch[f].add(uniq, counts)
                self._refresh_heavy(f, uniq)

    def update_from(self, batches: Iterable[object], max_batches: Optional[int] = None, progress: bool = True) -> "FrequencyStats":
        """Stream a data loader (``Batch`` objects with ``.sparse_features``, or KJTs)."""
        it = tqdm(batches, total=max_batches, desc="frequency stats", disable=not progress, unit="batch")
        for i, b in enumerate(it):
            if max_batches is not None and i >= max_batches:
                break
            self.update(getattr(b, "sparse_features", b))
        return self

    def _refresh_heavy(self, f: str, new_ids: torch.Tensor) -> None:
        ids = torch.unique(torch.cat([self.heavy[f][0], new_ids]))
        est = self.sketch[f].estimate(ids)
        if ids.numel() > self.top_k_size:
            est, order = est.topk(self.top_k_size)
            ids = ids[order]
        self.heavy[f] = (ids, est)

    # ------------------------------------------------------------------ queries
    def count(self, feature: str, ids: torch.Tensor) -> torch.Tensor:
        """``[N]`` counts (exact, or count-min upper bounds for sketched features)."""
        if feature in self.exact:
            return self.exact[feature][ids]
        return self.sketch[feature].estimate(ids.to(torch.int64))

    def top_k(self, feature: str, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` most frequent ids and their counts, most frequent first."""
        if feature in self.exact:
            counts, ids = self.exact[feature].topk(min(k, self.num_embeddings[feature]))
            return ids, counts
        ids, est = self.heavy[feature]
        est, order = est.sort(descending=True)
        return ids[order][:k], est[:k]

    def total(self, feature: str) -> int:
        return self.totals[feature]

    def nbytes(self) -> int:
        exact = sum(t.numel() * 8 for t in self.exact.values())
        sk = sum(s.nbytes() + 16 * self.heavy[f][0].numel() for f, s in self.sketch.items())
        return exact + sk

    # ------------------------------------------------------------------ merging, saving
    def merge_(self, other: "FrequencyStats") -> "FrequencyStats":
        """Add ``other``'s counts (same features and sketch shapes) into ``self``."""
        if other.num_embeddings != self.num_embeddings:
            raise ValueError("FrequencyStats.merge_: the two stats cover different features or vocabularies")
        for f in self.exact:
            self.exact[f] += other.exact[f]
        for f, s in self.sketch.items():
            if s.table.shape != other.sketch[f].table.shape:
                raise ValueError(f"FrequencyStats.merge_: sketch shapes differ for feature {f!r}")
            s.table += other.sketch[f].table
            self._refresh_heavy(f, other.heavy[f][0])
        for f in self.totals:
            self.totals[f] += other.totals[f]
        return self

    def all_reduce(self, group: Optional[dist.ProcessGroup] = None) -> "FrequencyStats":
        """Sum counts over all ranks in place (every rank ends with the global statistics)."""
        if not dist.is_initialized() or dist.get_world_size(group) == 1:
            return self
        for f in sorted(self.exact):
            dist.all_reduce(self.exact[f], group=group)
        for f in sorted(self.sketch):
            dist.all_reduce(self.sketch[f].table, group=group)
            gathered: List[Optional[torch.Tensor]] = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, self.heavy[f][0], group=group)
            self._refresh_heavy(f, torch.cat(gathered))
        totals = torch.tensor([self.totals[f] for f in sorted(self.totals)], dtype=torch.int64)
        dist.all_reduce(totals, group=group)
        self.totals = dict(zip(sorted(self.totals), totals.tolist()))
        return self

    def state_dict(self) -> Dict[str, object]:
        return {
            "num_embeddings": self.num_embeddings,
            "top_k": self.top_k_size,
            "exact": self.exact,
            "sketch": {f: (s.width, s.depth, s.seed, s.table) for f, s in self.sketch.items()},
            "heavy": self.heavy,
            "totals": self.totals,
        }

    def save(self, path: str) -> None:
        """Write atomically (temp file, then rename)."""
        tmp = f"{path}.tmp"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "FrequencyStats":
        sd = torch.load(path, weights_only=False)
        out = cls.__new__(cls)
        out.num_embeddings, out.top_k_size = sd["num_embeddings"], sd["top_k"]
        out.exact, out.heavy, out.totals = sd["exact"], sd["heavy"], sd["totals"]
        out.sketch = {}
        for f, (w, d, seed, table) in sd["sketch"].items():
            s = CountMinSketch(w, d, seed)
            s.table = table
            out.sketch[f] = s
        return out
