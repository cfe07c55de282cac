"""Plain-torch reference implementations of each scheme's equation.

They share no code path with the modules except the hash parameters: bags are pooled in
Python loops and the hash is recomputed with Python integers.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torchrec import EmbeddingBagConfig, PoolingType

from ..config import SchemeConfig, scheme_class_for
from ..ops import py_hash  # noqa: F401  (re-exported for tests)
from ..schemes.mpe import fbgemm_stored  # noqa: F401  (re-exported for tests)
from .data import Bags


def reference_embedding(
    table: EmbeddingBagConfig, scheme: Optional[SchemeConfig], w: Dict[str, torch.Tensor], x: int,
    maps: Optional[Dict[str, Dict[str, torch.Tensor]]] = None,
) -> torch.Tensor:
    """e(x) ``[d]`` from the physical weights ``w`` (physical table name -> weight) by the
    scheme's own declared reference (``TableScheme.reference``, next to the scheme);
    ``maps``: table -> its state (id maps, stage, small parameters)."""
    if scheme is None:
        return w[table.name][x]
    impl = scheme_class_for(scheme)
    if getattr(impl, "reference", None) is None:
        raise NotImplementedError(f"{type(scheme).__name__} declares no reference implementation")
    return impl.reference(table, scheme, w, x, (maps or {}).get(table.name))


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
    for inner in module.inner_collections():
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


def reference_leaves(module: torch.nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, Dict[str, torch.Tensor]]]:
    """Detached copies of a module's physical weights and scheme state for the reference to run
    on: floating tensors are fresh leaves that require grad, so its gradients can be compared."""
    weights = {n: p.detach().clone().requires_grad_(True) for n, p in physical_weights(module).items()}
    maps = {t: {k: (v.detach().clone().requires_grad_(True) if v.is_floating_point() else v) for k, v in d.items()}
            for t, d in scheme_maps(module).items()}
    return weights, maps


def scheme_maps(module: torch.nn.Module) -> Dict[str, Dict[str, torch.Tensor]]:
    """Table -> {name: tensor} of the id maps (and small parameters) of a CompressedEmbeddingBagCollection."""
    return {name: {**dict(holder.named_buffers()), **dict(holder.named_parameters())}
            for name, holder in module.scheme_states().items()}
