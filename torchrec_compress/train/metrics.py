"""AUC, NE and log loss with torchrec.metrics' own formulas, on gathered predictions."""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torchrec.metrics.auc import compute_auc
from torchrec.metrics.ne import compute_ne, get_ne_states

EPS = 1e-12


def auc(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC of ``logits [N]`` against ``labels [N]`` in {0, 1} (torchrec.metrics.auc)."""
    p = torch.sigmoid(logits.double()).unsqueeze(0)
    y = labels.double().unsqueeze(0)
    return compute_auc(1, [p], [y], [torch.ones_like(y)]).item()


def ne_states(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[4]`` float64 sums (cross entropy, samples, positives, negatives): add them up over
    steps and ranks, then :func:`ne_from_states`."""
    s = get_ne_states(labels.double(), torch.sigmoid(logits.double()), torch.ones_like(labels, dtype=torch.float64), EPS)
    return torch.stack([s["cross_entropy_sum"], s["weighted_num_samples"], s["pos_labels"], s["neg_labels"]]).reshape(4)


def ne_from_states(states: torch.Tensor) -> float:
    """NE = cross entropy / entropy of the base rate (torchrec.metrics.ne.compute_ne)."""
    return compute_ne(states[0], states[1], states[2], states[3], EPS).item()


def normalized_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return ne_from_states(ne_states(logits, labels))


def binary_metrics(logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """``{"auc", "ne", "logloss", "samples"}`` of ``logits [N]``, ``labels [N]``."""
    return {"auc": auc(logits, labels), "ne": normalized_entropy(logits, labels),
            "logloss": F.binary_cross_entropy_with_logits(logits, labels.float()).item(), "samples": int(labels.numel())}
