"""FIITED (Lai et al. 2024, arXiv 2401.04408): fine-grained in-training embedding
dimension pruning, with the freed memory reused.

Every row of dimension d is split into C chunks of d / C. Id x keeps its first c(x)
chunks; the rest read as zeros:

    e(x) = [P[s(x, 0)], ..., P[s(x, c(x) - 1)], 0, ..., 0]                       (1)

Storage that really shrinks: the kept chunks live in a **chunk pool** P of ``pool``
rows of d / C (an ordinary TorchRec table: it shards and trains with FBGEMM) and the
address s(x, k) is found in a compact **address structure**: the sorted keys
``x * C + k`` of the kept chunks beside their pool slots (a binary search, 12 bytes
per kept chunk, never a dense v x C index; the FIITED tables of one module share one
flat sorted array, see :mod:`.family`). The paper uses a hash table for the same
job ("virtually hashed, physically indexed"); a sorted array has the same size, is
deterministic on every rank and vectorizes with ``torch.searchsorted``.

Utility (paper: access frequency times gradient magnitude, exponentially decayed): each
backward adds, for every id in a bag and every chunk position k, the norm of the loss
gradient reaching that chunk, ``|w| * ||dL/de_k(bag)||`` (/ bag length for MEAN); summing
it over accesses is frequency x mean gradient magnitude. The gradient reaching a
*pruned* chunk is known too (it is the bag's), so pruned chunks keep earning utility
and can grow back. Kept chunks keep their utility exactly (one float per pool slot);
pruned ones in a count-mean-min sketch (2 x W floats, W = ``sketch`` x pool, at least 64, keyed by ``x * C + k``; each
cell less its expected share of the other keys' mass, so collisions do not let pruned
chunks outbid kept ones; a chunk granted on a bad estimate is pruned again at the next
event, once its own utility is tracked exactly); the ids seen since the last event
in a bitmap (one bit per id); an event ranks the ``pool / C`` of them of highest utility.

Allocation on first access (the paper's storage allocates a vector when its id first
shows up): every training forward, ids of the batch that keep no chunk are *admitted*:
their first ``admit`` chunks take free pool slots, lowest ids first, while free slots
last, so a new id learns from its first occurrence instead of reading zeros until the
next event.

Every ``interval`` training steps (an *event*; early on, after 1, 2, 4, ... steps): u(x, k) is made non-increasing in k
(cumulative min: a chunk is only worth keeping after the ones before it), optionally
times ``position_decay ** k`` (a prior of diminishing returns for later chunks; 1 = the
paper; ``min_chunks`` / ``max_chunks`` are two more priors: every candidate's first chunks
rank before anyone's later ones, and no id holds more than ``max_chunks``), the
``pool x (1 - reserve)`` chunks of highest utility are kept (ties: lower
id and position first; ``reserve`` is left free for admissions), chunks kept before
keep their slot and weights, pruned chunks free theirs, newly granted chunks take free
slots; granted and freed rows are zeroed with their optimizer state (so granting or
admitting never changes the model's output), and utilities decay by ``decay``. Under DMP the sketch updates are averaged (as TorchRec
averages embedding gradients) and the seen ids gathered over ranks every step, so every rank makes the same decisions.

Memory is reported both ways: the honest count (``memory_report().ratio``, the primary one)
is the whole pool plus the address structure, the utilities and the sketch, all paid from
the budget; the paper counts the kept chunks only (:meth:`FIITEDScheme.paper_bytes`,
``paper_ratio`` in the report, ``bench quality`` and ``train`` results).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import JaggedTensor

from ...config import SchemeConfig, _check_positive_int, register_scheme
from ..base import PhysicalTable, Routed, TableScheme, constant_init, uniform_draw, uniform_init
from .family import INT64_MAX, SKETCH_DEPTH, FIITEDFamily, seen_bytes

MIN_SKETCH_WIDTH = 64


@dataclasses.dataclass(frozen=True)
class FIITED(SchemeConfig):
    """``FIITED(ratio=4, chunks=4, interval=100, decay=0.5)`` or ``FIITED(pool=P, ...)``: the paper's rule by default
    (keep the chunks of highest decayed utility, allocate on first access); ``hysteresis``, ``reserve``,
    ``position_decay``, ``min_chunks`` and ``max_chunks`` are ours (priors against churn), opt-in.

    ``pool``: chunks the pool holds (the memory budget; with ``ratio`` it is derived so
    that pool + address structure + utility state = full size / ratio); ``chunks``: C,
    d / C must be a multiple of 4; ``interval``: training steps between prune/grow
    events; ``decay``: utility multiplier at each event (exponential decay);
    ``hysteresis`` (ours; 1 = the paper): a kept chunk ranks with its utility times this, so a
    pruned one must be clearly better to take its place (every swap restarts a chunk from zero);
    ``admit``: chunks a new id gets on first sight (0: none, ids wait for an event);
    ``reserve`` (ours; 0 = the paper): share of the pool an event leaves free for admissions;
    ``position_decay``: chunk k ranks with its utility times ``position_decay ** k``
    (1: the paper; < 1 spreads the pool over more ids); ``min_chunks``: every candidate
    id's first ``min_chunks`` chunks rank before any later chunk of any id (0: the paper);
    ``max_chunks``: most chunks one id may hold (None: C, the paper); ``sketch``: cells
    per pool chunk in each row of the utility sketch of pruned chunks (its memory is
    paid from the budget); ``fresh_chunks``: what a granted or admitted chunk starts from,
    ``"init"`` (a fresh draw of the table's init, as the paper allocates a new vector) or
    ``"zero"`` (so that an event never changes an output; zero rows sit at a saddle of DLRM's
    dot interaction: on MovieLens one seed of three never left it, AUC 0.51).
    """

    pool: Optional[int] = None
    chunks: int = 4
    interval: int = 100
    decay: float = 0.5
    hysteresis: float = 1.0
    admit: int = 1
    reserve: float = 0.0
    position_decay: float = 1.0
    min_chunks: int = 0
    max_chunks: Optional[int] = None
    sketch: float = 0.5
    seed: int = 0
    fresh_chunks: str = "init"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int("FIITED", "pool", self.pool)
        _check_positive_int("FIITED", "chunks", self.chunks)
        _check_positive_int("FIITED", "interval", self.interval)
        if not isinstance(self.decay, (int, float)) or not 0.0 < self.decay <= 1.0:
            raise ValueError(f"FIITED: decay must be in (0, 1], got {self.decay!r}")
        if not isinstance(self.hysteresis, (int, float)) or not self.hysteresis >= 1.0:
            raise ValueError(f"FIITED: hysteresis must be >= 1, got {self.hysteresis!r}")
        if not isinstance(self.admit, int) or isinstance(self.admit, bool) or not 0 <= self.admit <= self.chunks:
            raise ValueError(f"FIITED: admit must be an int in [0, chunks={self.chunks}], got {self.admit!r}")
        if not isinstance(self.position_decay, (int, float)) or not 0.0 < self.position_decay <= 1.0:
            raise ValueError(f"FIITED: position_decay must be in (0, 1], got {self.position_decay!r}")
        if not isinstance(self.min_chunks, int) or isinstance(self.min_chunks, bool) or not 0 <= self.min_chunks <= self.chunks:
            raise ValueError(f"FIITED: min_chunks must be an int in [0, chunks={self.chunks}], got {self.min_chunks!r}")
        if self.max_chunks is not None and (not isinstance(self.max_chunks, int) or isinstance(self.max_chunks, bool)
                                            or not max(1, self.admit, self.min_chunks) <= self.max_chunks <= self.chunks):
            raise ValueError(f"FIITED: max_chunks must be an int in [max(1, admit, min_chunks), chunks={self.chunks}], got {self.max_chunks!r}")
        if not isinstance(self.sketch, (int, float)) or isinstance(self.sketch, bool) or not 0.0 < self.sketch <= 16.0:
            raise ValueError(f"FIITED: sketch (cells per pool chunk) must be in (0, 16], got {self.sketch!r}")
        if self.fresh_chunks not in ("init", "zero"):
            raise ValueError(f"FIITED: fresh_chunks must be 'init' or 'zero', got {self.fresh_chunks!r}")
        if not isinstance(self.reserve, (int, float)) or not 0.0 <= self.reserve < 1.0:
            raise ValueError(f"FIITED: reserve must be in [0, 1), got {self.reserve!r}")
        self._ratio_or("pool")


@register_scheme(FIITED)
class FIITEDScheme(TableScheme):
    host_buffers = ("steps", "events")
    presets = {
        "fiited": lambda r, d: FIITED(ratio=r, chunks=d // 4),  # the paper's rule, chunks of 4 dims
        # + our priors against churn (not in the paper): a kept chunk counts twice, every id's first chunk
        # before anyone's second, at most 2 chunks per id, later chunks discounted, a narrower sketch, a reserve
        "fiited_prior": lambda r, d: FIITED(ratio=r, chunks=d // 4, hysteresis=2.0, position_decay=0.2, min_chunks=1, max_chunks=2,
                                            sketch=0.125, reserve=0.05),
    }
    ragged = True  # each id reaches only the chunk positions it keeps
    observes_gradients = True  # the module hooks :meth:`observe` on this table's output
    sees_ids = True  # :meth:`see`: remember the batch's ids and admit the new ones

    def __init__(self, table, config: FIITED) -> None:
        super().__init__(table, config)
        v, d, c = table.num_embeddings, table.embedding_dim, config.chunks
        if d % c or (d // c) % 4:
            raise ValueError(f"table {table.name!r}: FIITED chunks={c}: the chunk dim d / C = {d}/{c} must be a multiple of 4 (FBGEMM)")
        self.c, self.s = c, d // c
        self.top = c if config.max_chunks is None else config.max_chunks  # chunks an id may hold
        self.seen_bytes = seen_bytes(v)  # one bit per id
        if config.pool is not None:
            self.pool = min(config.pool, v * self.top)
        else:
            # per pool chunk: its weights, int64 key + int32 slot, its utility, its share of the sketch;
            # per table: the seen bitmap, the sketch's floor
            sketch_bytes = 4 * SKETCH_DEPTH * config.sketch
            per_chunk = 4 * self.s + 8 + 4 + 4 + sketch_bytes
            sketch_floor = 4 * SKETCH_DEPTH * MIN_SKETCH_WIDTH  # the sketch never gets narrower than this
            target = self._target_bytes() - self.seen_bytes
            fits = min(target // per_chunk, (target - sketch_floor) // (per_chunk - sketch_bytes))
            self.pool = min(v * self.top, int(fits))
            if self.pool < 1:
                raise self._too_small(f"not one chunk of {self.s} fits ({per_chunk:.0f} B each)")
        self.width = max(MIN_SKETCH_WIDTH, int(self.pool * config.sketch))
        # where the table's keys sit among its family's (set by FIITEDFamily): x * C + k + key_base
        self.key_base, self.sentinel = 0, INT64_MAX
        self.family: Optional[FIITEDFamily] = None
        self.family_index = 0
        self._pending = 0  # training steps not yet in the steps buffer

    # ------------------------------------------------------------------ batching
    def batch_key(self) -> Hashable:
        """Tables with the same chunk shape and admission form one family (one flat address
        structure: see :mod:`.family`) and one batch of the module's plan."""
        return ("fiited", self.c, self.s, self.config.admit)

    @staticmethod
    def join_batch(impls: Sequence["FIITEDScheme"]) -> None:
        FIITEDFamily(impls)

    def _family(self) -> FIITEDFamily:
        if self.family is None:  # a table outside a module: a family of one
            FIITEDFamily([self])
        return self.family

    def constants(self) -> Dict[str, int]:
        return {"family": self.family_index}

    def see_batch(self, values: torch.Tensor, c: Dict[str, torch.Tensor], group: Optional[dist.ProcessGroup]) -> None:
        """:meth:`see` of a batch: ``[N]`` ids of every feature, ``c["family"] [N]`` their tables."""
        self._family().see(values, c["family"], group)

    def route_batch(self, values: torch.Tensor, lengths: torch.Tensor, weights: Optional[torch.Tensor],
                    c: Dict[str, torch.Tensor]) -> Tuple[Routed, torch.Tensor]:
        """:meth:`route` of a batch: ``[N]`` ids of F features, ``lengths [F * B]``; part-major over
        the F x B bags (the batch's inner keys are suffix-major). Also the ``[N, C]`` slots."""
        ids, counts, w, slots = self._family().route(values, c["family"], lengths, weights)
        return (ids, counts, w), slots

    @staticmethod
    def observe_group(impls: Sequence["FIITEDScheme"], grad: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                      weights: Optional[torch.Tensor], c: Dict[str, torch.Tensor], mean: bool, routed: Optional[torch.Tensor],
                      group: Optional[dist.ProcessGroup]) -> None:
        """Backward hook on a batch's outputs ``grad [B, F, d]`` (:meth:`FIITEDFamily.observe`)."""
        f_n = grad.shape[1]
        means = torch.ones(f_n, dtype=torch.bool, device=grad.device) if mean else None
        impls[0]._family().observe(grad, values, c["family"], lengths, weights, means, routed, group)

    # ------------------------------------------------------------------ storage
    def physical_tables(self) -> List[PhysicalTable]:
        init = uniform_init(self.table) if self.config.fresh_chunks == "init" else constant_init(0.0)
        return [PhysicalTable("__pool", self.pool, self.s, init, lookups=self.c)]

    def initial_buffers(self) -> Dict[str, torch.Tensor]:
        return {
            "keys": torch.full((self.pool,), self.sentinel, dtype=torch.int64),  # sorted key_base + x * C + k of kept chunks
            "slots": torch.full((self.pool,), -1, dtype=torch.int32),  # their pool rows
            "n_kept": torch.zeros((), dtype=torch.int64),
            "slot_utility": torch.zeros(self.pool),  # u of the chunk in each pool slot (exact)
            "utility": torch.zeros(SKETCH_DEPTH, self.width),  # count-min sketch of u(x, k) of pruned chunks
            "seen": torch.zeros(self.seen_bytes, dtype=torch.uint8),  # bit x: id x seen since the last event
            "key_base": torch.full((), self.key_base, dtype=torch.int64),  # what the stored keys are offset by
            "steps": torch.zeros((), dtype=torch.int64),  # training forwards
            "events": torch.zeros((), dtype=torch.int64),
        }

    def load_buffer(self, name: str, tensor: torch.Tensor, saved: Dict[str, torch.Tensor]) -> torch.Tensor:
        """A checkpoint's keys offset by another family layout (or none: older checkpoints) are
        moved to this table's ``key_base``; its free entries to this table's sentinel."""
        if name == "key_base":
            return torch.full_like(tensor, self.key_base)
        if name != "keys":
            return tensor
        base = int(saved["key_base"]) if "key_base" in saved else 0
        keys = tensor.to(torch.int64)
        real = (keys >= base) & (keys < base + self.table.num_embeddings * self.c)
        return torch.where(real, keys - base + self.key_base, self.sentinel)

    # ------------------------------------------------------------------ lookup
    def _index(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.full_like(ids, self.family_index, dtype=torch.int64)

    def slots_of(self, values: torch.Tensor) -> torch.Tensor:
        """``[N]`` ids -> ``[N, C]`` pool slots (int64), -1 where the chunk is pruned (eq. 1)."""
        return self._family().slots(values, self._index(values))

    def route(self, jt: JaggedTensor) -> Routed:
        """Per chunk position k, laid end to end: the pool slots of the bag's ids that keep chunk k, per-bag counts, weights."""
        values = jt.values()
        ids, counts, w, slots = self._family().route(values, self._index(values), jt.lengths(), jt.weights_or_none())
        self._routed = (values, slots)  # observe() of the same ids reuses it (an event clears it)
        return ids, counts, w

    def transform(self, values: torch.Tensor, c=None) -> List[torch.Tensor]:
        raise NotImplementedError("FIITED is ragged: ids reach only their kept chunks (see route)")

    def combine(self, parts: List[torch.Tensor], values: Optional[torch.Tensor], c=None) -> torch.Tensor:
        return torch.cat(parts, dim=-1)  # [B, d] of one feature, [B, F, d] of a batch

    # ------------------------------------------------------------------ memory
    def paper_bytes(self) -> int:
        """Memory as the paper counts it: the chunks kept now, ``n_kept x d / C`` values of the
        table's dtype, nothing else. The honest count (:meth:`memory_parts`, the primary one)
        is the whole pool, rows no chunk holds included, plus our metadata: the sorted keys and
        slots of the address structure, the kept chunks' utilities, the sketch of the pruned
        ones, the seen-id bitmap and the counters."""
        chunk = self.table_bytes() // self.pool  # one pool row: d / C values
        return self._kept() * chunk

    def _kept(self) -> int:
        """Chunks kept now (a device read; 0 on meta: nothing yet)."""
        return 0 if self.buffers.n_kept.is_meta else self._host_int("n_kept")

    # ------------------------------------------------------------------ utility
    def _sketch_seed(self, r: int) -> int:
        """Seed of the sketch's r-th row hash (:meth:`FIITEDFamily.sketch_cells`)."""
        return self.config.seed * 100 + r

    def utility(self, ids: torch.Tensor) -> torch.Tensor:
        """``[M]`` ids -> ``[M, C]`` utilities: exact for kept chunks, the count-mean-min
        estimate for pruned ones."""
        return self._family().utility(ids, self._index(ids))

    @torch.no_grad()
    def observe(self, grad: torch.Tensor, jt: JaggedTensor, group: Optional[dist.ProcessGroup]) -> None:
        """Backward hook on the table's pooled output ``grad [B, d]`` (:meth:`FIITEDFamily.observe`)."""
        self.observe_batch([self], grad.view(grad.shape[0], 1, -1), [jt], group)

    @staticmethod
    @torch.no_grad()
    def observe_batch(impls: Sequence["FIITEDScheme"], grad: torch.Tensor, jts: Sequence[JaggedTensor],
                      group: Optional[dist.ProcessGroup]) -> None:
        """Backward hook on T features' pooled outputs ``grad [B, T, d]`` (each one table's; one
        family): :meth:`FIITEDFamily.observe` of their ids laid end to end."""
        values = [jt.values() for jt in jts]
        device = grad.device
        table = torch.repeat_interleave(torch.tensor([i.family_index for i in impls], device=device),
                                        torch.tensor([v.numel() for v in values], device=device), output_size=sum(v.numel() for v in values))
        means = [i.table.pooling == PoolingType.MEAN for i in impls]
        weights = [jt.weights_or_none() for jt in jts]
        slots = torch.cat([impl._routed_slots(v) for impl, v in zip(impls, values)])
        impls[0]._family().observe(grad, torch.cat(values), table, torch.cat([jt.lengths() for jt in jts]),
                                   None if weights[0] is None else torch.cat(weights),
                                   torch.tensor(means, device=device) if any(means) else None, slots, group)

    def observe_key(self) -> Hashable:
        """Tables of one family share one :meth:`observe_batch`."""
        return ("fiited", id(self._family()))

    def _routed_slots(self, values: torch.Tensor) -> torch.Tensor:
        """``[N, C]`` slots of ``values``: the forward's (:meth:`route`), else looked up again."""
        routed = getattr(self, "_routed", None)
        return routed[1] if routed is not None and routed[0] is values else self.slots_of(values)

    @torch.no_grad()
    def see(self, values: torch.Tensor, group: Optional[dist.ProcessGroup]) -> None:
        """Every training forward, before the lookup: mark the batch's ids (gathered over
        ``group``) as seen for the next event, and *admit* the ones that keep no chunk: their
        first ``admit`` chunks take free pool slots (zero since they were freed), lowest ids
        first, while free slots last. As in the paper's storage, a new id is allocated on first
        access and pruned later, rather than learning nothing until the next event; the
        event leaves ``reserve`` of the pool free for this."""
        self._routed = None
        self._family().see(values, self._index(values), group)

    def seen_ids(self) -> torch.Tensor:
        """``[M]`` int64: the ids seen since the last event, sorted."""
        bits = torch.bitwise_right_shift(self.buffers.seen.unsqueeze(1), torch.arange(8, dtype=torch.uint8, device=self.buffers.seen.device))
        return torch.nonzero(torch.bitwise_and(bits, 1).reshape(-1)).squeeze(1)

    def _seen_candidates(self) -> torch.Tensor:
        """The seen ids an event ranks: the ``pool / C`` of highest chunk-0 utility (it bounds
        the row's prefix utility; ties: lower id), so ids seen once with a noisy sketch estimate
        do not crowd the ranking."""
        seen = self.seen_ids()
        cap = max(1, self.pool // self.c)
        if seen.numel() <= cap:
            return seen
        keep = torch.sort(-self.utility(seen)[:, 0], stable=True).indices[:cap]
        return seen[keep]

    def status(self) -> Dict[str, object]:
        self.flush_steps()
        return {"kept_chunks": self._kept(), "events": self._host_int("events")}

    # ------------------------------------------------------------------ prune / grow
    def step(self, training: bool) -> bool:
        """Count a forward; True when an event is due before it: after 1, 2, 4, ... training
        steps (the pool starts empty), then every ``interval`` steps."""
        if not training:
            return False
        n, interval = self._host_int("steps") + self._pending, self.config.interval
        # warm-up: events after 1, 2, 4, ... steps fill the empty pool quickly; then every interval
        due = n > 0 and (n % interval == 0 or (n < interval and n & (n - 1) == 0))
        self._pending += 1  # counted on the host: no op per forward (flush_steps folds it in)
        return due

    def flush_steps(self) -> None:
        """Fold the steps counted on the host into the ``steps`` buffer (before it is read or saved)."""
        if self._pending:
            self._set_host("steps", self._host_int("steps") + self._pending)
            self._pending = 0

    def _free_slots(self, owned: torch.Tensor, count: int) -> torch.Tensor:
        """The ``count`` lowest pool slots not in ``owned`` (int64 slots)."""
        used = torch.zeros(self.pool, dtype=torch.bool, device=owned.device)
        used[owned] = True
        return torch.nonzero(~used).squeeze(1)[:count]

    @torch.no_grad()
    def event(self, tables=None) -> Dict[str, torch.Tensor]:
        """Prune and grow within the pool. Returns ``{pool table: granted and freed slots}`` (to be zeroed)."""
        self._family().link()
        b = self.buffers
        self._routed = None  # the assignment changes
        c, n = self.c, self._host_int("n_kept")
        old_keys, old_slots = b.keys[:n] - self.key_base, b.slots[:n].to(torch.int64)  # local keys x * C + k
        cand = torch.unique(torch.cat([old_keys // c, self._seen_candidates()]))
        raw = self.utility(cand)  # [M, C]
        held = self.slots_of(cand) >= 0
        u = torch.cummin(torch.where(held, raw * self.config.hysteresis, raw), dim=1).values.reshape(-1)  # [M * C], x-major
        if self.config.position_decay < 1.0:  # diminishing returns of later chunks (a prior, not in the paper)
            u = (u.view(-1, c) * self.config.position_decay ** torch.arange(c, device=u.device)).reshape(-1)
        if self.top < c:  # chunks past max_chunks are never granted
            u = u.view(-1, c).index_fill(1, torch.arange(self.top, c, device=u.device), 0.0).reshape(-1)
        keep = self.pool - (math.ceil(self.config.reserve * self.pool) if self.config.admit else 0)
        order = torch.sort(-u, stable=True).indices  # stable: lower id, then position, first
        order = order[u[order] > 0]  # before min_chunks' tiers: a useless first chunk must not take a useful chunk's place
        if self.config.min_chunks:  # every candidate's first min_chunks chunks rank before any later chunk
            later = (torch.arange(u.numel(), device=u.device) % c >= self.config.min_chunks)[order]
            order = order[torch.sort(later.to(torch.int8), stable=True).indices]
        order = order[:keep]
        chosen = (cand[order // c] * c + order % c).sort().values  # new sorted keys
        pos = torch.searchsorted(old_keys, chosen).clamp(max=max(n - 1, 0))
        kept = (old_keys[pos] == chosen) if n else torch.zeros_like(chosen, dtype=torch.bool)
        slots = torch.full_like(chosen, -1)
        slots[kept] = old_slots[pos[kept]]
        granted = self._free_slots(slots[kept], int((~kept).sum()))
        slots[~kept] = granted
        # utilities follow the chunks: pruned ones go to the sketch, granted ones leave it
        granted_u = raw.reshape(-1)[order][torch.argsort(cand[order // c] * c + order % c)][~kept]  # chosen (sorted key) order
        dropped = torch.ones(n, dtype=torch.bool, device=chosen.device)
        if n:
            dropped[pos[kept]] = False
        pruned, sketch = old_keys[dropped], self._family().link()["utility"]
        for cell in self._family().sketch_cells(pruned, self._index(pruned)):
            sketch.index_add_(0, cell, b.slot_utility[old_slots[dropped]])
        freed = old_slots[dropped]
        b.slot_utility[freed] = 0.0
        b.slot_utility[granted] = granted_u
        m = chosen.numel()
        b.keys.fill_(self.sentinel)
        b.keys[:m] = chosen + self.key_base
        b.slots.fill_(-1)
        b.slots[:m] = slots.to(torch.int32)
        self._set_host("n_kept", m)
        b.utility.mul_(self.config.decay)
        b.slot_utility.mul_(self.config.decay)
        b.seen.zero_()
        self._set_host("events", self._host_int("events") + 1)
        # granted and freed slots restart from the table's init (reset_values); admission (see) takes free ones as they are
        return {f"{self.table.name}__pool": torch.unique(torch.cat([granted, freed]))}

    def reset_values(self, physical: str, rows: torch.Tensor, dim: int) -> Optional[torch.Tensor]:
        """``fresh_chunks="init"``: fresh chunks drawn like the table's init (uniform, its range),
        the same on every rank (seeded by the config's seed and the event count); else zeros."""
        if self.config.fresh_chunks == "zero":
            return None
        return uniform_draw(self.table, rows.numel(), dim, self.config.seed * 1_000_003 + self._host_int("events")).to(rows.device)

    def kept_chunks(self) -> torch.Tensor:
        """``[v]`` int64: c(x), the chunks each id keeps now."""
        b = self.buffers
        x = (b.keys[: self._host_int("n_kept")] - self.key_base) // self.c
        return torch.zeros(self.table.num_embeddings, dtype=torch.int64, device=x.device).index_add_(0, x, torch.ones_like(x))

    # --- the plain-torch reference of the paper's equation (the tests compare against it) ----
    @staticmethod
    def reference(table, config, w, x: int, state) -> torch.Tensor:
        """Eq. 1: kept chunks from the pool, pruned ones zero."""
        pool, c = w[f"{table.name}__pool"], config.chunks
        n, base = int(state["n_kept"]), int(state["key_base"])
        kept = {int(k) - base: int(sl) for k, sl in zip(state["keys"][:n].tolist(), state["slots"][:n].tolist())}
        s = table.embedding_dim // c
        return torch.cat([pool[kept[x * c + k]] if x * c + k in kept else torch.zeros(s) for k in range(c)])
