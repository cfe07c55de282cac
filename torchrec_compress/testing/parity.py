"""Sharded-vs-unsharded parity worker (run on 2 gloo ranks by the tests)."""
from __future__ import annotations

import copy
import dataclasses
from typing import Dict, List, Optional, Sequence

import torch
from torchrec import EmbeddingBagConfig, PoolingType
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from ..distributed.plans import uniform_plan
from ..distributed.state import load_full_state_dict_
from ..distributed.sharders import sharders
from ..modules import CompressedEmbeddingBagCollection
from ..modules.compressed_ebc import scheme_parameters
from ..schemes import FIITED, MPE, QR, FreqThreshold, Hashing, MEmCom, MemRec, MixedDim, Saec
from .data import random_bags
from .reference import physical_weights, rowwise_adagrad_step

LR, EPS = 0.1, 1e-8


def parity_tables() -> List[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name="t_plain", embedding_dim=8, num_embeddings=50, feature_names=["plain"]),
        EmbeddingBagConfig(name="t_hash", embedding_dim=16, num_embeddings=1000, feature_names=["hash_a", "hash_b"]),
        EmbeddingBagConfig(name="t_qr", embedding_dim=16, num_embeddings=900, feature_names=["qr"], pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="t_qradd", embedding_dim=16, num_embeddings=400, feature_names=["qradd"]),
        EmbeddingBagConfig(name="t_memcom", embedding_dim=16, num_embeddings=1000, feature_names=["memcom"]),
        EmbeddingBagConfig(name="t_memcom_mean", embedding_dim=8, num_embeddings=300, feature_names=["memcom_mean"], pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="t_memrec", embedding_dim=16, num_embeddings=5000, feature_names=["memrec"]),
        EmbeddingBagConfig(name="t_freq", embedding_dim=8, num_embeddings=200, feature_names=["freq"]),
        EmbeddingBagConfig(name="t_saec", embedding_dim=8, num_embeddings=300, feature_names=["saec"]),
        EmbeddingBagConfig(name="t_mpe", embedding_dim=16, num_embeddings=400, feature_names=["mpe"]),
        EmbeddingBagConfig(name="t_mpe_ranked", embedding_dim=16, num_embeddings=256, feature_names=["mpe_ranked"]),
        EmbeddingBagConfig(name="t_fiited", embedding_dim=16, num_embeddings=60, feature_names=["fiited"], pooling=PoolingType.MEAN),
        # FIITED's family: one flat address structure over these three, one see / route / observe per batch
        EmbeddingBagConfig(name="t_fiited2", embedding_dim=16, num_embeddings=80, feature_names=["fiited2_a", "fiited2_b"],
                           pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="t_fiited3", embedding_dim=16, num_embeddings=40, feature_names=["fiited3"]),
        EmbeddingBagConfig(name="t_md", embedding_dim=16, num_embeddings=500, feature_names=["md"], pooling=PoolingType.MEAN),
    ]


def parity_schemes() -> Dict[str, object]:
    return {
        "t_hash": Hashing(ratio=10, seed=3),
        "t_qr": QR(ratio=4),
        "t_qradd": QR(num_buckets=16, combiner="add"),
        "t_memcom": MEmCom(ratio=8),
        "t_memcom_mean": MEmCom(rows=20, seed=1),
        "t_memrec": MemRec(ratio=50, hashes=3),
        # the data-driven schemes run their whole procedure within the 3 parity steps, from
        # counts summed over the ranks: fitted before step 1 (FreqThreshold), clustered before
        # step 2 (Saec), grouped before step 1 and precisions chosen before step 2 (MPE; its
        # logits and clip are DDP-replicated parameters, searched with the penalty in step 1)
        "t_freq": FreqThreshold(capacity=20, shared_rows=5, fit_steps=1),
        "t_saec": Saec(clusters=12, warm_steps=2),
        "t_mpe": MPE(ratio=4, groups=4, fit_steps=1, search_steps=1),
        # ids ranked by frequency: groups are id ranges, no per-id map (the same events and resets)
        "t_mpe_ranked": MPE(ratio=8, groups=4, fit_steps=1, search_steps=1, ids_by_frequency=True, retrain_from="search"),
        "t_fiited": FIITED(pool=50, chunks=2, interval=2, min_chunks=1),  # prune/grow events before steps 1 and 2
        "t_fiited2": FIITED(pool=60, chunks=2, interval=2, seed=1),
        "t_fiited3": FIITED(pool=30, chunks=2, interval=3, seed=2),
        "t_md": MixedDim(dim=8),  # its d' x d projection is a DDP-replicated parameter
    }


def sharded_parity_worker(rank: int, world: int, sharding_type: str, device_type: str = "cpu") -> Dict[str, Dict[str, List[float]]]:
    """Row-wise Adagrad (TorchRec's usual choice), SGD (sensitive to gradient scale) and a
    weighted-KJT collection (SUM pooling) under row-wise Adagrad."""
    out = {opt: _parity_run(rank, world, sharding_type, opt, device_type) for opt in ("rowwise_adagrad", "sgd")}
    out["weighted"] = _parity_run(rank, world, sharding_type, "rowwise_adagrad", device_type, weighted=True)
    return out


def direct_parity_worker(rank: int, world: int, sharding_type: str) -> Dict[str, Dict[str, List[float]]]:
    """The parity of a direct plan (every feature one identity lookup: uncompressed, Hashing,
    FreqThreshold), whose inner output is the module's output."""
    subset = ("t_plain", "t_hash", "t_freq")
    return {opt: _parity_run(rank, world, sharding_type, opt, subset=subset) for opt in ("rowwise_adagrad", "sgd")}


def _parity_run(
    rank: int,
    world: int,
    sharding_type: str,
    optimizer: str,
    device_type: str = "cpu",
    weighted: bool = False,
    steps: int = 3,
    batch: int = 8,
    subset: Optional[Sequence[str]] = None,
) -> Dict[str, List[float]]:
    """Train the sharded and the unsharded module side by side; return max abs differences.

    The unsharded reference sees the global batch; each rank feeds its half to DMP. Loss =
    sum(out * G) for a fixed G. TorchRec averages gradients over ranks like DDP does (its
    embedding all-to-all divides by the world size in backward, comm_ops' gradient
    division), so the reference loss is scaled by 1/world.
    """
    torch.manual_seed(0)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device(device_type)
    tables, schemes = parity_tables(), parity_schemes()
    if subset is not None:
        tables = [t for t in tables if t.name in subset]
        schemes = {k: v for k, v in schemes.items() if k in subset}
    if weighted:
        tables = [dataclasses.replace(t, pooling=PoolingType.SUM) for t in tables]
    ref = CompressedEmbeddingBagCollection(copy.deepcopy(tables), schemes, is_weighted=weighted).to(device)
    model = CompressedEmbeddingBagCollection(copy.deepcopy(tables), schemes, is_weighted=weighted, device=torch.device("meta"))
    opt_cls, opt_kw = (RowWiseAdagrad, {"lr": LR, "eps": EPS}) if optimizer == "rowwise_adagrad" else (torch.optim.SGD, {"lr": LR})
    table_params = [p for inner in model.inner_collections() for p in inner.parameters()]
    apply_optimizer_in_backward(opt_cls, table_params, dict(opt_kw))
    dmp = DistributedModelParallel(
        model, device=device, plan=uniform_plan(model, sharding_type, world, device_type=device_type), sharders=sharders()
    )
    load_full_state_dict_(dmp.state_dict(), ref.state_dict())  # tables and id maps
    # data-parallel tables are not fused: TorchRec leaves them to the dense optimizer;
    # schemes' small parameters (MPE's logits, clip) are dense too, trained with SGD here
    dense = {n: p for n, p in in_backward_optimizer_filter(dmp.named_parameters()) if p.requires_grad}
    mine = {id(p) for p in scheme_parameters(dmp)}
    dp_tables = [p for p in dense.values() if id(p) not in mine]
    scheme_params = [p for p in dense.values() if id(p) in mine]
    dense_opts = ([opt_cls(dp_tables, **opt_kw)] if dp_tables else []) + ([torch.optim.SGD(scheme_params, lr=LR)] if scheme_params else [])

    ref_w = physical_weights(ref)
    blocks = {n: (world if sharding_type == "column_wise" and w.shape[1] % (4 * world) == 0 else 1) for n, w in ref_w.items()}
    state = {n: torch.zeros(w.shape[0], blocks[n], device=device) for n, w in ref_w.items()}
    reset_rows = ref._reset_rows

    def _reset_rows(physical: str, rows: torch.Tensor, impl) -> None:  # rows FIITED frees or grants restart their
        reset_rows(physical, rows, impl)  # Adagrad sum too, as the fused optimizer's do under DMP; a data-parallel
        if sharding_type != "data_parallel":  # table's state lives in the dense optimizer, out of the module's reach
            state[physical][rows] = 0.0

    ref._reset_rows = _reset_rows
    scale = 1.0 / world
    lo, hi = rank * batch // world, (rank + 1) * batch // world
    diffs: Dict[str, List[float]] = {"forward": [], "params": []}
    for step in range(steps):
        bags = random_bags(tables, batch, seed=100 + step, weighted=weighted)
        g = torch.randn(batch, sum(t.embedding_dim * len(t.feature_names) for t in tables), generator=torch.Generator().manual_seed(step)).to(device)
        out = dmp(bags.slice(lo, hi).kjt(device)).values()
        ref_out = ref(bags.kjt(device)).values()
        diffs["forward"].append((out - ref_out[lo:hi]).abs().max().item())
        (out * g[lo:hi]).sum().backward()
        for o in dense_opts:
            o.step()
            o.zero_grad()
        (ref_out * g).sum().mul(scale).backward()
        with torch.no_grad():
            for n, w in ref_w.items():
                if optimizer == "sgd":
                    w -= LR * w.grad
                else:
                    rowwise_adagrad_step(w, w.grad, state[n], LR, EPS, blocks[n])
                w.grad = None
            for p in scheme_parameters(ref):
                p -= LR * p.grad
                p.grad = None
        diffs["params"].append(_max_param_diff(dmp.state_dict(), ref.state_dict()))
    diffs["direct"] = [ref._plan(tuple(random_bags(tables, 1, seed=0).kjt().keys())).direct]
    if subset is not None:
        return diffs
    fiited = ref.scheme("t_fiited").buffers
    diffs["fiited_events_kept"] = [int(fiited.events), int(fiited.n_kept)]  # the parity covered a prune/grow event
    # ... and every data-driven scheme finished its procedure (fitted, clustered, precisions chosen)
    diffs["fitted"] = [ref.scheme(t).fitted() for t in ("t_freq", "t_saec", "t_mpe", "t_mpe_ranked")]
    return diffs


def _max_param_diff(sharded: Dict[str, object], full: Dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for name, t in sharded.items():
        glob = full[name].detach()
        if hasattr(t, "local_shards"):
            for shard in t.local_shards():
                o, s = shard.metadata.shard_offsets, shard.tensor.shape
                worst = max(worst, (shard.tensor - glob[o[0]:o[0] + s[0], o[1]:o[1] + s[1]]).abs().max().item())
        else:
            worst = max(worst, (t.detach() - glob).abs().max().item())
    return worst
