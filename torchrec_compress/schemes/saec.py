"""Saec (similarity-aware embedding compression, seed 001): e(x) = C[cluster(x)].

k centroid rows per table and an id -> cluster map. Fitting (``fit_saec_``) follows the
paper's fast frequency-based variant: cluster the embeddings of the most frequent ids
with frequency-weighted k-means, assign the seen tail ids to the nearest centroid, and
leave never-seen ids at their hashed cluster (the map's initial value, so an unfitted
Saec table behaves like hashing into k rows). The map is int16 when k fits, else int32;
it costs v * 2 (or 4) bytes, which caps the ratio at 2d (or d).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch

from ..config import SchemeConfig, _check_positive_int, register_scheme
from ..ops import universal_hash
from .base import PhysicalTable, TableScheme, uniform_init


@dataclasses.dataclass(frozen=True)
class Saec(SchemeConfig):
    """``Saec(clusters=k)`` or ``Saec(ratio=R)``; ``head_fraction`` of the seen ids (most frequent) are clustered."""

    clusters: Optional[int] = None
    head_fraction: float = 0.2
    kmeans_iters: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int("Saec", "clusters", self.clusters)
        _check_positive_int("Saec", "kmeans_iters", self.kmeans_iters)
        self._ratio_or("clusters")
        if not 0.0 < self.head_fraction <= 1.0:
            raise ValueError(f"Saec: head_fraction must be in (0, 1], got {self.head_fraction!r}")


@register_scheme(Saec)
class SaecScheme(TableScheme):
    def __init__(self, table, config: Saec) -> None:
        super().__init__(table, config)
        v, d = table.num_embeddings, table.embedding_dim
        if config.clusters is not None:
            self.clusters = min(config.clusters, v)
        else:
            budget = self._target_bytes()
            self.clusters = int((budget - v * 2) // (4 * d))  # assuming an int16 map
            if self.clusters > 32767:
                self.clusters = int((budget - v * 4) // (4 * d))
            if self.clusters < 1:
                raise self._too_small(f"the id -> cluster map alone costs 2 bytes per id, so at most ~{2 * d}x is reachable")
        self.map_dtype = torch.int16 if self.clusters <= 32767 else torch.int32

    def initial_buffers(self) -> Dict[str, torch.Tensor]:
        ids = torch.arange(self.table.num_embeddings)
        return {"cluster_of": universal_hash(ids, self.clusters, self.config.seed).to(self.map_dtype)}

    def physical_tables(self) -> List[PhysicalTable]:
        return [PhysicalTable("__centroids", self.clusters, self.table.embedding_dim, uniform_init(self.table))]

    def transform(self, values: torch.Tensor) -> List[torch.Tensor]:
        """``[N]`` ids -> ``[N]`` cluster rows."""
        return [self.buffers.cluster_of[values].to(torch.int64)]

    def combine(self, parts: List[torch.Tensor], values: torch.Tensor) -> torch.Tensor:
        return parts[0]

    def fit(self, embeddings: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Cluster ``embeddings [v, d]`` given id ``counts [v]``; writes the map, returns centroids ``[k, d]``."""
        seen = (counts > 0).nonzero().squeeze(1)
        if seen.numel() == 0:
            raise ValueError(f"Saec: table {self.table.name!r}: no id was seen in the statistics")
        n_head = max(self.clusters, int(round(self.config.head_fraction * seen.numel())))
        order = counts[seen].argsort(descending=True, stable=True)
        head, tail = seen[order[:n_head]], seen[order[n_head:]]
        x = embeddings.detach().float()
        centroids, head_assign = kmeans(x[head], self.clusters, counts[head].float(), self.config.kmeans_iters, self.config.seed)
        cluster_of = self.buffers.cluster_of
        cluster_of[head.to(cluster_of.device)] = head_assign.to(self.map_dtype).to(cluster_of.device)
        if tail.numel():
            cluster_of[tail.to(cluster_of.device)] = nearest(x[tail], centroids).to(self.map_dtype).to(cluster_of.device)
        return centroids


def nearest(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """``[n]`` index of the nearest centroid (L2) of each row of ``x [n, d]``."""
    return torch.cat([torch.cdist(x[i:i + chunk], centroids).argmin(dim=1) for i in range(0, x.shape[0], chunk)])


def kmeans(x: torch.Tensor, k: int, weights: torch.Tensor, iters: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weighted Lloyd k-means with k-means++ seeding. ``x [n, d]``, ``weights [n]`` -> (``[k, d]``, ``[n]``).

    Minimises SUM_i w_i ||x_i - c_{a(i)}||^2 (frequency-weighted, as Saec clusters by usage).
    """
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means: {n} points cannot make {k} clusters")
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.multinomial(weights, 1, generator=g)]
    d2 = torch.cdist(x, centroids).squeeze(1) ** 2
    for _ in range(1, k):  # k-means++: next centre with probability ~ w * D^2
        p = weights * d2
        idx = torch.multinomial(p if p.sum() > 0 else weights, 1, generator=g)
        centroids = torch.cat([centroids, x[idx]])
        d2 = torch.minimum(d2, (torch.cdist(x, x[idx]).squeeze(1)) ** 2)
    assign = nearest(x, centroids)
    for _ in range(iters):
        sums = torch.zeros_like(centroids).index_add_(0, assign, x * weights.unsqueeze(1))
        mass = torch.zeros(k, dtype=x.dtype).index_add_(0, assign, weights)
        empty = mass == 0
        centroids = torch.where(empty.unsqueeze(1), centroids, sums / mass.clamp(min=1e-12).unsqueeze(1))
        new = nearest(x, centroids)
        if torch.equal(new, assign):
            break
        assign = new
    return centroids, assign
