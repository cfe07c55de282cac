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
def fill_rows_(target: object, rows: torch.Tensor, values: Optional[torch.Tensor] = None) -> None:
    """Write ``values [len(rows), D]`` (None: zeros) into ``rows`` (global row indices) of
    ``target``: a plain tensor, or the local shards of a ShardedTensor (each shard the rows it
    holds, its own columns of ``values``)."""
    rows = rows.to(torch.int64)
    if not hasattr(target, "local_shards"):
        target[rows.to(target.device)] = 0 if values is None else values.to(target.device, target.dtype)
        return
    for shard in target.local_shards():
        r0, n = shard.metadata.shard_offsets[0], shard.tensor.shape[0]
        mine = (rows >= r0) & (rows < r0 + n)
        local, dev = (rows[mine] - r0).to(shard.tensor.device), shard.tensor.device
        if values is None:
            shard.tensor[local] = 0
        else:
            c0, m = shard.metadata.shard_offsets[1], shard.tensor.shape[1]
            shard.tensor[local] = values[mine.to(values.device), c0:c0 + m].to(dev, shard.tensor.dtype)


def zero_rows_(target: object, rows: torch.Tensor) -> None:
    """Zero ``rows`` (global row indices) of ``target``, plain or sharded (all its columns)."""
    fill_rows_(target, rows)


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


def inner_process_group(inner: Optional[torch.nn.Module]) -> Optional["torch.distributed.ProcessGroup"]:
    """The process group of a DMP-sharded inner EBC (None when it is not sharded)."""
    import torch.distributed as dist
    from torchrec.distributed.types import ShardedModule

    if isinstance(inner, ShardedModule):
        return getattr(getattr(inner, "_env", None), "process_group", None) or dist.group.WORLD
    return None


# sharding types whose output distribution is an all-to-all with each rank's own batch size
# (the input distribution tells every rank the others' strides): no agreement needed
OWN_STRIDE_SHARDINGS = frozenset({"table_wise", "column_wise", "table_column_wise", "data_parallel"})


def agree_stride(stride: int, inner: Optional[torch.nn.Module], device: torch.device) -> int:
    """A sharded inner EBC's row-wise output distribution (reduce-scatter) needs one KJT
    stride on every rank: the largest of the ranks' ``stride`` (one all-reduce and a host
    read); itself when unsharded or when no table of ``inner`` is row-wise sharded."""
    import torch.distributed as dist

    group = inner_process_group(inner)
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return stride
    if set(getattr(inner, "_sharding_types", ["row_wise"])) <= OWN_STRIDE_SHARDINGS:
        return stride
    t = torch.tensor([stride], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


@torch.no_grad()
def zero_rows_and_state_(inner: torch.nn.Module, physical: str, rows: torch.Tensor, num_rows: int,
                         values: Optional[torch.Tensor] = None) -> None:
    """Zero ``rows`` of ``inner``'s table ``physical`` (``num_rows`` rows), or set them to
    ``values [len(rows), dim]``, and zero their optimizer state: FBGEMM's fused state when
    sharded (sharded like the table), the in-backward optimizers' plain state when not."""
    key = f"embedding_bags.{physical}.weight"
    fill_rows_(inner.state_dict()[key], rows, values)
    fused = getattr(inner, "fused_optimizer", None)
    if fused is not None:  # sharded: FBGEMM's optimizer state (e.g. row-wise momentum1), sharded like the table
        param = fused.params.get(key)
        states = fused.state.get(param, {}).values() if param is not None else []
    else:  # unsharded: optimizers applied in backward keep plain state per parameter
        w = inner.embedding_bags[physical].weight
        states = [t for o in getattr(w, "_in_backward_optimizers", []) for t in o.state.get(w, {}).values()]
    for t in states:
        if isinstance(t, torch.Tensor) and len(t.size()) >= 1 and t.size(0) % num_rows == 0:
            # row-wise state of a column-wise (or grid) sharded table: one block of num_rows rows per column shard
            blocks = torch.arange(t.size(0) // num_rows, device=rows.device).unsqueeze(1) * num_rows
            zero_rows_(t, (rows.to(torch.int64).unsqueeze(0) + blocks).reshape(-1))
