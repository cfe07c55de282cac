"""Where an id came from, carried through TorchRec's input distribution as a KJT weight.

The groundwork for per-id weights computed *after* a lookup (MEmCom's w[x], Mem-Rec's
alpha(x): issue 18, deliverable 2). A sharded EBC's input distribution (KJT all-to-all,
row-wise bucketization) moves per-sample weights without autograd, so a weight that must
be trained cannot ride along. What can ride along is its address: the weight slot of id i
of rank r carries ``r * 2**32 + i`` as a float64 (exact: every such integer is below
2**53). The rank that does the lookup decodes (source rank, position) of every id it
received, in whatever order its sharding type delivered them, and :func:`pull` fetches the
trained weight from its source, differentiably (the gradient goes back the same way).
Verified for every sharding type TorchRec offers on CPU (tests/test_positions.py).
"""
from __future__ import annotations

import copy
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torchrec.distributed.embedding_types import KJTList
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from .collectives import world

SHIFT = 2 ** 32  # positions per rank: a rank's KJT holds fewer ids than this


def encode_positions(n: int, rank: int, device: torch.device) -> torch.Tensor:
    """``[n]`` float64 ``rank * 2**32 + arange(n)``: the KJT weights that name each id's origin."""
    if not 0 <= n < SHIFT:
        raise ValueError(f"encode_positions: {n} ids on rank {rank}; at most {SHIFT - 1} fit the position code")
    if rank < 0 or rank >= 2 ** 20:
        raise ValueError(f"encode_positions: rank {rank} outside [0, 2**20): the code would not be exact in float64")
    return torch.arange(n, dtype=torch.float64, device=device).add_(float(rank) * SHIFT)


def decode_positions(weights: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[m]`` float64 weights of a distributed KJT -> (``[m]`` source rank, ``[m]`` position
    on that rank), both int64."""
    if weights.dtype != torch.float64:
        raise ValueError(f"decode_positions: the position code is float64, got {weights.dtype}")
    code = weights.to(torch.int64)
    return torch.div(code, SHIFT, rounding_mode="floor"), torch.remainder(code, SHIFT)


class _Pull(torch.autograd.Function):
    """Forward: each rank's ``[m]`` requests (source rank, position) answered from the
    source rank's ``[n]`` tensor; backward: the answers' gradients summed into the sources'."""

    @staticmethod
    def forward(ctx, source: torch.Tensor, src: torch.Tensor, pos: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        order = torch.argsort(src, stable=True)
        asked = torch.bincount(src, minlength=world(group))  # [W] requests to each rank
        told = torch.empty_like(asked)
        dist.all_to_all_single(told, asked, group=group)  # [W] requests from each rank
        both = torch.cat([asked, told]).tolist()  # the one host read all_to_all_single's splits need
        out_splits, in_splits = both[:asked.numel()], both[asked.numel():]
        wanted = pos.new_empty(sum(in_splits))
        dist.all_to_all_single(wanted, pos.index_select(0, order), in_splits, out_splits, group=group)
        answers = source.detach().index_select(0, wanted)
        got = source.new_empty((pos.numel(),) + tuple(source.shape[1:]))
        dist.all_to_all_single(got, answers, out_splits, in_splits, group=group)
        out = torch.empty_like(got)
        out[order] = got
        ctx.save_for_backward(order, wanted)
        ctx.meta = (group, out_splits, in_splits, source.shape)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        order, wanted = ctx.saved_tensors
        group, out_splits, in_splits, shape = ctx.meta
        back = grad.new_empty((wanted.numel(),) + tuple(shape[1:]))
        dist.all_to_all_single(back, grad.index_select(0, order), in_splits, out_splits, group=group)
        return grad.new_zeros(shape).index_add_(0, wanted, back), None, None, None


def pull(source: torch.Tensor, src: torch.Tensor, pos: torch.Tensor,
         group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """``source [n, ...]`` of every rank, requests ``src [m]``, ``pos [m]`` (int64, e.g. from
    :func:`decode_positions`) -> ``[m, ...]`` = rank src[i]'s ``source[pos[i]]``, differentiable:
    the gradient reaches the source rank's tensor. On one rank an ``index_select``; on W ranks
    three all-to-alls forward (counts, positions, values), one backward, and one host read
    (the all-to-all splits)."""
    if group is None and dist.is_initialized():
        group = dist.group.WORLD
    if world(group) == 1:
        return source.index_select(0, pos)
    return _Pull.apply(source, src, pos, group)


def with_weights(kjt: KeyedJaggedTensor, weights: torch.Tensor) -> KeyedJaggedTensor:
    """``kjt`` with other per-sample ``weights`` (the same ids, lengths and cached sizes)."""
    out = copy.copy(kjt)
    out._weights, out._jt_dict = weights, None
    return out


def pulled_weights(kjts: List[KeyedJaggedTensor], source: torch.Tensor,
                   group: Optional[dist.ProcessGroup]) -> List[KeyedJaggedTensor]:
    """Distributed KJTs whose weights are position codes -> the same KJTs weighted by
    ``source [n]`` (this rank's weights, in the order it encoded them) of the ranks the ids came
    from: one :func:`pull` for all of them."""
    sizes = [k.weights().numel() for k in kjts]
    codes = kjts[0].weights() if len(kjts) == 1 else torch.cat([k.weights() for k in kjts])
    got = pull(source, *decode_positions(codes), group)
    return [with_weights(k, w) for k, w in zip(kjts, got.split(sizes) if len(kjts) > 1 else [got])]


def weighted_lookup(inner: torch.nn.Module, kjt: KeyedJaggedTensor, source: torch.Tensor,
                    group: Optional[dist.ProcessGroup]) -> KeyedTensor:
    """A sharded weighted EBC's lookup of ``kjt`` (weights: position codes) with per-sample
    weights ``source`` that keep their gradient: its input distribution moves the codes, the
    weights are then pulled to the ranks that look the ids up (what DMP's in-place sharding
    of the inner EBCs runs; the pipelineable sharded module does the same in its
    ``compute_and_output_dist``)."""
    ctx = inner.create_context()
    distributed = inner.input_dist(ctx, kjt).wait().wait()
    return inner.compute_and_output_dist(ctx, KJTList(pulled_weights(list(distributed), source, group))).wait()
