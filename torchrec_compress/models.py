"""The two builders every entry point shares: the logical tables of a data set, and the
DLRM / DLRM_DCN (``torchrec.models.dlrm``) over them, compressed by the given schemes."""
from __future__ import annotations

from typing import List, Mapping, Optional, Sequence

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.models.dlrm import DLRM, DLRM_DCN

from .config import SchemeConfig

META = torch.device("meta")


def logical_tables(features: Sequence[str], cardinalities: Sequence[int], dim: int) -> List[EmbeddingBagConfig]:
    """One table ``t_<feature>`` of ``cardinalities[i]`` rows x ``dim`` per feature."""
    if len(features) != len(cardinalities):
        raise ValueError(f"{len(features)} features but {len(cardinalities)} cardinalities")
    return [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=dim, num_embeddings=v, feature_names=[f])
            for f, v in zip(features, cardinalities)]


def build_dlrm(
    tables: Sequence[EmbeddingBagConfig],
    dense_in: int,
    dense_arch: Sequence[int],
    over_arch: Sequence[int],
    schemes: Optional[Mapping[str, SchemeConfig]] = None,
    kind: str = "dlrm",
    table_device: torch.device = META,
    dcn_num_layers: int = 3,
    dcn_low_rank_dim: int = 64,
    seed: Optional[int] = None,
) -> nn.Module:
    """DLRM (``kind="dlrm"``) or DLRMv2's DLRM_DCN (``"dlrm_dcn"``) with dense layers on CPU and
    the embedding tables on ``table_device`` (meta: DMP materializes them), then
    ``compress_``-ed by ``schemes``. ``dense_arch`` excludes its last layer, which is the
    embedding dim (DLRM's interaction needs it). ``seed``: the dense layers' init."""
    from .modules.compress import compress_

    dims = {t.embedding_dim for t in tables}
    if len(dims) != 1:
        raise ValueError(f"DLRM needs one embedding dim for every table, got {sorted(dims)}")
    if seed is not None:
        torch.manual_seed(seed)
    kw = dict(embedding_bag_collection=EmbeddingBagCollection(list(tables), device=table_device), dense_in_features=dense_in,
              dense_arch_layer_sizes=[*dense_arch, dims.pop()], over_arch_layer_sizes=list(over_arch),
              dense_device=torch.device("cpu"))
    if kind == "dlrm":
        model = DLRM(**kw)
    elif kind == "dlrm_dcn":
        model = DLRM_DCN(**kw, dcn_num_layers=dcn_num_layers, dcn_low_rank_dim=dcn_low_rank_dim)
    else:
        raise ValueError(f"model kind {kind!r}; use dlrm or dlrm_dcn")
    if schemes:
        compress_(model, dict(schemes))
    return model
