"""The step schedule of schemes that learn from the data while training (DESIGN.md: schemes
drive themselves).

A :class:`Scheduled` scheme keeps a step counter, a stage and (while it counts) the id
counts of its table as buffers, so its procedure runs inside any training loop (ours,
TorchRec's pipeline, a user's own), identically on every rank (counts are summed over the
ranks every counting step), and survives a DCP checkpoint mid-phase. ``events()`` names
the steps at which :meth:`TableScheme.event` runs; the scheme's ``event`` moves it on.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from ..distributed.collectives import all_gather_id_counts, world
from .base import TableScheme


class Scheduled(TableScheme):
    """Base of FreqThreshold, Saec and MPE: count ids for ``count_steps`` training steps,
    then run events at the steps ``events()`` gives. ``stage`` 0 is "counting"; the scheme
    is fitted at stage ``FITTED``."""

    data_driven = True
    training_buffers = ("counts", "steps", "stage")
    host_buffers = ("steps", "stage")
    FITTED = 1

    def __init__(self, table, config) -> None:
        super().__init__(table, config)
        self._counting = False
        self._fitted = False  # a host-side memo once the stage says fitted (no read per forward afterwards)
        # steps are counted on the host (no op, no read per forward) and folded into the buffer
        # when it is read or saved (flush_steps); once fitted with every event behind it the
        # schedule is over (_done: nothing else to decide)
        self._done = False
        self._pending = 0

    # --- what a subclass gives ------------------------------------------------------------
    @property
    def count_steps(self) -> int:
        """Training steps whose ids are counted (0: counts only from ``fit_``)."""
        return 0

    def events(self) -> List[int]:
        """Steps (0-based count of training forwards before this one) at which ``event`` runs."""
        return [self.count_steps] if self.count_steps else []

    # --- state -----------------------------------------------------------------------------
    def lifecycle_buffers(self) -> Dict[str, torch.Tensor]:
        out = {"steps": torch.zeros((), dtype=torch.int64), "stage": torch.zeros((), dtype=torch.int8)}
        if self.count_steps:
            out["counts"] = torch.zeros(self.table.num_embeddings, dtype=torch.int32)
        return out

    @property
    def stage(self) -> int:
        return self._host_int("stage")

    def fitted(self) -> bool:
        if not self._fitted:
            self._fitted = self.stage >= self.FITTED
        return self._fitted

    # --- the schedule ---------------------------------------------------------------------
    def step(self, training: bool) -> bool:
        if not training:
            self._counting = False
            return False
        if self._done:
            self._pending += 1
            return False
        n = self.steps_taken()
        self._pending += 1
        if n > max(self.events(), default=-1) and self.fitted():
            self._done, self._counting = True, False
            return False
        self._step = n
        self._counting = n < self.count_steps and self.stage == 0
        return n in self.events()

    @property
    def sees_ids(self) -> bool:  # only while counting
        return self._counting

    def steps_taken(self) -> int:
        """Training forwards so far (the buffer and the steps not yet folded into it)."""
        return self._host_int("steps") + self._pending

    def count_offset(self, field: int) -> int:
        """Where the ids of the table's feature ``field`` are counted: id x at ``counts[offset + x]``
        (the module counts every table's ids in one op, into its flat count tensor)."""
        return 0

    @torch.no_grad()
    def see(self, values: torch.Tensor, group: Optional[dist.ProcessGroup]) -> None:
        counts = self.buffers.counts
        if world(group) == 1:  # index_add sums the duplicates itself: no unique (a sort)
            counts.index_add_(0, values.to(counts.device), torch.ones_like(values, dtype=counts.dtype, device=counts.device))
            return
        ids, n = all_gather_id_counts(values, group)
        counts.index_add_(0, ids.to(counts.device), n.to(counts.dtype).to(counts.device))

    STAGES = ("counting", "fitted")

    def flush_steps(self) -> None:
        """Fold the steps counted on the host into the ``steps`` buffer (before it is read or saved)."""
        if self._pending:
            self.buffers.steps.add_(self._pending)
            self._pending = 0

    def status(self) -> Dict[str, object]:
        self.flush_steps()
        return {"stage": self.STAGES[self.stage], "step": self.steps_taken()}

    def counted(self) -> torch.Tensor:
        """``[v]`` int64 counts gathered so far (zeros when the scheme does not count)."""
        c = getattr(self.buffers, "counts", None)
        return torch.zeros(self.table.num_embeddings, dtype=torch.int64) if c is None else c.detach().to(torch.int64).cpu()
