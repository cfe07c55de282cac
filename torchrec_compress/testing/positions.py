"""2-rank worker: float64 position codes through a sharded EBC's input distribution."""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ..distributed.ebc_sharder import CpuRowWiseEmbeddingBagCollectionSharder
from ..distributed.plans import uniform_plan
from ..distributed.positions import decode_positions, encode_positions, pull

ROWS = 40


class _Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        tables = [EmbeddingBagConfig(name="a", embedding_dim=8, num_embeddings=ROWS, feature_names=["fa"]),
                  EmbeddingBagConfig(name="b", embedding_dim=8, num_embeddings=ROWS, feature_names=["fb", "fc"])]
        self.ebc = EmbeddingBagCollection(tables, is_weighted=True, device=torch.device("meta"))

    def forward(self, kjt: KeyedJaggedTensor):  # noqa: ANN201
        return self.ebc(kjt)


def positions_worker(rank: int, world: int, sharding_type: str) -> Dict[str, List]:
    """Each rank (its own batch size: 3 + rank) sends ids whose weights are their position
    codes; returns its ids and, per distributed KJT, the received ids and decoded origins."""
    model = _Holder()
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=uniform_plan(model, sharding_type, world),
                                   sharders=[CpuRowWiseEmbeddingBagCollectionSharder()])
    sharded = dmp.module.ebc
    batch = 3 + rank
    g = torch.Generator().manual_seed(rank)
    lengths = torch.randint(0, 4, (3 * batch,), generator=g)
    values = torch.randint(0, ROWS, (int(lengths.sum()),), generator=g)
    kjt = KeyedJaggedTensor(keys=["fa", "fb", "fc"], values=values, lengths=lengths,
                            weights=encode_positions(values.numel(), rank, values.device))
    received = []
    for k in sharded.input_dist(sharded.create_context(), kjt).wait().wait():
        src, pos = decode_positions(k.weights())
        received.append((k.values().tolist(), src.tolist(), pos.tolist()))
    return {"values": values.tolist(), "received": received}


def pull_source(rank: int) -> torch.Tensor:
    """Rank ``rank``'s ``[5 + rank, 2]`` source of the pull tests (entries name their rank and place)."""
    return torch.arange((5 + rank) * 2, dtype=torch.float32).view(-1, 2) + 100 * rank


def pull_worker(rank: int, world: int) -> Dict[str, List]:
    """Each rank asks for random (rank, position) entries of every rank's :func:`pull_source`;
    returns what it got, what it asked and its source's gradient under grad = 1 + i."""
    source = pull_source(rank).requires_grad_()
    g = torch.Generator().manual_seed(10 + rank)
    m = 7 + 3 * rank
    src = torch.randint(0, world, (m,), generator=g)
    pos = torch.stack([torch.randint(0, 5 + int(s), (1,), generator=g)[0] for s in src])
    got = pull(source, src, pos)
    (got * (1.0 + torch.arange(m, dtype=torch.float32)).unsqueeze(1)).sum().backward()
    return {"got": got.tolist(), "src": src.tolist(), "pos": pos.tolist(), "grad": source.grad.tolist()}


def pull_empty_worker(rank: int, world: int) -> Dict[str, List]:
    """Rank 0 asks for nothing, rank 1 for rank 0's first three entries (empty splits)."""
    source = torch.arange(4.0).requires_grad_()
    m = 0 if rank == 0 else 3
    got = pull(source, torch.zeros(m, dtype=torch.int64), torch.arange(m))
    got.sum().backward()
    return {"got": got.tolist(), "grad": source.grad.tolist()}
