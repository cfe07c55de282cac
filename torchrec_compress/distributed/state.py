"""Write full (unsharded) tensors into a module's state, sharded or not."""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch


@torch.no_grad()
def copy_full_into_(target: object, full: torch.Tensor) -> None:
    """Copy ``full`` into ``target``: a plain tensor, or a ShardedTensor whose local shards
    are views of the sharded module's storage (TorchRec's ShardedEBC state dict)."""
    if hasattr(target, "local_shards"):
        for shard in target.local_shards():
            o, s = shard.metadata.shard_offsets, shard.tensor.shape
            shard.tensor.copy_(full[o[0]:o[0] + s[0], o[1]:o[1] + s[1]])
    else:
        target.copy_(full)


@torch.no_grad()
def zero_rows_(target: object, rows: torch.Tensor) -> None:
    """Zero ``rows`` (global row indices) of ``target``: a plain tensor, or the local shards
    of a ShardedTensor (each shard zeroes the rows it holds, all its columns)."""
    rows = rows.to(torch.int64)
    if hasattr(target, "local_shards"):
        for shard in target.local_shards():
            start, n = shard.metadata.shard_offsets[0], shard.tensor.shape[0]
            local = rows[(rows >= start) & (rows < start + n)] - start
            shard.tensor[local.to(shard.tensor.device)] = 0
    else:
        target[rows.to(target.device)] = 0


def load_full_state_dict_(sharded: Mapping[str, object], full: Mapping[str, torch.Tensor]) -> None:
    """``copy_full_into_`` for every entry of ``sharded`` (e.g. ``dmp.state_dict()``) from ``full``."""
    for name, t in sharded.items():
        copy_full_into_(t, full[name])


def single_rank_full_state_dict(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Plain-tensor copy of a DMP model's state on one rank (world size 1: each sharded
    table has a single local shard holding all of it), e.g. to build an unsharded copy."""
    out: Dict[str, torch.Tensor] = {}
    for name, t in module.state_dict().items():
        if hasattr(t, "local_shards"):
            shards = t.local_shards()
            if len(shards) != 1 or tuple(shards[0].tensor.shape) != tuple(t.size()):
                raise ValueError(f"{name}: not held whole by this rank; gather it (or load a DCP checkpoint) instead")
            t = shards[0].tensor
        out[name] = t.detach().clone()
    return out


@torch.no_grad()
def full_tensor(target: object, group: Optional["torch.distributed.ProcessGroup"]) -> torch.Tensor:
    """The whole tensor behind ``target`` on every rank: a plain (replicated) tensor is
    copied; a ShardedTensor's local shards are placed and summed over ``group``."""
    from .collectives import all_reduce_sum_

    if not hasattr(target, "local_shards"):
        return target.detach().clone()
    shards = target.local_shards()
    device = shards[0].tensor.device if shards else torch.device("cpu")
    dtype = shards[0].tensor.dtype if shards else target.dtype
    out = torch.zeros(tuple(target.size()), dtype=dtype, device=device)
    for shard in shards:
        o, s = shard.metadata.shard_offsets, shard.tensor.shape
        out[o[0]:o[0] + s[0], o[1]:o[1] + s[1]] = shard.tensor
    return all_reduce_sum_(out, group)
