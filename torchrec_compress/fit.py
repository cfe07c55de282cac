"""Data-driven fitting of schemes that need statistics before training."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

from .modules.compressed_ebc import CompressedEmbeddingBagCollection
from .schemes.freq_threshold import FreqThresholdScheme
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


def fit_frequency_(model: nn.Module, stats: FrequencyStats) -> Dict[str, int]:
    """Fill the frequent-id maps of every ``FreqThreshold`` table in ``model`` from ``stats``
    (keyed by feature name). Returns table -> number of ids given a private row.
    Call it with the same (all-reduced) statistics on every rank."""
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
