"""MPE, mixed-precision embeddings (Wang et al., arXiv 2409.20305), as in the authors' code
(github.com/Leopold1423/mpe, ``OptFP_Embedding`` and ``Trainer_OptFP``).

Ids are grouped by frequency rank into G equal groups (group 0 = the most frequent). Each
group g learns a distribution over bit widths b in {0 (row dropped), 1, ..., 6}; the table
is quantized with LSQ+ (Bhalgat et al. 2020): one learned step alpha_b per width (shared by
the table) and one learned offset beta [d] per dim,

    Q_b(w) = clamp(round((w - beta) / alpha_b), -2^(b-1), 2^(b-1) - 1) * alpha_b + beta

(straight-through for w; LSQ's gradients, scaled by 1 / sqrt(2^(b-1) v d), for alpha_b and
beta). The phases run by themselves while training, from step counts in the config:

0. count (``fit_steps``): fp32 training while the ids are counted (summed over ranks); then
   ids are grouped by frequency rank. (The paper counts offline, before training; counting
   while training is ours, so that no pass over the data is needed before the first step.)
1. search (``search_steps``): e(x) = SUM_b softmax(gamma_g / tau)_b Q_b(E[x]) (b = 0 adds
   nothing), and loss += penalty * SUM_g SUM_b p_gb * b / cnt_g, cnt_g = the group's counted
   accesses over the rarest group's (rare groups pay most). The term's gradient is added in
   backward, so no training loop needs to know. Ours: the term is switched off while the
   expected bits are within the budget (``ratio``/``target_bits``; the paper has no budget,
   its weight alone sets the bits), so the search aims at the budget instead of below it.
2. choose: per group the largest width whose probability is >= 1 / (2K) (the paper's
   ``get_bit``). Ours: while over the budget, the least accessed group above its floor
   drops one width (the most frequent group is never dropped); with ``fill`` (default) bytes
   left under the budget go to the most accessed groups (measured: MovieLens 4x 0.9042 ->
   0.9084).
3. retrain: e(x) = Q_{b_g}(E[x]) for the rest of training, from the search-start embedding
   init (the paper reloads ``search-init.pt``, its random init, keeping steps, offsets and
   the dense layers of the search): the table's rows are redrawn from its own init
   distribution (seeded; no [v, d] copy is kept) and their optimizer state zeroed.
4. export (``quant.export``): one FBGEMM IntNBit table per export width, each width rounded
   up to what FBGEMM stores (1-2 -> int2, 3-4 -> int4, 5-8 -> int8): its row-wise scale and
   bias re-quantize the LSQ+ rows (``export_bits``; the cost is measured in BENCHMARKS.md).

Memory (``memory_parts``): the paper's count, b bits per element packed (alpha, beta and the
group logits are a few floats per table), plus the deployed id -> (width table, row) map,
``MAP_BYTES`` per id, which the paper does not count; ``paper_bytes`` gives the count without
it. With ``ids_by_frequency=True`` (ids already numbered by descending frequency, as
vocabularies built by count are) the groups are id ranges and the deployed model locates a
row from G entries (table, offset): no per-id map, the paper's memory up to 9 B per group.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Hashable, List, Optional, Tuple

import torch

from ..config import SchemeConfig, _check_positive_int, _check_steps, register_scheme
from ..ops import universal_hash
from .base import Constants, PhysicalTable, TableAccess, TableScheme, uniform_draw, uniform_init
from .lifecycle import Scheduled
from .mixed_precision import MixedPrecision

CANDIDATES: Tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 8, 16, 32)  # widths MPE can learn
DEFAULT_CANDIDATES: Tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6)  # the paper's "0123456"
FBGEMM_BITS: Tuple[int, ...] = (2, 4, 8, 16, 32)  # widths FBGEMM's inference tables store
ROW_ALIGNMENT = 16  # bytes; torchrec.quant's default row alignment of IntNBit tables
MAP_BYTES = 5  # deployed id -> (uint8 width table, int32 row) map
COUNT, SEARCH, RETRAIN = 0, 1, 2


def packed_row_bytes(bits: int, dim: int) -> int:
    """Bytes of one row of ``dim`` ``bits``-bit codes, packed (the paper's count)."""
    return math.ceil(dim * bits / 8)


def export_bits(bits: int, dim: int) -> int:
    """The FBGEMM width a ``bits``-bit row is exported at: the smallest stored width >= bits
    whose ``dim`` codes pack into a whole, even number of bytes (FBGEMM's row-wise layout)."""
    return next(w for w in FBGEMM_BITS if w >= bits and (w >= 16 or (dim * w % 8 == 0 and dim * w // 8 % 2 == 0)))


def fbgemm_row_bytes(bits: int, dim: int) -> int:
    """Bytes FBGEMM's IntNBit table stores per row at width ``bits`` (scale+bias, alignment)."""
    if bits == 0:
        return 0
    raw = dim * bits // 8 + (4 if bits <= 8 else 0)
    return -(-raw // ROW_ALIGNMENT) * ROW_ALIGNMENT


def levels(bits: int) -> int:
    """2^(b-1): LSQ+'s signed code range is [-levels, levels - 1]."""
    return 2 ** (bits - 1)


def grad_scaled(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` forward; its gradient times ``scale`` backward (LSQ's step-size gradient scale)."""
    return x * scale + (x - x * scale).detach()


def lsq_plus(w: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, bits: int, grad_scale: float) -> torch.Tensor:
    """Q_b(w) for rows ``w [N, d]``, step ``alpha`` (0-dim, > 0), offset ``beta [d]``.

    Straight-through for ``w`` inside the range; d/d alpha = round(v) - v inside, the
    clamped code outside; d/d beta = 1 outside, 0 inside (the authors' ``lsq_plus``
    backward), both times ``grad_scale``. 16 bits: the fp16 cast; 32: ``w``; 0: zeros."""
    if bits == 32:
        return w
    if bits == 16:
        return w + (w.half().float() - w).detach()
    if bits == 0:
        return torch.zeros_like(w)
    a, b = grad_scaled(alpha, grad_scale), grad_scaled(beta, grad_scale)
    v = ((w - b) / a).clamp(-levels(bits), levels(bits) - 1)  # clamped before rounding, as the authors' mask
    return (v + (v.round() - v).detach()) * a + b


def lsq_plus_widths(w: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, bits: torch.Tensor, grad_scale: torch.Tensor,
                    widths: Tuple[int, ...]) -> torch.Tensor:
    """:func:`lsq_plus` of every row at K widths at once: rows ``w [N, d]``, steps ``alpha [*, K]``
    (> 0), offsets ``beta [*, d]``, widths ``bits [*, K]`` (int64), LSQ gradient scales
    ``grad_scale [*, K]`` (``*``: N or 1) -> ``[N, K, d]``, Q_{bits[i, k]}(w[i]) with step
    ``alpha[i, k]`` (0 bits: zeros; 16: the fp16 cast; 32: ``w``). ``widths``: the widths
    ``bits`` may hold (host-side: the special cases cost ops only when present). A fixed
    number of ops for any K and any mix of tables (each row its own table's steps)."""
    lv = torch.pow(2.0, bits.clamp(1, 8).to(w.dtype) - 1).unsqueeze(-1)  # [*, K, 1] 2^(b-1)
    s = grad_scale.to(w.dtype).unsqueeze(-1)  # [*, K, 1]
    a = grad_scaled(alpha.unsqueeze(-1), s)  # [*, K, 1]
    b = beta.unsqueeze(-2)
    b = b * s + (b - b * s).detach()  # [*, K, d]: each width's gradient scale for the offsets
    x = w.unsqueeze(1)  # [N, 1, d]
    v = torch.clamp((x - b) / a, -lv, lv - 1)  # clamped before rounding, as the authors' mask
    q = (v + (v.round() - v).detach()) * a + b  # [N, K, d]
    special = bits.unsqueeze(-1)
    if 16 in widths:
        q = torch.where(special == 16, x + (x.half().float() - x).detach(), q)
    if 32 in widths:
        q = torch.where(special == 32, x.expand_as(q), q)
    if 0 in widths:
        q = torch.where(special == 0, torch.zeros((), dtype=q.dtype, device=q.device), q)
    return q


@dataclasses.dataclass(frozen=True)
class MPE(SchemeConfig):
    """``MPE(ratio=16)`` or ``MPE(target_bits=2.0)`` (stored bits per element, the id map
    included); ``groups`` G (<= 256; the paper's g = 128), ``penalty`` the weight of the bit
    regularizer (the paper's gamma), ``temperature`` tau of the width softmax (the paper's
    3e-3), ``candidates`` the widths (the paper's 0..6)."""

    target_bits: Optional[float] = None
    groups: int = 128
    penalty: float = 3e-4
    temperature: float = 3e-3
    candidates: Tuple[int, ...] = DEFAULT_CANDIDATES
    seed: int = 0
    fit_steps: int = 50  # fp32 training steps whose ids are counted, then grouped (0: groups from fit_)
    search_steps: int = 50  # steps of the width search; retraining after them
    # "init": retrain from the rows' init (the paper; give retraining the steps of a whole
    # training); "search" (ours, for short schedules): retrain from the searched rows
    retrain_from: str = "init"
    # True: ids are numbered by descending frequency (0 the most frequent; e.g. vocabularies
    # built by count, data.tabular.build_vocabulary): the groups are id ranges and the deployed
    # model needs no per-id map (G entries instead), as the paper counts; counting then only
    # weighs the penalty
    ids_by_frequency: bool = False
    # ours: after the paper's selection, widths left under the budget go to the most accessed groups
    fill: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int("MPE", "groups", self.groups)
        if self.groups > 256:
            raise ValueError(f"MPE: groups={self.groups}; at most 256 (the id -> group map is uint8)")
        self._ratio_or("target_bits")
        if self.target_bits is not None and not 0 < self.target_bits <= 32:
            raise ValueError(f"MPE: target_bits must be in (0, 32], got {self.target_bits!r}")
        bad = [c for c in self.candidates if c not in CANDIDATES]
        if bad or not self.candidates or len(set(self.candidates)) != len(self.candidates):
            raise ValueError(f"MPE: candidates {self.candidates!r} must be distinct widths from {CANDIDATES}")
        if self.penalty < 0 or self.temperature <= 0:
            raise ValueError(f"MPE: penalty must be >= 0 and temperature > 0, got {self.penalty!r}, {self.temperature!r}")
        _check_steps("MPE", "fit_steps", self.fit_steps)
        _check_steps("MPE", "search_steps", self.search_steps)
        if self.retrain_from not in ("init", "search"):
            raise ValueError(f"MPE: retrain_from must be 'init' or 'search', got {self.retrain_from!r}")


@register_scheme(MPE)
class MPEScheme(Scheduled):
    # mpe: the authors' procedure; mpe_warm (ours): retraining keeps the searched rows (better on
    # short runs, BENCHMARKS.md); mpe_ranked_warm: also no per-id map, only for ids numbered by
    # frequency (the CSV readers' vocabularies: Avazu, MovieLens)
    presets = {"mpe": lambda r, d: MPE(ratio=r), "mpe_warm": lambda r, d: MPE(ratio=r, retrain_from="search"),
               "mpe_ranked_warm": lambda r, d: MPE(ratio=r, ids_by_frequency=True, retrain_from="search")}
    ranked_presets = ("mpe_ranked_warm",)
    per_value = True
    training_buffers = ("counts", "steps", "stage", "group_weight")
    FITTED = RETRAIN
    STAGES = ("counting", "searching", "retraining")
    parameter_lr_scale = 10.0  # the logits' and steps' gradient is a small share of the loss's
    _penalize = False  # set by each training step: the search penalty's gradient is still to be added

    def __init__(self, table, config: MPE) -> None:
        super().__init__(table, config)
        self.G = min(config.groups, table.num_embeddings)
        self.candidates = tuple(sorted(config.candidates))
        d = table.embedding_dim
        self.target = config.target_bits if config.target_bits is not None else 32.0 / config.ratio
        # the deployed id -> (table, row) map costs MAP_BYTES per id (G entries of 9 B when ids
        # are numbered by frequency), steps and offsets a few floats per table; the rows get the rest
        v = table.num_embeddings
        self.row_target = self.target - 8 * self._fixed_bytes() / (v * d)
        cheapest = min(self.eff_bits(b) for b in self.candidates)
        if self.row_target < cheapest:
            raise self._too_small(
                f"the id map, steps and offsets take {8 * self._fixed_bytes() / (v * d):.2f} bits per element and the cheapest "
                f"candidate {cheapest:.2f}; the budget is {self.target:.2f}"
            )
        # LSQ's gradient scale of each width's step: 1 / sqrt(2^(b-1) * elements of the table)
        self.grad_scales = [1.0 / math.sqrt(levels(b) * table.num_embeddings * d) if 0 < b <= 8 else 1.0 for b in self.candidates]

    def _fixed_bytes(self) -> int:
        """Deployed bytes besides the rows: the id map, steps alpha [K] and offsets beta [d] (fp32)."""
        per_id = 0 if self.config.ids_by_frequency else MAP_BYTES * self.table.num_embeddings
        ranges = 9 * self.G if self.config.ids_by_frequency else 0  # uint8 table + int64 row offset per group
        return per_id + ranges + 4 * (len(self.candidates) + self.table.embedding_dim)

    def eff_bits(self, bits: int) -> float:
        """Stored bits per element of a ``bits``-bit row (packed codes)."""
        return 8 * packed_row_bytes(bits, self.table.embedding_dim) / self.table.embedding_dim

    # --- state ---------------------------------------------------------------------------
    def initial_buffers(self) -> Dict[str, torch.Tensor]:
        ids = torch.arange(self.table.num_embeddings)
        return {
            **self.lifecycle_buffers(),
            # until fitted (numbered by frequency: the id ranges, from the start)
            "group_of": (ids * self.G // self.table.num_embeddings if self.config.ids_by_frequency
                         else universal_hash(ids, self.G, self.config.seed)).to(torch.uint8),
            "group_weight": torch.ones(self.G),  # 1 / cnt_g of the penalty, set when grouped
            "bits": torch.full((self.G,), max(self.candidates), dtype=torch.int8),
            "stage": torch.tensor(COUNT if self.config.fit_steps else SEARCH, dtype=torch.int8),
        }

    @property
    def count_steps(self) -> int:
        return self.config.fit_steps

    def events(self) -> List[int]:
        return sorted({self.config.fit_steps, self.config.fit_steps + self.config.search_steps} - {0})

    def _init_abs_mean(self) -> float:
        """E|w| of the table's uniform init [lo, hi]."""
        lo, hi = self.table.get_weight_init_min(), self.table.get_weight_init_max()
        if hi <= lo:
            return abs(lo)
        if lo >= 0 or hi <= 0:
            return abs(lo + hi) / 2
        return (lo * lo + hi * hi) / (2 * (hi - lo))

    def _steps_for(self, abs_mean: float) -> torch.Tensor:
        """LSQ's step init per width: 2 E|w| / sqrt(2^(b-1)) (unused for 0, 16, 32 bits: 1)."""
        return torch.tensor([2 * abs_mean / math.sqrt(levels(b)) if 0 < b <= 8 else 1.0 for b in self.candidates])

    def initial_parameters(self) -> Dict[str, torch.Tensor]:
        return {
            "logits": torch.zeros(self.G, len(self.candidates)),  # gamma [G, K]
            "alpha": self._steps_for(max(self._init_abs_mean(), 1e-8)),  # [K]
            "beta": torch.zeros(self.table.embedding_dim),  # [d]
        }

    def physical_tables(self) -> List[PhysicalTable]:
        return [PhysicalTable("__full", self.table.num_embeddings, self.table.embedding_dim, uniform_init(self.table))]

    # --- the three steps -----------------------------------------------------------------
    identity_transform = True

    def batch_key(self) -> Hashable:
        # tables that follow the same schedule share one batch (they are in the same stage;
        # combine_group still handles a mix, e.g. after fit_ of only some of them)
        c = self.config
        return ("mpe", self.table.embedding_dim, self.candidates, self.G, c.temperature, c.fit_steps, c.search_steps)

    def batch_parameters(self) -> Dict[str, torch.Tensor]:
        b = self.buffers
        return {n: b.trainable(n) for n in ("logits", "alpha", "beta")}

    def batch_maps(self, index: int) -> Dict[str, torch.Tensor]:
        """Laid end to end over a batch's tables: each id's global group (``group_of`` + the
        table's first group), and per group its width, penalty weight and size; per table its
        row budget, penalty weight and the K widths' LSQ gradient scales."""
        b = self.buffers
        dev = b.group_of.device
        return {"group_of": b.group_of.long() + index * self.G, "bits": b.bits.long(), "group_weight": b.group_weight,
                "group_size": self.group_sizes().to(b.group_weight.dtype),
                "row_target": torch.tensor([self.row_target], device=dev), "cost": torch.tensor([self.config.penalty], device=dev),
                "scale": torch.tensor(self.grad_scales, device=dev)}

    def map_buffers(self) -> List[torch.Tensor]:
        return [self.buffers.group_of, self.buffers.bits, self.buffers.group_weight]

    def transform(self, values: torch.Tensor, c: Optional[Constants] = None) -> List[torch.Tensor]:
        return [values]

    def _own(self, values: torch.Tensor) -> Dict[str, torch.Tensor]:
        """This table alone as a batch of one (``combine_group``'s ``c``)."""
        c: Dict[str, torch.Tensor] = dict(self.batch_maps(0))
        c.update({n: p.unsqueeze(0) for n, p in self.batch_parameters().items()})
        c["group_of_start"] = torch.zeros((), dtype=torch.int64, device=values.device)
        c["_table"] = torch.zeros(values.shape[0], dtype=torch.int64, device=values.device)
        return c

    def _widths(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(candidate widths ``[K]`` int64, their stored bits per element ``[K]``, each width's
        index in the candidates ``[33]``), cached per device."""
        cache = self.__dict__.setdefault("_width_tensors", {})
        if device not in cache:
            index = torch.zeros(33, dtype=torch.int64)
            index[list(self.candidates)] = torch.arange(len(self.candidates))
            cache[device] = (torch.tensor(self.candidates, device=device),
                             torch.tensor([self.eff_bits(b) for b in self.candidates], device=device), index.to(device))
        return cache[device]

    def _at_widths(self, w: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """Q_{bits[i]}(w[i]) for rows ``w [N, d]`` at widths ``bits [N]`` (0: zeros)."""
        c = self._own(bits)
        k = self._widths(w.device)[2][bits.long()]
        alpha = c["alpha"][0].abs() + 1e-10
        return lsq_plus_widths(w, alpha[k].unsqueeze(1), c["beta"], bits.long().unsqueeze(1), c["scale"][k].unsqueeze(1),
                               self.candidates).squeeze(1)

    def combine(self, parts: List[torch.Tensor], values: torch.Tensor, c: Optional[Constants] = None) -> torch.Tensor:
        """``[N, d]`` fp32 rows -> ``[N, d]`` quantized rows (the width mixture while searching)."""
        return self.combine_group([self], parts, values, self._own(values) if c is None else c)

    def combine_group(self, tables: List["TableScheme"], parts: List[torch.Tensor], values: torch.Tensor,
                      c: Constants) -> torch.Tensor:
        """The rows ``w = parts[0] [n, d]`` of ids ``values [n]`` of the batch's ``tables`` (id
        i of table ``c["_table"][i]``) -> ``[n, d]``: counting, w; searching, SUM_b
        softmax(gamma_g / tau)_b Q_b(w) over every width at once (:func:`lsq_plus_widths`,
        b = 0 adds nothing); retraining, Q_{b_g}(w). ``c``: the tables' maps laid end to end
        and their parameters stacked ``[T, ...]``. A fixed number of ops per stage present."""
        w = parts[0]
        T, K = len(tables), len(self.candidates)
        logits, alpha, beta = c["logits"], c["alpha"].abs() + 1e-10, c["beta"]  # [T, G, K], [T, K], [T, d]
        unused = 0.0 * (logits.sum() + alpha.sum() + beta.sum())  # DDP's static graph wants every parameter in every step
        stages = [t.stage for t in tables]
        tidx = c["_table"]
        gg = c["group_of"][values + c["group_of_start"]]  # [n] each id's group, over the batch's tables
        scale = c["scale"].view(T, K)
        cands, _, index = self._widths(w.device)
        out = None
        for stage in sorted(set(stages)):
            if stage == COUNT:  # plain fp32 training while the ids are counted
                rows = w
            elif stage == SEARCH:
                probs = torch.softmax(logits.view(T * self.G, K)[gg] / self.config.temperature, dim=1)  # [n, K]
                q = lsq_plus_widths(w, alpha[tidx], beta[tidx], cands.unsqueeze(0), scale[tidx], self.candidates)
                rows = torch.einsum("nk,nkd->nd", probs * (cands > 0).to(probs.dtype), q)
                if tables[0]._penalize and torch.is_grad_enabled() and rows.requires_grad:
                    for t in tables:
                        t._penalize = False  # once per training step, whatever the number of features
                    searching = torch.tensor([s == SEARCH for s in stages], device=w.device)
                    rows = _AddToLoss.apply(rows, self._penalty_of(T, c, searching))
            else:
                bits = c["bits"][gg]  # [n]
                k = index[bits].unsqueeze(1)  # [n, 1]
                rows = lsq_plus_widths(w, alpha[tidx].gather(1, k), beta[tidx], bits.unsqueeze(1), scale[tidx].gather(1, k),
                                       self.candidates).squeeze(1)
            if len(stages) == 1 or len(set(stages)) == 1:
                out = rows
            else:  # tables in different stages (fitted apart): each id its own table's
                mine = torch.tensor([s == stage for s in stages], device=w.device)[tidx].unsqueeze(1)
                out = rows if out is None else torch.where(mine, rows, out)
        return out + unused

    def _penalty_of(self, T: int, c: Constants, searching: torch.Tensor) -> torch.Tensor:
        """SUM over the searching tables of penalty * SUM_g SUM_b p_gb b / cnt_g, each while its
        expected bits exceed its budget (no host sync): one batch of ``T`` tables' maps ``c``."""
        cands, eff, _ = self._widths(c["logits"].device)
        probs = torch.softmax(c["logits"] / self.config.temperature, dim=2)  # [T, G, K]
        reg = (probs * cands.to(probs.dtype) * c["group_weight"].view(T, self.G, 1)).sum(dim=(1, 2))  # [T]
        n = c["group_size"].view(T, self.G)
        expected = ((probs @ eff) * n).sum(dim=1) / n.sum(dim=1)  # [T] E[stored bits per element]
        over = (expected > c["row_target"]) & searching
        return (c["cost"] * reg * over.to(reg.dtype)).sum()

    # --- memory ----------------------------------------------------------------------------
    def group_sizes(self) -> torch.Tensor:
        """``[G]`` ids per group, on the map's device (the search reads it every step)."""
        group = self.buffers.group_of
        if group.is_meta:  # not materialized yet: the groups are the hashed ones (equal sizes up to hashing)
            group = self.initial_buffers()["group_of"]
        return torch.bincount(group.long(), minlength=self.G)

    def training_bytes(self) -> int:
        return super().training_bytes() + self.table.num_embeddings * self.table.embedding_dim * 4

    def expected_bits(self, probs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Differentiable E[stored bits per element of the rows] under the width distribution
        ``probs [G, K]`` (default: the current one)."""
        if probs is None:
            probs = torch.softmax(self.buffers.logits / self.config.temperature, dim=1)
        eff = torch.tensor([self.eff_bits(b) for b in self.candidates], device=probs.device)
        n = self.group_sizes().to(probs.device, probs.dtype)
        return (probs @ eff * n).sum() / n.sum()

    def penalty(self) -> torch.Tensor:
        """penalty * SUM_g SUM_b p_gb b / cnt_g while the expected bits exceed the budget
        (0 within it, and once retraining): the search's memory term."""
        if self.stage != SEARCH:
            return torch.zeros((), device=self.buffers.logits.device)
        c = self._own(self.buffers.logits)
        return self._penalty_of(1, c, torch.ones(1, dtype=torch.bool, device=self.buffers.logits.device))

    # --- the procedure ---------------------------------------------------------------------
    def before_combine(self, training: bool) -> None:
        self._penalize = training  # the search penalty's gradient, once per training forward

    @torch.no_grad()
    def event(self, tables: TableAccess) -> Dict[str, torch.Tensor]:
        """After counting: group the ids; after the search: choose the widths and restart the
        rows from the init (retraining from here)."""
        stage = self.stage
        if stage == COUNT:
            self.group_(self.counted(), tables.read("__full"))
            if not self.config.search_steps:
                return self._retrain()
        elif stage == SEARCH and self._step >= self.config.fit_steps + self.config.search_steps:
            return self._retrain()
        return {}

    def _retrain(self) -> Dict[str, torch.Tensor]:
        self.choose_()
        if self.config.retrain_from == "search":
            return {}
        return {f"{self.table.name}__full": torch.arange(self.table.num_embeddings, device=self.buffers.group_of.device)}

    def reset_values(self, physical: str, rows: torch.Tensor, dim: int) -> Optional[torch.Tensor]:
        """The retrain's embeddings: the table's own init distribution (uniform), seeded, the
        same on every rank (the paper's search-start init)."""
        full = uniform_draw(self.table, self.table.num_embeddings, dim, self.config.seed * 1_000_003 + 17)
        return full[rows.cpu()].to(rows.device)

    def fit(self, counts: torch.Tensor, tables: TableAccess, embeddings: Optional[torch.Tensor] = None) -> None:
        """Groups from id ``counts [v]`` given up front; the search starts now."""
        self.group_(counts, tables.read("__full") if embeddings is None else embeddings)

    @torch.no_grad()
    def group_(self, counts: torch.Tensor, weights: Optional[torch.Tensor] = None) -> List[int]:
        """Group ids by frequency rank: G equal-size groups, group 0 the most frequent (ties
        and unseen ids: lower id first); the penalty's 1 / cnt_g from the groups' summed
        counts (relative to the rarest, + 1 so that unseen groups stay finite); the steps
        re-initialized from ``weights [v, d]`` (LSQ's 2 E|w| / sqrt(2^(b-1))). Returns the
        group sizes; the search starts."""
        v = self.table.num_embeddings
        counts = counts.cpu().to(torch.float64)
        order = torch.arange(v) if self.config.ids_by_frequency else torch.sort(counts, descending=True, stable=True).indices
        group = torch.empty(v, dtype=torch.uint8)
        group[order] = (torch.arange(v) * self.G // v).to(torch.uint8)
        b = self.buffers
        b.group_of.copy_(group.to(b.group_of.device))
        cnt = torch.zeros(self.G, dtype=torch.float64).index_add_(0, group.long(), counts) + 1
        b.group_weight.copy_((cnt.min() / cnt).to(b.group_weight.dtype).to(b.group_weight.device))
        if weights is not None:
            b.alpha.copy_(self._steps_for(max(float(weights.detach().abs().mean()), 1e-8)).to(b.alpha.device))
        self._set_host("stage", SEARCH)
        return self.group_sizes().cpu().tolist()

    @torch.no_grad()
    def choose_(self) -> Dict[int, int]:
        """Fix each group's width: the largest candidate whose probability is >= 1 / (2K) (the
        paper's rule); then, while over the bit budget, the least accessed group (largest
        1 / cnt_g; ties: the rarer) above its floor drops one candidate; the most frequent
        group is never dropped; with ``fill`` (ours), while under the budget, the most accessed
        groups take one width more each, in turn from the most accessed. Retraining follows.
        Returns {bits: ids}."""
        cands = self.candidates
        K = len(cands)
        probs = torch.softmax(self.buffers.logits.detach().cpu().double() / self.config.temperature, dim=1)
        pick = [max(k for k in range(K) if probs[g, k] >= 1.0 / (2 * K)) for g in range(self.G)]  # the max prob is >= 1/K
        n = self.group_sizes().cpu().double()
        eff = torch.tensor([self.eff_bits(c) for c in cands], dtype=torch.float64)

        def avg() -> float:
            return float((eff[torch.tensor(pick)] * n).sum() / n.sum())

        floor = [0] * self.G
        floor[0] = next((k for k, c in enumerate(cands) if c > 0), 0)  # never drop the most frequent group
        pick[0] = max(pick[0], floor[0])
        weight = self.buffers.group_weight.detach().cpu().tolist()
        order = sorted(range(self.G), key=lambda g: (-weight[g], -g))  # least accessed first
        while avg() > self.row_target + 1e-9:
            lowerable = [g for g in order if pick[g] > floor[g]]
            if not lowerable:
                raise ValueError(
                    f"MPE: table {self.table.name!r}: even with every other group dropped the rows take "
                    f"{avg():.2f} bits per element, over the {self.row_target:.2f} left after the id map; use a lower ratio"
                )
            pick[lowerable[0]] -= 1
        if self.config.fill:  # under the budget: the most accessed groups first take the bytes left, a width at a time
            for g in reversed(order):
                while pick[g] < K - 1:
                    pick[g] += 1
                    if avg() > self.row_target + 1e-9:
                        pick[g] -= 1
                        break
        bits = torch.tensor([cands[k] for k in pick], dtype=torch.int8)
        self.buffers.bits.copy_(bits.to(self.buffers.bits.device))
        self._set_host("stage", RETRAIN)
        return {b: int(n[bits == b].sum()) for b in cands if int(n[bits == b].sum())}

    def chosen_bits(self) -> torch.Tensor:
        """``[v]`` int64: each id's chosen width (after the choice)."""
        return self.buffers.bits.long().cpu()[self.buffers.group_of.long().cpu()]

    def quantized_rows(self, full: torch.Tensor) -> torch.Tensor:
        """``full [v, d]`` -> Q_{b(x)}(full[x]) for every id at its chosen width (dropped: zeros)."""
        with torch.no_grad():
            return self._at_widths(full, self.chosen_bits().to(full.device))

    @torch.no_grad()
    def inference(self, tables: TableAccess):
        """Deployed: a ``MixedPrecision`` table, the quantized rows of each export width
        (``export_bits``: the chosen width rounded up to one FBGEMM stores) in their own
        physical table, dropped ids removed."""
        if self.stage != RETRAIN:
            raise ValueError(f"MPE: table {self.table.name!r} has not chosen its precisions yet (stage "
                             f"{['count', 'search'][self.stage]}, step {self.steps_taken()} of "
                             f"{self.config.fit_steps + self.config.search_steps}); train longer or lower fit_steps/search_steps")
        d, v = self.table.embedding_dim, self.table.num_embeddings
        chosen = self.chosen_bits()
        stored = torch.tensor([export_bits(int(b), d) if b else 0 for b in range(33)])[chosen]  # [v]
        rows = self.quantized_rows(tables.read("__full").cpu())
        kept = sorted({int(b) for b in stored.unique()} - {0})
        table_of = torch.full((v,), 255, dtype=torch.uint8)
        row_of = torch.zeros(v, dtype=torch.int32)
        weights = {}
        for k, b in enumerate(kept):
            ids = (stored == b).nonzero().squeeze(1)
            table_of[ids] = k
            row_of[ids] = torch.arange(ids.numel(), dtype=torch.int32)
            weights[f"__b{b}"] = rows[ids]
        rows_per_bits = tuple((b, int((stored == b).sum())) for b in kept)
        if not self.config.ids_by_frequency:
            return MixedPrecision(rows_per_bits=rows_per_bits), weights, {"table_of": table_of, "row_of": row_of}
        # id ranges: each group's ids are contiguous in its table, so one offset per group locates them
        first = torch.searchsorted(self.buffers.group_of.long().cpu(), torch.arange(self.G))  # [G] each group's first id
        offsets = row_of[first].long() - first
        cfg = MixedPrecision(rows_per_bits=rows_per_bits, ranked_groups=self.G)
        return cfg, weights, {"table_of": table_of[first], "row_offset": offsets}

    def _row_parts(self) -> Dict[str, int]:
        d, v = self.table.embedding_dim, self.table.num_embeddings
        if self.buffers.stage.is_meta or int(self.buffers.stage) != RETRAIN:
            return {f"{self.table.name} rows (budget until the widths are chosen)": int(v * d * self.row_target / 8)}
        n, bits = self.group_sizes().cpu(), self.buffers.bits.long().cpu()
        return {f"{self.table.name} {b}-bit rows": int(n[bits == b].sum()) * packed_row_bytes(b, d) for b in self.candidates if b}

    def memory_parts(self) -> Dict[str, int]:
        """Bytes of the rows at the chosen widths (packed codes; before the choice the rows'
        share of the budget, which the choice keeps within) plus the id map and the steps and
        offsets (G entries instead of the per-id map with ``ids_by_frequency``). The fp32 table trained meanwhile is training memory (``training_bytes``);
        what FBGEMM stores after export is ``quant.quantized_memory_report``."""
        return {**self._row_parts(), f"{self.table.name} (maps)": self._fixed_bytes()}

    def paper_bytes(self) -> int:
        """The paper's count: the rows' packed codes only (no id map, no steps or offsets)."""
        return sum(self._row_parts().values())

    # --- the plain-torch reference of the paper's equation (the tests compare against it) ----
    @staticmethod
    def reference(table, config, w, x: int, state) -> torch.Tensor:
        """Count: the fp32 row; search: SUM_b softmax(gamma_g / tau)_b Q_b(row); retrain:
        Q_{b_g}(row), with Q_b LSQ+ written out per element:
        clamp(round((w - beta) / alpha_b), -2^(b-1), 2^(b-1) - 1) alpha_b + beta."""
        row = w[f"{table.name}__full"][x]
        if int(state["stage"]) == COUNT:
            return row
        g = int(state["group_of"][x])
        cands = sorted(config.candidates)
        n = table.num_embeddings * table.embedding_dim

        def q(b: int, k: int) -> torch.Tensor:
            if b == 0:
                return torch.zeros_like(row)
            if b == 32:
                return row
            if b == 16:
                return row + (row.half().float() - row).detach()
            s = 1.0 / math.sqrt(2 ** (b - 1) * n) if b <= 8 else 1.0
            alpha = state["alpha"][k].abs() + 1e-10
            alpha = alpha * s + (alpha - alpha * s).detach()  # LSQ's gradient scale
            beta = state["beta"] * s + (state["beta"] - state["beta"] * s).detach()
            out = []
            for j in range(row.numel()):
                v = torch.clamp((row[j] - beta[j]) / alpha, -(2 ** (b - 1)), 2 ** (b - 1) - 1)
                out.append((v + (torch.round(v) - v).detach()) * alpha + beta[j])
            return torch.stack(out)

        if int(state["stage"]) == SEARCH:
            p = torch.softmax(state["logits"][g] / config.temperature, dim=0)
            return sum((p[k] * q(b, k) for k, b in enumerate(cands)), torch.zeros_like(row))
        b = int(state["bits"][g])
        return q(b, cands.index(b))


def fbgemm_stored(row: torch.Tensor, bits: int) -> torch.Tensor:
    """What FBGEMM's inference table returns for ``row [d]`` stored at ``bits`` (its own ops)."""
    if bits == 32:
        return row
    if bits == 0:
        return torch.zeros_like(row)
    if bits == 16:
        return row.half().float()
    q = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(row.detach().unsqueeze(0).contiguous(), bits)
    deq = torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(q, bits)[0]
    return row + (deq - row).detach()  # straight-through


class _AddToLoss(torch.autograd.Function):
    """``x`` unchanged forward; backward also sends d(loss)/d(extra) = 1 into ``extra``, as if
    the scalar ``extra`` had been added to the loss (the training loop never sees it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        ctx.shape, ctx.dtype = extra.shape, extra.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones(ctx.shape, dtype=ctx.dtype, device=grad.device)
