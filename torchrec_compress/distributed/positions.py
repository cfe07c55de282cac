"""Where an id came from, carried through TorchRec's input distribution as a KJT weight.

The groundwork for per-id weights computed *after* a lookup (MEmCom's w[x], Mem-Rec's
alpha(x): issue 18, deliverable 2). A sharded EBC's input distribution (KJT all-to-all,
row-wise bucketization) moves per-sample weights without autograd, so a weight that must
be trained cannot ride along. What can ride along is its address: the weight slot of id i
of rank r carries ``r * 2**32 + i`` as a float64 (exact: every such integer is below
2**53). The rank that does the lookup decodes (source rank, position) of every id it
received, in whatever order its sharding type delivered them, and can fetch the trained
weight from its source (and send its gradient back) with one all-to-all each way.
Verified for every sharding type TorchRec offers on CPU (tests/test_positions.py).
"""
from __future__ import annotations

from typing import Tuple

import torch

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
