"""Clustering agreement for tests: the adjusted Rand index (Hubert & Arabie 1985)."""
from __future__ import annotations

import torch


def _pairs(x: torch.Tensor) -> torch.Tensor:
    return x * (x - 1) / 2


def adjusted_rand_index(a: torch.Tensor, b: torch.Tensor) -> float:
    """ARI of two labelings ``[n]`` (1 = identical up to renaming, ~0 = chance)."""
    a = torch.unique(a, return_inverse=True)[1]
    b = torch.unique(b, return_inverse=True)[1]
    table = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.float64)
    table.index_put_((a, b), torch.ones(a.numel(), dtype=torch.float64), accumulate=True)
    index = _pairs(table).sum()
    ra, rb = _pairs(table.sum(1)).sum(), _pairs(table.sum(0)).sum()
    expected = ra * rb / _pairs(torch.tensor(float(a.numel())))
    top = 0.5 * (ra + rb)
    return float((index - expected) / (top - expected)) if top != expected else 1.0
