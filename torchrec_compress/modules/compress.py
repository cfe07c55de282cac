"""``compress_(model, schemes)``: swap every matching EBC inside a model, in place."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from ..config import SchemeConfig
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
