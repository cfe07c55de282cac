"""2-rank worker for FrequencyStats.all_reduce."""
from __future__ import annotations

from typing import Dict, List

import torch
from torchrec import KeyedJaggedTensor

from ..stats import FrequencyStats

VOCAB = {"small": 1000, "big": 5_000_000}


def zipf_kjts(seed: int, batches: int = 5, batch: int = 512) -> List[KeyedJaggedTensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        vals = []
        for f, v in VOCAB.items():
            u = torch.rand(batch, generator=g)
            vals.append(torch.clamp((v ** u).long() - 1, 0, v - 1))  # log-uniform: a heavy head
        out.append(KeyedJaggedTensor(keys=list(VOCAB), values=torch.cat(vals), lengths=torch.ones(2 * batch, dtype=torch.int64)))
    return out


def stats_all_reduce_worker(rank: int, world: int) -> Dict[str, object]:
    stats = FrequencyStats(VOCAB, exact_limit=10_000, sketch_width=1 << 14, top_k=64)
    stats.update_from(zipf_kjts(seed=rank), progress=False)
    stats.all_reduce()
    return stats.state_dict()
