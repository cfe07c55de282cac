"""Packed per-id scalars (MEmCom's weights, Mem-Rec's alphas) keep one optimizer state per id."""
import torch
from torchrec import EmbeddingBagConfig

from torchrec_compress import MEmCom, MemRec
from torchrec_compress.models import build_dlrm
from torchrec_compress.testing.data import random_bags
from torchrec_compress.train.loop import local_process_group, shard_for_training


def _states(sparse_optimizer):
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=16, num_embeddings=4000, feature_names=[f]) for f in ("a", "b")]
    model = build_dlrm(tables, 1, [8], [8, 1], {"t_a": MEmCom(ratio=4), "t_b": MemRec(ratio=4)}, seed=0)
    dmp, opt = shard_for_training(model, model.sparse_arch, 0.05, 0.01, sparse_optimizer=sparse_optimizer)
    kjt = random_bags(tables, 8, seed=0).kjt()
    dmp(torch.ones(8, 1), kjt).sum().backward()
    fused = dmp.fused_optimizer
    return {name.split(".")[-2]: {k: tuple(v.size()) for k, v in fused.state[p].items() if hasattr(v, "size") and len(v.size())}
            for name, p in fused.params.items()}


def test_packed_weights_get_element_wise_adagrad_under_row_wise():
    with local_process_group():
        states = _states("rowwise_adagrad")
        assert [s for s in states["t_a__w"].values()] == [(1000, 4)]  # one state per id, 4 ids per row
        assert len(next(iter(states["t_a__shared"].values()))) == 1  # the shared rows stay row-wise
        alpha = next(iter(states["t_b__alpha"].values()))
        assert len(alpha) == 2 and alpha[1] > 1  # Mem-Rec's packed alphas: element-wise too
        assert len(next(iter(states["t_b__tok"].values()))) == 1  # its token rows stay row-wise
        plain = _states("sgd")  # other optimizers are left as asked
        assert all(not s for s in plain.values())
