"""The few collectives schemes' procedures need, so their decisions are the same on every rank.

Padded ``all_gather`` everywhere: gloo has no variable-size gather.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist


def world(group: Optional[dist.ProcessGroup]) -> int:
    """Ranks in ``group`` (1 without torch.distributed or without a group)."""
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def _padded_gather(parts: List[torch.Tensor], group: dist.ProcessGroup) -> List[torch.Tensor]:
    """Every rank's ``[n_r]`` tensors (same count and dtypes on all ranks), concatenated over ranks."""
    n = parts[0].numel()
    size = torch.tensor([n], dtype=torch.int64, device=parts[0].device)
    sizes = [torch.zeros_like(size) for _ in range(world(group))]
    dist.all_gather(sizes, size, group=group)
    top = int(max(int(s) for s in sizes))
    out = []
    for p in parts:
        padded = torch.zeros(top, dtype=p.dtype, device=p.device)
        padded[:n] = p
        got = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(got, padded, group=group)
        out.append(torch.cat([g[: int(s)] for g, s in zip(got, sizes)]))
    return out


def all_gather_ids(ids: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Sorted union of every rank's ``[n] int64`` ids."""
    if world(group) == 1:
        return torch.unique(ids)
    return torch.unique(_padded_gather([ids], group)[0])


def all_gather_id_counts(ids: torch.Tensor, group: Optional[dist.ProcessGroup]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[N]`` ids of this rank -> (sorted distinct ids, their counts) over every rank."""
    uniq, counts = torch.unique(ids.to(torch.int64), return_counts=True)
    if world(group) == 1:
        return uniq, counts
    allids, allcounts = _padded_gather([uniq, counts], group)
    uniq, inv = torch.unique(allids, return_inverse=True)
    return uniq, torch.zeros_like(uniq).index_add_(0, inv, allcounts)


def all_reduce_sum_(t: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    if world(group) > 1:
        dist.all_reduce(t, group=group)
    return t
