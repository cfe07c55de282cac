"""Saec (similarity-aware embedding compression, seed 001): e(x) = C[cluster(x)].

k centroid rows per table and an id -> cluster map. The procedure follows the paper's fast
frequency-based variant and runs by itself while training: for ``warm_steps`` steps the
table trains uncompressed (a ``[v, d]`` warm-up table, training memory only) while its ids
are counted; then the embeddings of the most frequent ids are clustered with
frequency-weighted k-means, the seen tail ids go to the nearest centroid, never-seen ids
keep their hashed cluster (the map's initial value), and the centroids are fine-tuned for
the rest of training. Export deploys the centroids and the map only. The map is int16
when k fits, else int32; it costs v * 2 (or 4) bytes, which caps the ratio at 2d (or d).

Per field: the paper clusters "similar features within a field". When several features
share the table (``feature_names``), ids are counted per feature ([F * v] counts, training
memory only) and each field is clustered on its own, into its own block of centroids
(:func:`split_clusters`: field f gets k_f ~ k * n_f / N rows, n_f the distinct seen ids it
owns, at least 1 each). The map keeps one entry per id (no extra memory), so an id seen in
several fields belongs to the field that looked it up most often (ties: the first in
``feature_names``); its k-means weight is its count over all fields, since every lookup of
it reads its centroid. A one-feature table is clustered exactly as one field.

Against the paper (only its abstracts are at hand: arXiv 2019, APSys 2020): as
there, clustering is within a field and the fast clustering rests on the heavy tail of the
ids: only the ``head_fraction`` most frequent ids are clustered, the tail is assigned to
the nearest centroid afterwards (one pass, no k-means over the tail). Ours, not stated
there: k-means weighted by id frequency, k-means++ seeding with ``kmeans_restarts``
restarts, never-seen ids at a hashed centroid, the budget split across fields, and one
field per id when fields share a table (in the paper each field has its own ids).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Dict, Hashable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import JaggedTensor

from ..config import SchemeConfig, _check_positive_int, _check_steps, register_scheme
from ..ops import universal_hash
from .base import Constants, PhysicalTable, Routed, TableAccess, ragged_parts, uniform_init
from .lifecycle import Scheduled


@dataclasses.dataclass(frozen=True)
class Saec(SchemeConfig):
    """``Saec(clusters=k)`` or ``Saec(ratio=R)``; ``head_fraction`` of the seen ids (most frequent) are
    clustered after ``warm_steps`` training steps of the uncompressed table (0: no warm-up;
    ``fit_`` clusters given embeddings)."""

    clusters: Optional[int] = None
    head_fraction: float = 0.2
    kmeans_iters: int = 25
    seed: int = 0
    warm_steps: int = 100
    kmeans_restarts: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int("Saec", "clusters", self.clusters)
        _check_positive_int("Saec", "kmeans_iters", self.kmeans_iters)
        _check_positive_int("Saec", "kmeans_restarts", self.kmeans_restarts)
        self._ratio_or("clusters")
        _check_steps("Saec", "warm_steps", self.warm_steps)
        if not 0.0 < self.head_fraction <= 1.0:
            raise ValueError(f"Saec: head_fraction must be in (0, 1], got {self.head_fraction!r}")


@register_scheme(Saec)
class SaecScheme(Scheduled):
    presets = {"saec": lambda r, d: Saec(ratio=r)}
    STAGES = ("warm-up", "clustered")
    counts_per_feature = True  # each field (feature of the table) is clustered apart

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
        self.ragged = config.warm_steps > 0  # ids go to the warm-up table, then to the centroids
        self.identity_combine = not self.ragged
        self.fields = max(1, len(table.feature_names or ()))  # features sharing the table, clustered apart

    @property
    def count_steps(self) -> int:
        return self.config.warm_steps

    def initial_buffers(self) -> Dict[str, torch.Tensor]:
        ids = torch.arange(self.table.num_embeddings)
        out = {"cluster_of": universal_hash(ids, self.clusters, self.config.seed).to(self.map_dtype), **self.lifecycle_buffers()}
        if "counts" in out and self.fields > 1:  # one count per (field, id), field-major [F * v]: training memory only
            out["counts"] = torch.zeros(self.fields * self.table.num_embeddings, dtype=torch.int32)
        return out

    def physical_tables(self) -> List[PhysicalTable]:
        centroids = PhysicalTable("__centroids", self.clusters, self.table.embedding_dim, uniform_init(self.table))
        if not self.config.warm_steps:
            return [centroids]
        v, d = self.table.num_embeddings, self.table.embedding_dim
        return [PhysicalTable("__warm", v, d, uniform_init(self.table), role="warm-up (training only)"), centroids]

    def batch_key(self) -> Hashable:
        return ("saec", self.table.embedding_dim, self.config.warm_steps)

    def batch_maps(self, index: int) -> Dict[str, torch.Tensor]:
        return {"cluster_of": self.buffers.cluster_of}

    def map_buffers(self) -> List[torch.Tensor]:
        return [self.buffers.cluster_of]

    def batch_active(self) -> Optional[List[bool]]:
        if not self.config.warm_steps:
            return None
        clustered = self.fitted()
        return [not clustered, clustered]

    def transform(self, values: torch.Tensor, c: Optional[Constants] = None) -> List[torch.Tensor]:
        """``[N]`` ids -> ``[N]`` cluster rows (and the ids themselves for the warm-up table);
        in a batch every id reads its own table's map (``c``: the maps laid end to end)."""
        rows = (self.buffers.cluster_of[values] if c is None else c["cluster_of"][values + c["cluster_of_start"]]).to(torch.int64)
        return [values, rows] if self.config.warm_steps else [rows]

    def route(self, jt: JaggedTensor) -> Routed:
        """While warming up every id reads its own row of the warm-up table, then its centroid."""
        if not self.config.warm_steps:
            return super().route(jt)
        values = jt.values()
        clustered = (self.buffers.stage >= self.FITTED).to(values.device).expand(values.shape)  # host stage: a copy, no sync
        return ragged_parts(jt, torch.stack(self.transform(values), dim=1), [~clustered, clustered])

    def combine(self, parts: List[torch.Tensor], values: Optional[torch.Tensor], c: Optional[Constants] = None) -> torch.Tensor:
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]

    def table_bytes(self) -> int:  # the deployed centroids; the warm-up table is training memory
        return self.clusters * self.table.embedding_dim * 4

    def memory_parts(self) -> Dict[str, int]:
        return {f"{self.table.name}__centroids": self.table_bytes(), f"{self.table.name} (maps)": self.extra_bytes()}

    def training_bytes(self) -> int:
        warm = self.table.num_embeddings * self.table.embedding_dim * 4 if self.config.warm_steps else 0
        return super().training_bytes() + warm

    # --- the procedure ---------------------------------------------------------------------
    @torch.no_grad()
    def see_features(self, values: List[torch.Tensor], group: Optional[dist.ProcessGroup]) -> None:
        """``[N_f]`` ids of each feature (``feature_names`` order): field f's id x is counted at
        ``f * v + x`` (one all-gather for every field; a fixed number of ops whatever F)."""
        if self.fields == 1:
            return self.see(values[0], group)
        flat = torch.cat(values).to(torch.int64)
        sizes = torch.tensor([x.numel() for x in values], device=flat.device)
        offsets = torch.arange(self.fields, device=flat.device) * self.table.num_embeddings
        self.see(flat + offsets.repeat_interleave(sizes, output_size=flat.numel()), group)

    def count_offset(self, field: int) -> int:
        return field * self.table.num_embeddings if self.fields > 1 else 0

    def counted(self) -> torch.Tensor:
        """``[F, v]`` int64 counts per field gathered so far (``[v]`` for one field)."""
        c = super().counted()
        return c if self.fields == 1 else c.view(self.fields, self.table.num_embeddings)

    @torch.no_grad()
    def event(self, tables: TableAccess) -> Dict[str, torch.Tensor]:
        """After the warm-up: cluster the warmed-up embeddings of the counted ids."""
        if self.stage == 0:
            self.fit(self.counted(), tables, tables.read("__warm"))
        return {}

    @torch.no_grad()
    def fit(self, counts: torch.Tensor, tables: TableAccess, embeddings: Optional[torch.Tensor] = None) -> None:
        """Cluster ``embeddings [v, d]`` (default: the warm-up table as trained so far) given id
        ``counts``, ``[F, v]`` per feature or ``[v]`` (one field): writes the map and the
        centroid table, identically on every rank."""
        if embeddings is None:
            if not self.config.warm_steps:
                raise ValueError(f"Saec: table {self.table.name!r} has no warm-up table (warm_steps=0): give its embeddings")
            embeddings = tables.read("__warm")
        v, d = self.table.num_embeddings, self.table.embedding_dim
        if tuple(embeddings.shape) != (v, d):
            raise ValueError(f"Saec: table {self.table.name!r}: embeddings have shape {tuple(embeddings.shape)}, expected {(v, d)}")
        tables.write("__centroids", self.cluster(embeddings.cpu(), counts.cpu(), tables.read("__centroids").cpu()))
        self._set_host("stage", self.FITTED)

    def inference(self, tables: TableAccess):
        """Deployed: the centroids and the map, without the warm-up table."""
        if not self.config.warm_steps:
            return None
        state = {"cluster_of": self.buffers.cluster_of.detach().clone(), "stage": self.buffers.stage.detach().clone()}
        return dataclasses.replace(self.config, warm_steps=0), {"__centroids": tables.read("__centroids")}, state

    def cluster(self, embeddings: torch.Tensor, counts: torch.Tensor, current: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Cluster ``embeddings [v, d]`` given id ``counts``, ``[v]`` (one field) or ``[F, v]``
        (per field: field f's rows are a block of k_f centroids, see the module docstring);
        writes the map, returns centroids ``[k, d]``.

        Fewer seen ids than clusters (a short warm-up on a large table): every seen id keeps
        its own row (its embedding), and the unseen ids are hashed into the rows left over,
        which keep their ``current [k, d]`` values (a warning says so). More fields with seen
        ids than clusters: the fields are clustered as one (a warning says so)."""
        per_field = counts.reshape(-1, self.table.num_embeddings)  # [F, v]
        total = per_field[0] if per_field.shape[0] == 1 else per_field.sum(0)  # [v] lookups of each id, any field
        seen = (total > 0).nonzero().squeeze(1)
        if seen.numel() == 0:
            raise ValueError(f"Saec: table {self.table.name!r}: no id was seen in the statistics")
        x = embeddings.detach().float()
        if seen.numel() <= self.clusters:
            return self._own_rows(x, seen, current)
        field = per_field[:, seen].argmax(dim=0)  # [n] the field that looks each id up most (ties: the first)
        owned = [seen[field == f] for f in range(per_field.shape[0])]
        if sum(1 for o in owned if o.numel()) > self.clusters:
            warnings.warn(f"Saec: table {self.table.name!r}: {self.clusters} clusters cannot give each of its "
                          f"{per_field.shape[0]} fields one; its fields are clustered as one", stacklevel=3)
            owned = [seen]
        blocks, offset = [], 0
        for f, (ids, k) in enumerate(zip(owned, split_clusters(self.clusters, [o.numel() for o in owned]))):
            if k:  # field f's centroids are rows [offset, offset + k)
                blocks.append(self._cluster_field(x, ids, total, k, offset, f))
                offset += k
        return torch.cat(blocks)

    def _cluster_field(self, x: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor, k: int, offset: int, field: int) -> torch.Tensor:
        """Frequency-weighted k-means of one field's seen ``ids [n]`` (n >= k; weights
        ``counts [v]``) into map rows ``[offset, offset + k)``: the head is clustered, the tail
        goes to its nearest centroid. Writes the map of ``ids``, returns the centroids ``[k, d]``."""
        n_head = max(k, int(round(self.config.head_fraction * ids.numel())))
        order = counts[ids].argsort(descending=True, stable=True)
        head, tail = ids[order[:n_head]], ids[order[n_head:]]
        w = counts[head].float()
        # the best of ``kmeans_restarts`` seeded runs (lowest weighted inertia), as sklearn's n_init; field 0 as one field
        runs = [kmeans(x[head], k, w, self.config.kmeans_iters, self.config.seed * 1000 + r + field * 1_000_003)
                for r in range(self.config.kmeans_restarts)]
        centroids, head_assign = min(runs, key=lambda ca: float((w * (x[head] - ca[0][ca[1]]).pow(2).sum(1)).sum()))
        cluster_of = self.buffers.cluster_of
        cluster_of[head.to(cluster_of.device)] = (offset + head_assign).to(self.map_dtype).to(cluster_of.device)
        if tail.numel():
            cluster_of[tail.to(cluster_of.device)] = (offset + nearest(x[tail], centroids)).to(self.map_dtype).to(cluster_of.device)
        return centroids

    def _own_rows(self, x: torch.Tensor, seen: torch.Tensor, current: Optional[torch.Tensor]) -> torch.Tensor:
        n, k = seen.numel(), self.clusters
        warnings.warn(f"Saec: table {self.table.name!r}: only {n} distinct ids were seen for {k} clusters; each keeps its own "
                      f"row and the unseen ids share the other {k - n} (warm up longer, or use fewer clusters)", stacklevel=3)
        cluster_of = self.buffers.cluster_of
        unseen = torch.ones(self.table.num_embeddings, dtype=torch.bool)
        unseen[seen] = False
        rest = unseen.nonzero().squeeze(1)
        cluster_of[seen.to(cluster_of.device)] = torch.arange(n).to(self.map_dtype).to(cluster_of.device)
        if rest.numel():
            rows = n + universal_hash(rest, k - n, self.config.seed) if k > n else universal_hash(rest, k, self.config.seed)
            cluster_of[rest.to(cluster_of.device)] = rows.to(self.map_dtype).to(cluster_of.device)
        centroids = current.detach().float().clone() if current is not None else torch.zeros(k, x.shape[1])
        centroids[:n] = x[seen]
        return centroids

    # --- the plain-torch reference of the paper's equation (the tests compare against it) ----
    @staticmethod
    def reference(table, config, w, x: int, state) -> torch.Tensor:
        """Warm-up: the id's own row; then C[cluster(x)]."""
        n = table.name
        if config.warm_steps and int(state["stage"]) == 0:
            return w[f"{n}__warm"][x]
        return w[f"{n}__centroids"][int(state["cluster_of"][x])]


def split_clusters(k: int, sizes: List[int]) -> List[int]:
    """``k`` centroid rows over fields of ``sizes[f]`` distinct ids (their sum N > k, at most k
    of them non-empty): field f gets ~ k * n_f / N rows, at least 1 and at most n_f where
    n_f > 0, 0 where n_f = 0. Largest remainders (Hamilton): the floors of the quotas, raised
    to 1, then the rows still owed go to the largest remainders, or the rows raised too many
    come back from the most over-served fields (ties: the earlier field); plain Python
    arithmetic, the same on every rank."""
    n = sum(sizes)
    quota = [k * s / n for s in sizes]
    rows = [min(s, max(1, int(q))) if s else 0 for s, q in zip(sizes, quota)]
    while sum(rows) < k:
        f = max((f for f, s in enumerate(sizes) if rows[f] < s), key=lambda f: quota[f] - rows[f])
        rows[f] += 1
    while sum(rows) > k:
        f = max((f for f in range(len(sizes)) if rows[f] > 1), key=lambda f: rows[f] - quota[f])
        rows[f] -= 1
    return rows


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
    xx = (x * x).sum(1)  # [n] once: each new centre's squared distances are one matrix-vector product

    def sq_dist(c: torch.Tensor) -> torch.Tensor:
        return (xx - 2 * (x @ c) + c @ c).clamp(min=0)

    chosen = [torch.multinomial(weights, 1, generator=g)]
    d2 = sq_dist(x[chosen[0][0]])
    for _ in range(1, k):  # k-means++: next centre with probability ~ w * D^2
        p = weights * d2
        idx = torch.multinomial(p if p.sum() > 0 else weights, 1, generator=g)
        chosen.append(idx)  # gathered once at the end (a cat per centre copied O(k^2 d))
        d2 = torch.minimum(d2, sq_dist(x[idx[0]]))
    centroids = x[torch.cat(chosen)]
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
