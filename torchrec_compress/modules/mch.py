"""TorchRec's own managed-collision tables (MCH, LFU eviction) as an equal-bytes baseline.

The alternative a TorchRec user tries first when a table does not fit: a
``ManagedCollisionEmbeddingBagCollection`` whose ``MCHManagedCollisionModule`` keeps the
``zch_size - 1`` most frequently seen ids (LFU over the whole run, re-ranked every
``eviction_interval`` steps) in their own rows; every other id shares the last row. Its bytes
are the table (``zch_size x d`` floats) plus the module's id buffers, counted as we count ours:
three int64 per slot (sorted raw ids, slot mapping, LFU counts) and the int64 history
accumulator (``1.25 x ids per step x eviction_interval``). :func:`zch_size_for` sizes
``zch_size`` so that the total matches a target ratio.

On CPU, TorchRec's sharded MC-EBC cannot evict (its row reset, ``fbgemm::reset_weight_momentum``,
has no CPU kernel), and its unsharded ``evict`` is a no-op (a newly admitted id would inherit
the evicted id's row). :class:`ManagedCollisionTables` therefore runs the MC-EBC's two parts
itself, remap then lookup, and zeroes evicted rows and their optimizer state as the sharded
module does on GPU. The remapping state is local to the process: one rank only (the
benchmarks' setting); a multi-rank run needs TorchRec's row-wise sharded MC-EBC (GPU).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.modules.mc_modules import LFU_EvictionPolicy, MCHManagedCollisionModule, ManagedCollisionCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

SLOT_BUFFER_BYTES = 3 * 8  # _mch_sorted_raw_ids, _mch_remapped_ids_mapping, _mch_counts (int64 each)


def history_bytes(ids_per_step: int, eviction_interval: int) -> int:
    """Bytes of MCH's history accumulator (int64, 1.25 x the ids it buffers between evictions)."""
    return 8 * int(ids_per_step * eviction_interval * 1.25)


def mch_bytes(zch_size: int, dim: int, ids_per_step: int, eviction_interval: int = 1) -> int:
    """Training bytes of one managed table: fp32 rows, per-slot id buffers, history."""
    return zch_size * (4 * dim + SLOT_BUFFER_BYTES) + history_bytes(ids_per_step, eviction_interval)


def zch_size_for(table: EmbeddingBagConfig, ratio: float, ids_per_step: int, eviction_interval: int = 1) -> int:
    """The largest ``zch_size`` whose :func:`mch_bytes` is at most ``rows x dim x 4 / ratio``.
    Raises ValueError (naming the table) when not even 2 slots fit."""
    budget = table.num_embeddings * table.embedding_dim * 4 / ratio - history_bytes(ids_per_step, eviction_interval)
    zch = int(budget // (4 * table.embedding_dim + SLOT_BUFFER_BYTES))
    if zch < 2:
        raise ValueError(f"mch: table {table.name!r} ({table.num_embeddings} rows x {table.embedding_dim}) cannot reach {ratio:g}x: "
                         f"its id buffers alone take the budget")
    return min(zch, table.num_embeddings + 1)


class ManagedCollisionTables(nn.Module):
    """EBC drop-in: KJT in, ``KeyedTensor`` out (every table's features, in table order).

    Args:
        tables: the logical tables (as for an ``EmbeddingBagCollection``).
        zch_sizes: table name -> zch_size for the managed tables; the others stay exact.
        eviction_interval: steps between LFU re-rankings (1: new ids are admitted every step).
        device: device of the tables (``meta`` when DMP materializes them).

    ``mc`` is TorchRec's ``ManagedCollisionEmbeddingBagCollection`` over the managed tables,
    ``exact`` a plain EBC over the others (None when every table is managed).
    """

    def __init__(self, tables: Sequence[EmbeddingBagConfig], zch_sizes: Dict[str, int], eviction_interval: int = 1,
                 device: torch.device = torch.device("cpu")) -> None:
        super().__init__()
        unknown = sorted(set(zch_sizes) - {t.name for t in tables})
        if unknown or not zch_sizes:
            raise ValueError(f"mch: zch_sizes names unknown tables {unknown}" if unknown else "mch: no table to manage")
        managed = [dataclasses.replace(t, num_embeddings=zch_sizes[t.name]) for t in tables if t.name in zch_sizes]
        exact = [t for t in tables if t.name not in zch_sizes]
        mcc = ManagedCollisionCollection(
            {t.name: MCHManagedCollisionModule(zch_size=t.num_embeddings, device=torch.device("cpu"), eviction_policy=LFU_EvictionPolicy(),
                                               eviction_interval=eviction_interval, input_hash_size=orig.num_embeddings, name=t.name)
             for t, orig in zip(managed, [t for t in tables if t.name in zch_sizes])},
            managed)
        self.mc = ManagedCollisionEmbeddingBagCollection(EmbeddingBagCollection(managed, device=device), mcc)
        self.exact = EmbeddingBagCollection(exact, device=device) if exact else None
        self._configs = list(tables)
        self._keys: List[str] = [f for t in tables for f in t.feature_names]
        self._managed_keys = [f for t in managed for f in t.feature_names]
        self._exact_keys = [f for t in exact for f in t.feature_names]

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._configs

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        jts = features.to_dict()
        remapped = self.mc._managed_collision_collection(KeyedJaggedTensor.from_jt_dict({k: jts[k] for k in self._managed_keys}))
        if self.training:  # before the lookup: its backward needs the weights as they were read
            self._reset_evicted()
        pooled = self.mc._embedding_module(remapped)
        parts = {**pooled.to_dict(), **(self.exact(KeyedJaggedTensor.from_jt_dict({k: jts[k] for k in self._exact_keys})).to_dict()
                                         if self.exact is not None else {})}
        return KeyedTensor.from_tensor_list(self._keys, [parts[k] for k in self._keys])

    @torch.no_grad()
    def _reset_evicted(self) -> None:
        """Zero the rows (and optimizer state) of slots whose id was just evicted: a newly
        admitted id starts from zero, not from the previous owner's embedding."""
        from ..distributed.state import zero_rows_and_state_

        for table, slots in self.mc._managed_collision_collection.evict().items():
            if slots is not None and slots.numel():
                rows = self.mc._managed_collision_collection._managed_collision_modules[table].output_size()
                zero_rows_and_state_(self.mc._embedding_module, table, slots.to(torch.int64), rows)
