"""The per-step work of every FIITED table of one batch key (a *family*) in a fixed number of ops.

The tables' address structures, utilities, sketches and seen-id bitmaps are laid end to end
in one flat tensor per name; each table's own buffer (what its ``state_dict``, its events and
the tests read) is a view of its segment. Keys are global: table t's chunk key ``x * C + k``
is stored plus ``key_base[t] = t * 2^S`` (2^S > every table's v * C) and its free entries
hold ``sentinel[t] = (t + 1) * 2^S - 1``: a key's table is ``key >> S`` and a free entry is
one whose low S bits are all set. Every segment is sorted and lies below the next, so the
flat key array is sorted: one
``searchsorted`` finds any id's chunks in any table, one pass admits new ids into all of
them, one ``index_add_`` adds all their utilities.
"""
from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import JaggedTensor

from ...distributed.collectives import all_gather_ids
from ...ops import hash_ab, hash_params
from ..base import ragged_parts

if TYPE_CHECKING:
    from .scheme import FIITEDScheme

INT64_MAX = torch.iinfo(torch.int64).max
SKETCH_DEPTH = 2
# the buffers every table lays in one flat tensor per name (its own buffer a view of its segment)
_LAYOUT = ("keys", "slots", "slot_utility", "utility", "seen", "n_kept")


class FIITEDFamily:
    """The FIITED tables of one batch key (same C, d / C and ``admit``), in module order."""

    def __init__(self, impls: Sequence["FIITEDScheme"]) -> None:
        self.impls = list(impls)
        self.c, self.admit = impls[0].c, impls[0].config.admit
        v = [i.table.num_embeddings for i in impls]
        self.shift = max(n * self.c for n in v).bit_length()  # 2^S > v * C: a sentinel's low bits are never a key
        self.key_base = [t << self.shift for t in range(len(impls) + 1)]
        self.id_base = _starts(v)  # the global id space of one unique over all tables
        self.pool_off = _starts([i.pool for i in impls])
        self.sketch_off = _starts([SKETCH_DEPTH * i.width for i in impls])
        self.seen_off = _starts([i.seen_bytes for i in impls])
        self.P, self.W = sum(i.pool for i in impls), sum(SKETCH_DEPTH * i.width for i in impls)
        for t, impl in enumerate(impls):
            impl.family, impl.family_index = self, t
            impl.key_base = self.key_base[t]
            impl.sentinel = self.key_base[t + 1] - 1
        self._flat: Dict[str, torch.Tensor] = {}
        self._consts: Dict[torch.device, _Constants] = {}

    # ------------------------------------------------------------------ storage
    def link(self) -> Dict[str, torch.Tensor]:
        """The flat tensors, every table's buffer a view of its segment; re-made (the tables'
        values win) where a buffer is no longer its view (``.to()``, DMP's placement, deepcopy)."""
        states = [i.buffers for i in self.impls]
        if _tracing(states[0]._buffers["keys"]):  # torch.export: read-only lookups of the traced buffers, laid end to end
            return {name: torch.cat([s._buffers[name].reshape(-1) for s in states]) for name in _LAYOUT}
        for name in _LAYOUT:
            own = [s._buffers[name] for s in states]
            flat = self._flat.get(name)
            if flat is not None and _views_of(flat, own):
                continue
            if any(b.is_meta for b in own):
                continue
            device = own[0].device
            flat = torch.cat([b.detach().reshape(-1).to(device) for b in own])
            at = 0
            for s, b in zip(states, own):
                s._buffers[name] = flat.narrow(0, at, b.numel()).view(b.shape)
                at += b.numel()
            self._flat[name] = flat
        return self._flat

    def constants(self, device: torch.device) -> "_Constants":
        if device not in self._consts:
            self._consts[device] = _Constants(self, device)
        return self._consts[device]

    # ------------------------------------------------------------------ lookup (eq. 1)
    def slots(self, values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """``[N]`` ids of ``[N]`` tables (family index) -> ``[N, C]`` pool slots (int64, the
        table's own rows), -1 where the chunk is pruned: one search of the flat keys."""
        flat = self.link()
        k = self.constants(values.device)
        q = (values.to(torch.int64) * self.c + k.key_base[table]).unsqueeze(1) + k.arange_c
        pos = torch.searchsorted(flat["keys"], q.reshape(-1)).clamp(max=self.P - 1).view_as(q)
        return torch.where(flat["keys"][pos] == q, flat["slots"][pos].to(torch.int64), -1)  # a sentinel is no key

    # ------------------------------------------------------------------ utility
    def utility(self, values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """``[M]`` ids of ``[M]`` tables -> ``[M, C]`` utilities: exact for kept chunks, the
        count-mean-min estimate of the table's sketch for pruned ones."""
        flat = self.link()
        k = self.constants(values.device)
        local = values.to(torch.int64).unsqueeze(1) * self.c + k.arange_c  # [M, C]
        est = self.estimate(local.reshape(-1), table.repeat_interleave(self.c)).view_as(local)
        slots = self.slots(values, table)
        return torch.where(slots >= 0, flat["slot_utility"][(k.pool_off[table].unsqueeze(1) + slots).clamp(min=0)], est)

    def sketch_cells(self, local_keys: torch.Tensor, table: torch.Tensor) -> List[torch.Tensor]:
        """``[M]`` chunk keys ``x * C + k`` of ``[M]`` tables -> for each sketch row r, ``[M]``
        positions in the flat sketch (the table's row r, hashed by its seed ``_sketch_seed(r)``)."""
        k = self.constants(local_keys.device)
        width = k.width[table]
        return [k.sketch_off[table] + r * width + hash_ab(local_keys, width, k.hash_a[r][table], k.hash_b[r][table])
                for r in range(SKETCH_DEPTH)]

    def estimate(self, local_keys: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """``[M]`` chunk keys ``x * C + k`` of ``[M]`` tables -> their count-mean-min estimates:
        each of the table's sketch rows' cell less its expected share of the other keys' mass
        (a plain count-min over-estimates by ~total / width, which would let pruned chunks
        outbid kept ones), averaged, clamped to [0, the count-min]."""
        u = self.link()["utility"]
        k = self.constants(local_keys.device)
        # [T * depth] each sketch row's mass (unsafe: the lengths are ours, no host check of them)
        rows = torch.segment_reduce(u, "sum", lengths=k.row_lengths, unsafe=True)
        others = (k.width[table] - 1).clamp(min=1)
        cells, noise = [], []
        for r, at in enumerate(self.sketch_cells(local_keys, table)):
            cell = u[at]
            cells.append(cell)
            noise.append((rows[table * SKETCH_DEPTH + r] - cell) / others)
        cells_t, noise_t = torch.stack(cells), torch.stack(noise)
        return (cells_t - noise_t).mean(dim=0).clamp(min=0).minimum(cells_t.min(dim=0).values)

    @torch.no_grad()
    def observe(self, grad: torch.Tensor, values: torch.Tensor, table: torch.Tensor, lengths: torch.Tensor,
                weights: Optional[torch.Tensor], mean: Optional[torch.Tensor], slots: Optional[torch.Tensor],
                group: Optional[dist.ProcessGroup]) -> None:
        """Backward hook on F features' pooled outputs ``grad [B, F, d]``: add every id's
        per-chunk gradient magnitude ``|w| * ||dL/de_k(bag)||`` (/ bag length for MEAN) to its
        table's utilities, kept chunks by pool slot, pruned ones into every sketch row, in one
        ``index_add_`` (one all-reduce when sharded: averaged over ``group``'s ranks, as TorchRec
        averages embedding gradients). ``values [N]`` the features' ids laid end to end, ``table
        [N]`` their tables, ``lengths [F * B]`` the bags, ``mean [F]`` MEAN-pooled features (None: none)."""
        flat = self.link()
        b_n, f_n = grad.shape[0], grad.shape[1]
        c, device = self.c, grad.device
        k = self.constants(device)
        n = values.numel()
        bag = torch.repeat_interleave(torch.arange(f_n * b_n, device=device), lengths.long(), output_size=n)
        norms = grad.detach().float().view(b_n, f_n, c, -1).norm(dim=3).transpose(0, 1).reshape(f_n * b_n, c)
        per = norms[bag]  # [N, C]
        if weights is not None:
            per = per * weights.abs().unsqueeze(1)
        if mean is not None:
            div = torch.where(mean.repeat_interleave(b_n), lengths.clamp(min=1), 1).to(per.dtype)
            per = per / div[bag].unsqueeze(1)
        slots = self.slots(values, table) if slots is None else slots
        slots, t = slots.reshape(-1), table.repeat_interleave(c)
        keys = (values.to(torch.int64).unsqueeze(1) * c + k.arange_c).reshape(-1)
        kept, per = slots >= 0, per.reshape(-1)
        slot_at = k.pool_off[t] + slots.clamp(min=0)
        cells = self.sketch_cells(keys, t)
        if group is None or dist.get_world_size(group) == 1:  # straight into the tables' utilities (no delta the size of every pool)
            flat["slot_utility"].index_add_(0, slot_at, torch.where(kept, per, 0.0))
            flat["utility"].index_add_(0, torch.cat(cells), torch.where(kept, 0.0, per).repeat(SKETCH_DEPTH))
            return
        trash = self.P + self.W
        at = [torch.where(kept, slot_at, trash)] + [torch.where(kept, trash, self.P + cell) for cell in cells]
        delta = torch.full((trash + 1,), 0.0, device=device).index_add_(0, torch.cat(at), per.repeat(1 + SKETCH_DEPTH))
        dist.all_reduce(delta, group=group)
        delta /= dist.get_world_size(group)
        flat["slot_utility"].add_(delta[:self.P])
        flat["utility"].add_(delta[self.P:trash])

    # ------------------------------------------------------------------ seen ids, admission
    @torch.no_grad()
    def see(self, values: torch.Tensor, table: torch.Tensor, group: Optional[dist.ProcessGroup]) -> None:
        """Every training forward, before the lookup: mark the batch's ids (``[N]`` of ``[N]``
        tables; gathered over ``group``) in their tables' seen bitmaps for the next event, and
        *admit* the ones that keep no chunk: their first ``admit`` chunks take the lowest free
        pool slots of their table, lowest ids first, while free slots last."""
        flat = self.link()
        k = self.constants(values.device)
        ids = torch.unique(values.to(torch.int64) + k.id_base[table])  # sorted: table-major
        if group is not None and dist.get_world_size(group) > 1:
            ids = all_gather_ids(ids, group)
        t = torch.searchsorted(k.id_next, ids, right=True)
        x = ids - k.id_base[t]
        byte = k.seen_off[t] + torch.div(x, 8, rounding_mode="floor")
        bit = torch.bitwise_left_shift(torch.ones_like(x), torch.remainder(x, 8)).to(torch.uint8)
        seen = flat["seen"]
        fresh = torch.bitwise_and(seen[byte], bit) == 0
        seen.index_add_(0, byte, torch.where(fresh, bit, torch.zeros_like(bit)))  # distinct bits of a byte: their sum is their OR
        if self.admit:
            self._admit(flat, k, ids, x, t)

    def _admit(self, flat: Dict[str, torch.Tensor], k: "_Constants", ids: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> None:
        keys, slots, n_kept, a = flat["keys"], flat["slots"], flat["n_kept"], self.admit
        first = x * self.c + k.key_base[t]
        pos = torch.searchsorted(keys, first).clamp(max=self.P - 1)
        new = keys[pos] != first  # [M] ids that keep no chunk
        budget = torch.div(k.pool - n_kept, a, rounding_mode="floor")  # [T] ids each table can still take
        before = torch.cat([new.new_zeros(1, dtype=torch.int64), torch.cumsum(new.to(torch.int64), 0)])
        start, end = torch.searchsorted(ids, k.id_base), torch.searchsorted(ids, k.id_next)  # [T] each table's ids
        rank = before[:-1] - before[start][t]  # among its table's new ids
        take = torch.nonzero(new & (rank < budget[t])).squeeze(1)
        if not take.numel():  # a size, known without reading a value
            return
        admitted = torch.minimum(before[end] - before[start], budget).clamp(min=0) * a  # [T] chunks each table admits
        t_new = t[take].repeat_interleave(a)
        new_keys = ((first[take]).unsqueeze(1) + torch.arange(a, device=ids.device)).reshape(-1)  # sorted
        # the lowest free pool slots of every table: O(P) only in cheap elementwise passes
        low = (1 << self.shift) - 1
        real = torch.nonzero(torch.bitwise_and(keys, low) != low).squeeze(1)
        old_keys, old_slots = keys[real], slots[real].to(torch.int64)
        old_t = torch.bitwise_right_shift(old_keys, self.shift)
        used = torch.full((self.P,), False, device=keys.device)  # full, not zeros: the same ops at any size
        used[k.pool_off[old_t] + old_slots] = True
        free_before = torch.cumsum((~used).to(torch.int32), 0)  # [P] free slots up to and including each
        first_free = free_before[k.pool_off] - (~used[k.pool_off]).to(torch.int32)  # [T] free slots before each table
        new_before = torch.searchsorted(t_new, k.arange_t)  # [T] new keys of the tables before
        rank_new = torch.arange(new_keys.numel(), device=keys.device) - new_before[t_new]  # among its table's new keys
        granted = torch.searchsorted(free_before, (first_free[t_new] + rank_new + 1).to(torch.int32))  # the (rank+1)-th free slot of its table
        flat["slot_utility"][granted] = self.estimate(new_keys - k.key_base[t_new], t_new)  # what they earned while pruned
        # merge into the sorted keys (no re-sort): every entry moves up by the new keys of its table below it
        dst_old = real + torch.searchsorted(new_keys, old_keys) - new_before[old_t]
        dst_new = torch.searchsorted(keys, new_keys) + rank_new
        keys[dst_old], slots[dst_old] = old_keys, old_slots.to(slots.dtype)
        keys[dst_new], slots[dst_new] = new_keys, (granted - k.pool_off[t_new]).to(slots.dtype)
        n_kept.add_(admitted)

    # ------------------------------------------------------------------ route
    def route(self, values: torch.Tensor, table: torch.Tensor, lengths: torch.Tensor,
              weights: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """The pool slots of F features' ids (``[N]`` of ``[N]`` tables, ``lengths [F * B]``), chunk
        position by chunk position: ``(ids, lengths [C * F * B], weights, slots [N, C])``, part k's
        ids of every bag, then part k + 1's (a batch's inner keys are suffix-major)."""
        slots = self.slots(values, table)
        jt = JaggedTensor(values=values, lengths=lengths, weights=weights)
        ids, counts, w = ragged_parts(jt, slots, list((slots >= 0).t().unbind(0)))
        return ids, counts, w, slots


class _Constants:
    """A family's per-table constants as ``[T]`` int64 tensors on one device."""

    def __init__(self, fam: FIITEDFamily, device: torch.device) -> None:
        impls = fam.impls
        as_t = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)  # noqa: E731
        self.key_base = as_t(fam.key_base[:-1])
        self.sentinel = as_t([i.sentinel for i in impls])
        self.id_base, self.id_next = as_t(fam.id_base[:-1]), as_t(fam.id_base[1:])
        self.pool_off = as_t(fam.pool_off[:-1])
        self.pool = as_t([i.pool for i in impls])
        self.sketch_off, self.seen_off = as_t(fam.sketch_off[:-1]), as_t(fam.seen_off[:-1])
        self.width = as_t([i.width for i in impls])
        self.row_lengths = as_t([i.width for i in impls for _ in range(SKETCH_DEPTH)])
        pairs = [[hash_params(i._sketch_seed(r)) for i in impls] for r in range(SKETCH_DEPTH)]
        self.hash_a = [as_t([a for a, _ in p]) for p in pairs]
        self.hash_b = [as_t([b for _, b in p]) for p in pairs]
        self.arange_c = torch.arange(fam.c, device=device)
        self.arange_t = torch.arange(len(impls), device=device)


def _starts(sizes: List[int]) -> List[int]:
    """``[0, s0, s0 + s1, ..., sum]``."""
    return list(itertools.accumulate(sizes, initial=0))


def _tracing(t: torch.Tensor) -> bool:
    """A fake or functional tensor (torch.export, torch.compile): it has no data pointer."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or torch._C._functorch.is_functorch_wrapped_tensor(t) or torch._is_functional_tensor(t)


def _views_of(flat: torch.Tensor, own: List[torch.Tensor]) -> bool:
    at, step = 0, flat.element_size()
    for b in own:
        if b.device != flat.device or b.data_ptr() != flat.data_ptr() + at * step:
            return False
        at += b.numel()
    return True


def seen_bytes(rows: int) -> int:
    """Bytes of a seen-id bitmap of ``rows`` ids."""
    return math.ceil(rows / 8)
