"""Data-driven fitting of schemes that need statistics before training."""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Tuple, Union

import torch
from torch import nn

from .distributed.state import copy_full_into_
from .modules.compressed_ebc import CompressedEmbeddingBagCollection
from .schemes.freq_threshold import FreqThresholdScheme
from .schemes.saec import SaecScheme
from .stats import FrequencyStats


def table_counts(stats: FrequencyStats, features: List[str], top: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(ids, counts) of a table's ids summed over its features: exact, or heavy hitters."""
    ids_all, counts_all = [], []
    for f in features:
        if f in stats.exact:
            c = stats.exact[f]
            nz = c.nonzero().squeeze(1)
            ids_all.append(nz)
            counts_all.append(c[nz])
        else:
            i, c = stats.top_k(f, top)
            ids_all.append(i)
            counts_all.append(c)
    ids, counts = torch.cat(ids_all), torch.cat(counts_all)
    uniq, inv = torch.unique(ids, return_inverse=True)
    return uniq, torch.zeros_like(uniq).index_add_(0, inv, counts)


def fit_frequency_(model: nn.Module, data: Union[FrequencyStats, Iterable[object]]) -> Dict[str, int]:
    """Fill the frequent-id maps of every ``FreqThreshold`` table in ``model`` from ``data``:
    a ``FrequencyStats`` keyed by feature name (the same, all-reduced, on every rank) or
    batches / KJTs to count (all-reduced here). Returns table -> ids given a private row."""
    stats = data if isinstance(data, FrequencyStats) else _stats_from(model, data, FreqThresholdScheme)
    kept: Dict[str, int] = {}
    for m in model.modules():
        if not isinstance(m, CompressedEmbeddingBagCollection):
            continue
        for t in m.embedding_bag_configs():
            impl = m.scheme(t.name)
            if isinstance(impl, FreqThresholdScheme):
                missing = [f for f in t.feature_names if f not in stats.num_embeddings]
                if missing:
                    raise ValueError(f"fit_frequency_: table {t.name!r}: no statistics for features {missing}")
                ids, counts = table_counts(stats, t.feature_names, impl.capacity)
                kept[t.name] = impl.fit(ids, counts)
    if not kept:
        raise ValueError("fit_frequency_: the model has no FreqThreshold table")
    return kept


def _count_vector(stats: FrequencyStats, features: List[str], num_embeddings: int) -> torch.Tensor:
    """``[v]`` counts summed over ``features`` (sketched features: their heavy hitters only)."""
    counts = torch.zeros(num_embeddings, dtype=torch.int64)
    for f in features:
        if f in stats.exact:
            counts += stats.exact[f]
        else:
            ids, c = stats.top_k(f, stats.top_k_size)
            counts.index_add_(0, ids, c)
    return counts


def _stats_from(model: nn.Module, data: Iterable[object], scheme_type: type) -> FrequencyStats:
    """Count the features of every ``scheme_type`` table of ``model`` over ``data`` (all ranks)."""
    vocab = {
        f: t.num_embeddings
        for m in model.modules() if isinstance(m, CompressedEmbeddingBagCollection)
        for t in m.embedding_bag_configs() if isinstance(m.scheme(t.name), scheme_type)
        for f in t.feature_names
    }
    return FrequencyStats(vocab).update_from(data).all_reduce()


def fit_saec_(
    model: nn.Module, embeddings: Mapping[str, torch.Tensor], data: Union[FrequencyStats, Iterable[object]]
) -> Dict[str, int]:
    """Fit every ``Saec`` table of ``model`` from warmed-up embeddings and id statistics.

    Args:
        model: holds CompressedEmbeddingBagCollections (unsharded, or sharded by DMP).
        embeddings: logical table name -> ``[v, d]`` embeddings of the warmed-up
            uncompressed table (e.g. ``ebc.embedding_bags[name].weight``).
        data: id counts keyed by feature name (all-reduced: the same on every rank), or
            batches / KJTs to count them from (all-reduced here under torch.distributed).
    Returns:
        table -> number of distinct ids that were assigned a cluster from data.

    Writes the id -> cluster map and sets the centroid table to the k-means centroids;
    fine-tune afterwards. Call it on every rank with the same inputs.
    """
    stats = data if isinstance(data, FrequencyStats) else _stats_from(model, data, SaecScheme)
    fitted: Dict[str, int] = {}
    for m in model.modules():
        if not isinstance(m, CompressedEmbeddingBagCollection):
            continue
        state = m.state_dict()
        for t in m.embedding_bag_configs():
            impl = m.scheme(t.name)
            if not isinstance(impl, SaecScheme):
                continue
            if t.name not in embeddings:
                raise ValueError(f"fit_saec_: no warmed-up embeddings given for Saec table {t.name!r}")
            emb = embeddings[t.name]
            if tuple(emb.shape) != (t.num_embeddings, t.embedding_dim):
                raise ValueError(f"fit_saec_: table {t.name!r}: embeddings have shape {tuple(emb.shape)}, expected {(t.num_embeddings, t.embedding_dim)}")
            counts = _count_vector(stats, t.feature_names, t.num_embeddings)
            centroids = impl.fit(emb, counts)
            copy_full_into_(state[f"pooled.embedding_bags.{t.name}__centroids.weight"], centroids)
            fitted[t.name] = int((counts > 0).sum())
    if not fitted:
        raise ValueError("fit_saec_: the model has no Saec table")
    return fitted
