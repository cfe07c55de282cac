"""``compress_(model, schemes)``: swap every matching EBC inside a model, in place;
``fit_(model, data)``: fit its data-driven schemes from statistics given up front."""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Union

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from ..config import SchemeConfig
from ..stats import FrequencyStats
from .compressed_ebc import CompressedEmbeddingBagCollection, replace_configs


def compress_(model: nn.Module, schemes: Mapping[str, SchemeConfig]) -> nn.Module:
    """Replace, in place, every ``torchrec.EmbeddingBagCollection`` in ``model`` that holds
    one of the tables named in ``schemes`` by a :class:`CompressedEmbeddingBagCollection`.

    Tables left uncompressed keep their trained weights. Works on e.g.
    ``torchrec.models.dlrm.DLRM`` (``model.sparse_arch.embedding_bag_collection``).

    Args:
        model: any module tree containing EBCs (a bare EBC is not replaceable in place:
            wrap it, or build a ``CompressedEmbeddingBagCollection`` directly).
        schemes: table name -> scheme config.
    Returns:
        ``model``, for chaining.
    """
    if isinstance(model, EmbeddingBagCollection):
        raise ValueError("compress_ swaps EBCs inside a model; for a bare EBC build CompressedEmbeddingBagCollection(tables, schemes)")
    found = set()
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not EmbeddingBagCollection:
                continue
            tables = replace_configs(child.embedding_bag_configs())
            mine = {t.name: schemes[t.name] for t in tables if t.name in schemes}
            if not mine:
                continue
            found.update(mine)
            new = CompressedEmbeddingBagCollection(tables, mine, is_weighted=child.is_weighted(), device=child.device)
            if child.device.type != "meta":
                with torch.no_grad():
                    for t in tables:
                        if t.name not in mine:
                            new.pooled.embedding_bags[t.name].weight.copy_(child.embedding_bags[t.name].weight)
            setattr(parent, child_name, new)
    missing = sorted(set(schemes) - found)
    if missing:
        raise ValueError(f"compress_: no EmbeddingBagCollection in the model holds tables {missing}")
    return model


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


@torch.no_grad()
def fit_(
    model: nn.Module,
    data: Union[FrequencyStats, Iterable[object]],
    embeddings: Optional[Mapping[str, torch.Tensor]] = None,
) -> Dict[str, str]:
    """Fit every data-driven scheme of ``model`` (FreqThreshold, Saec, MPE, ...) now, from
    statistics a user has up front, instead of from its first training steps. Optional: a
    scheme fits itself while training when this is never called. A no-op for other schemes.

    Args:
        model: holds CompressedEmbeddingBagCollections (unsharded, or sharded by DMP).
        data: id counts keyed by feature name (the same on every rank: all-reduced), or
            batches / KJTs to count them from (all-reduced here under torch.distributed).
        embeddings: logical table -> ``[v, d]`` embeddings to cluster (Saec; default: its
            warm-up table as trained so far).
    Returns:
        table -> scheme name, for every table fitted. Call it on every rank with the same inputs.

    Example::

        fit_(dmp, FrequencyStats({"user": 10**6}).update_from(train_batches))
    """
    found = [(m, t) for m in model.modules() if isinstance(m, CompressedEmbeddingBagCollection)
             for t in m.embedding_bag_configs() if m.scheme(t.name).data_driven]
    if not found:
        return {}
    if isinstance(data, FrequencyStats):
        stats = data
    else:
        stats = FrequencyStats({f: t.num_embeddings for _, t in found for f in t.feature_names}).update_from(data, progress=False)
        stats = stats.all_reduce()
    fitted: Dict[str, str] = {}
    for m, t in found:
        missing = [f for f in t.feature_names if f not in stats.num_embeddings]
        if missing:
            raise ValueError(f"fit_: table {t.name!r}: no statistics for features {missing}")
        m.materialize()
        impl = m.scheme(t.name)
        if impl.counts_per_feature:  # [F, v]: the scheme tells the table's features apart (Saec's fields)
            counts = torch.stack([_count_vector(stats, [f], t.num_embeddings) for f in t.feature_names])
        else:
            counts = _count_vector(stats, t.feature_names, t.num_embeddings)
        impl.fit(counts, m.tables(t.name), (embeddings or {}).get(t.name))
        fitted[t.name] = impl.name
    return fitted
