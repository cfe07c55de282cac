"""MPE, mixed-precision embeddings (Wang et al., arXiv 2409.20305).

Ids are grouped by frequency rank into G groups (group 0 = most frequent). Each group
learns a distribution over precisions {0 (dropped), 2, 4, 8, 16, 32 bits}; training runs
on the full fp32 table with *fake* quantization that is exactly what FBGEMM's inference
tables store (row-wise asymmetric int-N with fp16 scale and bias, or an fp16 cast), with
straight-through gradients and a learned per-group clipping threshold (a learned range,
LSQ/PACT-style; FBGEMM's own row-wise scale is min/max, so the learned quantity is the
clip). Phases:

1. search: e(x) = SUM_p softmax(a_g / T)_p Q_p(clip_g(E[x])), loss += penalty * max(0,
   E[bits/element] - target) with E over the ids' groups (memory is per id);
2. choose (``mpe_choose_``): argmax per group, then the least frequent groups are lowered
   until the budget holds;
3. retrain (QAT): e(x) = Q_{bits_g}(clip_g(E[x]));
4. export (``mpe_finalize`` + ``quant.export``): one FBGEMM table per chosen precision.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch

from ..config import SchemeConfig, _check_positive_int, register_scheme
from ..ops import universal_hash
from .base import PhysicalTable, TableScheme, uniform_init

CANDIDATES: Tuple[int, ...] = (0, 2, 4, 8, 16, 32)
ROW_ALIGNMENT = 16  # bytes; torchrec.quant's default row alignment of IntNBit tables
MAP_BYTES = 5  # deployed id -> (uint8 table, int32 row) map
SEARCH, RETRAIN = 0, 1


def row_bytes(bits: int, dim: int) -> int:
    """Bytes FBGEMM's IntNBit table stores per row: data, fp16 scale+bias for int types, alignment."""
    if bits == 0:
        return 0
    raw = dim * bits // 8 + (4 if bits <= 8 else 0)
    return -(-raw // ROW_ALIGNMENT) * ROW_ALIGNMENT


def fake_quant(w: torch.Tensor, bits: int) -> torch.Tensor:
    """What FBGEMM stores for rows ``w [N, d]`` at ``bits``, with straight-through gradients."""
    if bits == 32:
        return w
    if bits == 0:
        return torch.zeros_like(w)
    if bits == 16:
        q = w.half().float()
    else:  # row-wise asymmetric: code = round((w - min) / scale), scale = (max - min) / (2^b - 1)
        # step by step as FBGEMM's FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf: the fp16 min can
        # round above the max (e.g. a constant, fully clipped row), which gives a negative scale
        lo = w.min(dim=1, keepdim=True).values.half().float()
        rng = w.max(dim=1, keepdim=True).values - lo
        one = torch.ones_like(rng)
        scale = torch.where(rng == 0, one, rng / (2**bits - 1)).half().float()
        scale = torch.where(scale == 0, one, scale)
        inv = 1.0 / scale
        scale, inv = torch.where(inv.isinf(), one, scale), torch.where(inv.isinf(), one, inv)
        q = ((w - lo) * inv).round().clamp(0, 2**bits - 1) * scale + lo
    return w + (q - w).detach()


@dataclasses.dataclass(frozen=True)
class MPE(SchemeConfig):
    """``MPE(ratio=16)`` or ``MPE(target_bits=2.0)`` (bits per element incl. row overheads);
    ``groups`` G (<= 256), ``penalty`` weight of the expected-bits term, ``temperature`` of
    the precision softmax."""

    target_bits: Optional[float] = None
    groups: int = 128
    penalty: float = 1.0
    temperature: float = 1.0
    candidates: Tuple[int, ...] = CANDIDATES
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int("MPE", "groups", self.groups)
        if self.groups > 256:
            raise ValueError(f"MPE: groups={self.groups}; at most 256 (the id -> group map is uint8)")
        self._ratio_or("target_bits")
        if self.target_bits is not None and not 0 < self.target_bits <= 32:
            raise ValueError(f"MPE: target_bits must be in (0, 32], got {self.target_bits!r}")
        bad = [c for c in self.candidates if c not in CANDIDATES]
        if bad or not self.candidates:
            raise ValueError(f"MPE: candidates {self.candidates!r} must be a non-empty subset of {CANDIDATES}")
        if self.penalty < 0 or self.temperature <= 0:
            raise ValueError(f"MPE: penalty must be >= 0 and temperature > 0, got {self.penalty!r}, {self.temperature!r}")


@register_scheme(MPE)
class MPEScheme(TableScheme):
    per_value = True

    def __init__(self, table, config: MPE) -> None:
        super().__init__(table, config)
        self.G = min(config.groups, table.num_embeddings)
        self.candidates = tuple(sorted(config.candidates))
        self.target = config.target_bits if config.target_bits is not None else 32.0 / config.ratio
        # the deployed id -> (table, row) map costs MAP_BYTES per id; the rows get the rest
        self.row_target = self.target - 8 * MAP_BYTES / table.embedding_dim
        cheapest = min(self.eff_bits(b) for b in self.candidates)
        if self.row_target < cheapest:
            raise self._too_small(
                f"the id map takes {8 * MAP_BYTES / table.embedding_dim:.2f} bits per element and the cheapest "
                f"candidate {cheapest:.2f}; the budget is {self.target:.2f}"
            )

    def eff_bits(self, bits: int) -> float:
        """Stored bits per element at ``bits``, FBGEMM's scale/bias and alignment included."""
        return 8 * row_bytes(bits, self.table.embedding_dim) / self.table.embedding_dim

    # --- state ---------------------------------------------------------------------------
    def initial_buffers(self) -> Dict[str, torch.Tensor]:
        ids = torch.arange(self.table.num_embeddings)
        return {
            "group_of": universal_hash(ids, self.G, self.config.seed).to(torch.uint8),  # until fitted
            "bits": torch.full((self.G,), max(self.candidates), dtype=torch.int8),
            "stage": torch.tensor(SEARCH, dtype=torch.int8),
        }

    def initial_parameters(self) -> Dict[str, torch.Tensor]:
        bound = 4 * max(abs(self.table.get_weight_init_min()), abs(self.table.get_weight_init_max()))
        return {
            "logits": torch.zeros(self.G, len(self.candidates)),
            "clip": torch.full((self.G,), bound),
        }

    def physical_tables(self) -> List[PhysicalTable]:
        return [PhysicalTable("__full", self.table.num_embeddings, self.table.embedding_dim, uniform_init(self.table))]

    # --- the three steps -----------------------------------------------------------------
    def transform(self, values: torch.Tensor) -> List[torch.Tensor]:
        return [values]

    def combine(self, parts: List[torch.Tensor], values: torch.Tensor) -> torch.Tensor:
        """``[N, d]`` fp32 rows -> ``[N, d]`` fake-quantized rows (mixture while searching)."""
        w = parts[0]
        g = self.buffers.group_of[values].long()
        c = self.buffers.clip.abs()[g].unsqueeze(1)
        w = torch.maximum(torch.minimum(w, c), -c)
        if int(self.buffers.stage) == SEARCH:
            probs = torch.softmax(self.buffers.logits[g] / self.config.temperature, dim=1)  # [N, P]
            return sum(probs[:, k:k + 1] * fake_quant(w, b) for k, b in enumerate(self.candidates))
        bits = self.buffers.bits[g].long()
        # logits are fixed now (and clip unused when every id here is dropped), but DDP's
        # static graph wants every parameter in every step
        out = torch.zeros_like(w) + 0.0 * (self.buffers.logits.sum() + self.buffers.clip.sum())
        for b in self.candidates:
            m = bits == b
            if bool(m.any()):
                out = torch.where(m.unsqueeze(1), fake_quant(w, b), out)
        return out

    # --- memory ----------------------------------------------------------------------------
    def group_sizes(self) -> torch.Tensor:
        return torch.bincount(self.buffers.group_of.long().cpu(), minlength=self.G)

    def expected_bits(self) -> torch.Tensor:
        """Differentiable E[stored bits per element] under the current precision distribution."""
        probs = torch.softmax(self.buffers.logits / self.config.temperature, dim=1)
        eff = torch.tensor([self.eff_bits(b) for b in self.candidates], device=probs.device)
        n = self.group_sizes().to(probs.device, probs.dtype)
        return (probs @ eff * n).sum() / n.sum()

    def penalty(self) -> torch.Tensor:
        return self.config.penalty * torch.relu(self.expected_bits() - self.row_target)

    def memory_parts(self) -> Dict[str, int]:
        """Bytes the deployed (exported) table takes at the chosen precisions, plus the maps.
        While searching the table is trained at fp32: see ``stage``."""
        n = self.group_sizes()
        bits = self.buffers.bits.long().cpu()
        d = self.table.embedding_dim
        parts = {f"{self.table.name} {b}-bit rows": int(n[bits == b].sum()) * row_bytes(b, d) for b in self.candidates if b}
        parts[f"{self.table.name} (maps)"] = self.table.num_embeddings * MAP_BYTES
        return parts
