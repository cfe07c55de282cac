"""Plain-torch reference implementations of each scheme's equation.

They share no code path with the modules except the hash parameters: bags are pooled in
Python loops and the hash is recomputed with Python integers.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torchrec import EmbeddingBagConfig, PoolingType

from ..config import SchemeConfig
from ..ops import MERSENNE_P, hash_params
from ..schemes import FIITED, MPE, QR, FreqThreshold, Hashing, MEmCom, MemRec, Saec
from ..schemes.memrec import MemRecScheme
from .data import Bags


def py_hash(x: int, buckets: int, seed: int) -> int:
    a, b = hash_params(seed)
    return ((a * (x % MERSENNE_P) + b) % MERSENNE_P) % buckets


def reference_embedding(
    table: EmbeddingBagConfig, scheme: Optional[SchemeConfig], w: Dict[str, torch.Tensor], x: int,
    maps: Optional[Dict[str, Dict[str, torch.Tensor]]] = None,
) -> torch.Tensor:
    """e(x) ``[d]`` from the physical weights ``w`` (physical table name -> weight);
    ``maps``: table -> fitted id maps (FreqThreshold's frequent ids, Saec's clusters)."""
    n = table.name
    if scheme is None:
        return w[n][x]
    if isinstance(scheme, Hashing):
        return w[f"{n}__hash"][py_hash(x, w[f"{n}__hash"].shape[0], scheme.seed)]
    if isinstance(scheme, QR):
        m = w[f"{n}__r"].shape[0]
        q, r = w[f"{n}__q"][x // m], w[f"{n}__r"][x % m]
        return {"mult": lambda: q * r, "add": lambda: q + r, "concat": lambda: torch.cat([q, r])}[scheme.combiner]()
    if isinstance(scheme, MEmCom):
        shared = w[f"{n}__shared"]
        # paper eq.: e(x) = w_x * E[h(x)]; the packed [v/4, 4] table read flat is w
        return w[f"{n}__w"].reshape(-1)[x] * shared[py_hash(x, shared.shape[0], scheme.seed)]
    if isinstance(scheme, MemRec):
        # alpha(x) * SUM_k T[h_k(x)]; W (weight slots) is a derived size, not stored in the table shape
        tok, alpha = w[f"{n}__tok"], w[f"{n}__alpha"]
        slot = py_hash(x, MemRecScheme(table, scheme).weight_rows, scheme.seed * 1000 + 999)
        a = alpha.reshape(-1)[slot] if scheme.weight_dim == 1 else alpha[slot]
        return a * sum(tok[py_hash(x, tok.shape[0], scheme.seed * 1000 + k)] for k in range(scheme.hashes))
    if isinstance(scheme, FreqThreshold):
        frequent = maps[n]["frequent_ids"].tolist()
        ids = [i for i in frequent if i < 2**31 - 1]  # drop the padding sentinel
        if x in ids:  # its own row: the rank of x among the frequent ids
            return w[f"{n}__ft"][sorted(ids).index(x)]
        cap = len(frequent)
        return w[f"{n}__ft"][cap + py_hash(x, w[f"{n}__ft"].shape[0] - cap, scheme.seed)]
    if isinstance(scheme, MPE):
        return _reference_mpe(table, scheme, w[f"{n}__full"][x], maps[n], x)
    if isinstance(scheme, FIITED):  # eq. 1: kept chunks from the pool, pruned ones zero
        pool, c = w[f"{n}__pool"], scheme.chunks
        m = maps[n]
        kept = {int(k): int(sl) for k, sl in zip(m["keys"][: int(m["n_kept"])].tolist(), m["slots"][: int(m["n_kept"])].tolist())}
        s = table.embedding_dim // c
        return torch.cat([pool[kept[x * c + k]] if x * c + k in kept else torch.zeros(s) for k in range(c)])
    if isinstance(scheme, Saec):
        return w[f"{n}__centroids"][int(maps[n]["cluster_of"][x])]
    raise NotImplementedError(type(scheme))


def reference_forward(
    tables: List[EmbeddingBagConfig],
    schemes: Dict[str, SchemeConfig],
    w: Dict[str, torch.Tensor],
    bags: Bags,
    maps: Optional[Dict[str, Dict[str, torch.Tensor]]] = None,
) -> torch.Tensor:
    """``[B, sum(dims)]`` pooled output, features in table order, by explicit loops."""
    cols = []
    for t in tables:
        for f in t.feature_names:
            rows = []
            for b, bag in enumerate(bags.ids[f]):
                acc = torch.zeros(t.embedding_dim)
                for j, x in enumerate(bag):
                    e = reference_embedding(t, schemes.get(t.name), w, x, maps)
                    acc = acc + (bags.weights[f][b][j] * e if bags.weights is not None else e)
                if t.pooling == PoolingType.MEAN and bag:
                    acc = acc / len(bag)
                rows.append(acc)
            cols.append(torch.stack(rows))
    return torch.cat(cols, dim=1)


def physical_weights(module: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
    """Physical table name -> weight parameter of an unsharded CompressedEmbeddingBagCollection."""
    out = {}
    for inner in (module.pooled, module.per_id):
        if inner is not None:
            out.update({name: bag.weight for name, bag in inner.embedding_bags.items()})
    return out


def rowwise_adagrad_step(
    param: torch.Tensor, grad: torch.Tensor, state: torch.Tensor, lr: float, eps: float, column_blocks: int = 1
) -> None:
    """FBGEMM EXACT_ROWWISE_ADAGRAD on a dense grad: s_r += mean_j g_rj^2; w_r -= lr g_r / (sqrt(s_r) + eps).

    Rows without gradient are untouched (FBGEMM's update is sparse). ``column_blocks`` > 1
    mirrors column-wise sharding, where each column shard keeps its own row state.
    ``state``: ``[rows, column_blocks]``.
    """
    touched = grad.abs().sum(dim=1) > 0
    for k, (p, g) in enumerate(zip(param.chunk(column_blocks, dim=1), grad.chunk(column_blocks, dim=1))):
        state[touched, k] += g[touched].pow(2).mean(dim=1)
        p[touched] -= lr * g[touched] / (state[touched, k].sqrt().unsqueeze(1) + eps)


def scheme_maps(module: torch.nn.Module) -> Dict[str, Dict[str, torch.Tensor]]:
    """Table -> {name: tensor} of the id maps (and small parameters) of a CompressedEmbeddingBagCollection."""
    return {name: {**dict(holder.named_buffers()), **dict(holder.named_parameters())} for name, holder in module.maps.items()}


def fbgemm_stored(row: torch.Tensor, bits: int) -> torch.Tensor:
    """What FBGEMM's inference table returns for ``row [d]`` stored at ``bits`` (its own ops)."""
    if bits == 32:
        return row
    if bits == 0:
        return torch.zeros_like(row)
    if bits == 16:
        return row.half().float()
    q = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(row.detach().unsqueeze(0).contiguous(), bits)
    deq = torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(q, bits)[0]
    return row + (deq - row).detach()  # straight-through, as the scheme trains


def _reference_mpe(table: EmbeddingBagConfig, scheme: MPE, row: torch.Tensor, maps: Dict[str, torch.Tensor], x: int) -> torch.Tensor:
    """Search: SUM_p softmax(a_g / T)_p Q_p(clip_g(row)); retrain: Q_{bits_g}(clip_g(row))."""
    g = int(maps["group_of"][x])
    c = maps["clip"][g].abs()
    row = torch.maximum(torch.minimum(row, c), -c)
    cands = sorted(scheme.candidates)
    if int(maps["stage"]) == 0:
        p = torch.softmax(maps["logits"][g] / scheme.temperature, dim=0)
        return sum(p[k] * fbgemm_stored(row, b) for k, b in enumerate(cands))
    return fbgemm_stored(row, int(maps["bits"][g]))
