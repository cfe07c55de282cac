"""Compression-aware planning: choose a scheme and ratio per table so the model fits a
per-rank memory budget, then let TorchRec's ``EmbeddingShardingPlanner`` shard the
compressed physical tables (its storage estimates see the true compressed shapes and
the fused optimizer's state).

Policy (greedy, documented proxy). Each table t at ratio r has an expected quality loss

    loss(t, r) = importance_t * share_t * tail_t(v_t / r)

where ``share_t`` is t's share of all lookups (from frequency statistics, else pooling
factors, else equal) and ``tail_t(k)`` is the share of t's lookups that go to ids outside
its k most frequent ids, i.e. the lookups that can no longer have a row of their own
(from the statistics' counts; without statistics a Zipf(1.05) law). Starting from every
table uncompressed, the planner repeatedly applies the next ratio step (x2) of the table
whose step costs the least proxy per byte saved, until TorchRec's planner finds a plan
that fits every rank. Large tables with little frequency mass go first; small or hot
tables stay exact; a table is compressed only when the budget needs it.

Scheme per ratio: ``QR`` where it can reach the ratio (about sqrt(v)/2), else
``MemRec`` (any ratio); pass ``scheme_for`` to choose otherwise.
"""
from __future__ import annotations

import copy
import json
import logging

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
from tabulate import tabulate
from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import PlannerError
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from ..config import SchemeConfig, scheme_class_for
from ..modules.compress import compress_
from ..schemes import QR, MemRec
from ..stats import FrequencyStats
from .sharders import sharders

RATIOS = [2.0**k for k in range(0, 15)]  # 1x .. 16384x
ZIPF_S = 1.05
ROWWISE_STATE = 4  # bytes per row of fused row-wise Adagrad state


def default_scheme(table: EmbeddingBagConfig, ratio: float) -> Optional[SchemeConfig]:
    """QR where it reaches ``ratio``, MemRec beyond (None = uncompressed)."""
    if ratio <= 1:
        return None
    for cfg in (QR(ratio=ratio), MemRec(ratio=ratio)):
        try:
            scheme_class_for(cfg)(table, cfg)
            return cfg
        except ValueError:
            continue
    return None


def table_bytes(table: EmbeddingBagConfig, cfg: Optional[SchemeConfig]) -> int:
    """Stored bytes of a table under ``cfg`` plus fused row-wise Adagrad state (4 B/row)."""
    if cfg is None:
        return table.num_embeddings * (table.embedding_dim * 4 + ROWWISE_STATE)
    impl = scheme_class_for(cfg)(table, cfg)
    phys = impl.physical_tables()
    return sum(p.num_embeddings * (p.embedding_dim * 4 + ROWWISE_STATE) for p in phys) + impl.extra_bytes()


def _zipf_coverage(k: float, v: int) -> float:
    """Share of Zipf(s) lookups that hit the k most frequent of v ids."""
    if k >= v:
        return 1.0
    a = 1.0 - ZIPF_S
    return (k**a - 1.0) / (v**a - 1.0)


@dataclass
class TablePlan:
    table: str
    rows: int
    dim: int
    scheme: str
    ratio: float
    bytes: int
    proxy_loss: float
    sharding: List[str] = field(default_factory=list)


@dataclass
class CompressionPlan:
    """What the planner chose: per-table schemes, the TorchRec ``ShardingPlan`` of the
    compressed model, and a readable report (``str(plan)``, ``plan.to_json()``)."""

    schemes: Dict[str, SchemeConfig]
    sharding_plan: ShardingPlan
    tables: List[TablePlan]
    world_size: int
    memory_per_rank: int
    per_rank_bytes: List[int]
    seconds: float

    def __str__(self) -> str:
        rows = [[t.table, f"{t.rows:,}", t.dim, t.scheme, f"{t.ratio:g}x", _gib(t.bytes), f"{t.proxy_loss:.4f}", "; ".join(t.sharding)]
                for t in self.tables]
        head = (f"world size {self.world_size}, budget {_gib(self.memory_per_rank)} per rank; "
                f"planned per rank (tables + optimizer state): {', '.join(_gib(b) for b in self.per_rank_bytes[:8])}"
                f"{' ...' if self.world_size > 8 else ''}; planning took {self.seconds:.1f} s")
        return head + "\n" + tabulate(rows, headers=["table", "rows", "dim", "scheme", "ratio", "bytes", "loss proxy", "sharding (physical table: type ranks)"])

    def to_json(self) -> str:
        return json.dumps({
            "world_size": self.world_size, "memory_per_rank": self.memory_per_rank, "per_rank_bytes": self.per_rank_bytes,
            "seconds": self.seconds, "tables": [t.__dict__ for t in self.tables],
            "schemes": {k: {"type": type(v).__name__, **v.__dict__} for k, v in self.schemes.items()},
        }, indent=1, default=str)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _tail(table: EmbeddingBagConfig, ratio: float, stats: Optional[FrequencyStats]) -> float:
    k = table.num_embeddings / ratio
    if stats is None or not all(f in stats.num_embeddings for f in table.feature_names):
        return 1.0 - _zipf_coverage(k, table.num_embeddings)
    total = sum(stats.total(f) for f in table.feature_names)
    if total == 0:
        return 0.0
    head = 0
    for f in table.feature_names:
        _, counts = stats.top_k(f, int(k))
        head += int(counts.sum())
    return max(0.0, 1.0 - head / total)


def _shares(tables: Sequence[EmbeddingBagConfig], stats: Optional[FrequencyStats], pooling: Mapping[str, float]) -> Dict[str, float]:
    raw = {}
    for t in tables:
        if stats is not None and all(f in stats.num_embeddings for f in t.feature_names):
            raw[t.name] = float(sum(stats.total(f) for f in t.feature_names))
        else:
            raw[t.name] = float(pooling.get(t.name, 1.0)) * len(t.feature_names)
    s = sum(raw.values()) or 1.0
    return {k: v / s for k, v in raw.items()}


def _per_rank_bytes(plan: ShardingPlan, world_size: int, phys: Mapping[str, EmbeddingBagConfig]) -> List[int]:
    """Bytes per rank (fp32 rows + row-wise state) from the shard placements of ``plan``."""
    out = [0] * world_size
    for module_plan in plan.plan.values():
        for name, ps in module_plan.items():
            cfg = phys[name]
            if ps.sharding_spec is None:  # data parallel: a replica everywhere
                for r in range(world_size):
                    out[r] += cfg.num_embeddings * (cfg.embedding_dim * 4 + ROWWISE_STATE)
                continue
            for shard in ps.sharding_spec.shards:
                rows, cols = shard.shard_sizes
                out[shard.placement.rank()] += rows * (cols * 4 + ROWWISE_STATE)
    return out


def plan_compression_(
    model: nn.Module,
    world_size: int,
    memory_per_rank: int,
    compute_device: str = "cpu",
    stats: Optional[FrequencyStats] = None,
    importance: Optional[Mapping[str, float]] = None,
    pooling_factors: Optional[Mapping[str, float]] = None,
    scheme_for: Callable[[EmbeddingBagConfig, float], Optional[SchemeConfig]] = default_scheme,
    batch_size: int = 512,
    pipelineable: bool = False,
) -> CompressionPlan:
    """Compress ``model``'s EBC tables in place as far as the budget needs and plan sharding.

    Args:
        model: holds ``torchrec.EmbeddingBagCollection``s (build it on ``meta``).
        world_size: ranks; ``memory_per_rank``: bytes per rank for embeddings (DDR on
            CPU, HBM on CUDA), optimizer state included.
        stats: frequency statistics (by feature) for the tail-mass proxy.
        importance: optional per-table weights of the proxy (default 1).
        pooling_factors: average ids per bag per table, used for lookup shares without stats.
        pipelineable: plan compressed modules as whole modules for
            ``sharders(pipelineable=True)`` (TrainPipelineSparseDist can then pipeline them).
    Returns:
        the plan; ``DistributedModelParallel(model, plan=plan.sharding_plan, sharders=sharders(pipelineable=...))``.
    Raises:
        ValueError naming the dominant table and the shortfall when nothing fits.
    """
    t0 = time.perf_counter()
    tables = [t for m in model.modules() if type(m) is EmbeddingBagCollection for t in m.embedding_bag_configs()]
    if not tables:
        raise ValueError("plan_compression_: the model holds no torchrec EmbeddingBagCollection")
    importance = dict(importance or {})
    share = _shares(tables, stats, pooling_factors or {})
    level = {t.name: 0 for t in tables}
    cfgs = {t.name: None for t in tables}
    cost = {t.name: table_bytes(t, None) for t in tables}
    proxy = {t.name: 0.0 for t in tables}
    capacity = world_size * memory_per_rank
    planner_topology = Topology(world_size=world_size, compute_device=compute_device, local_world_size=world_size,
                                **({"hbm_cap": memory_per_rank} if compute_device == "cuda" else {"ddr_cap": memory_per_rank}))

    def step_candidates():
        for t in tables:
            for nxt in range(level[t.name] + 1, len(RATIOS)):
                cfg = scheme_for(t, RATIOS[nxt])
                if cfg is None:
                    continue
                b = table_bytes(t, cfg)
                if b >= cost[t.name]:
                    continue
                p = importance.get(t.name, 1.0) * share[t.name] * _tail(t, RATIOS[nxt], stats)
                yield (p - proxy[t.name]) / (cost[t.name] - b), t, nxt, cfg, b, p
                break

    target = 0.9 * capacity  # headroom for TorchRec's IO buffers and shard balance
    logging.getLogger("torchrec.distributed.planner").setLevel(logging.ERROR)
    last_error = ""
    while True:
        while sum(cost.values()) > target:
            best = min(step_candidates(), key=lambda c: c[0], default=None)
            if best is None:
                break
            _, t, nxt, cfg, b, p = best
            level[t.name], cfgs[t.name], cost[t.name], proxy[t.name] = nxt, cfg, b, p
        trial = copy.deepcopy(model)
        schemes = {k: v for k, v in cfgs.items() if v is not None}
        if schemes:
            compress_(trial, schemes)
        try:
            splan = EmbeddingShardingPlanner(
                topology=planner_topology, batch_size=batch_size, storage_reservation=FixedPercentageStorageReservation(0.05)
            ).plan(trial, sharders(pipelineable=pipelineable))
            break
        except PlannerError as e:
            last_error = str(e).splitlines()[0][:300]
        if next(step_candidates(), None) is None:
            worst = max(tables, key=lambda t: cost[t.name])
            raise ValueError(
                f"no plan fits {world_size} x {_gib(memory_per_rank)}: fully compressed the tables need {_gib(sum(cost.values()))} "
                f"(+ TorchRec's IO reservations); largest is {worst.name!r} at {_gib(cost[worst.name])}. TorchRec said: {last_error}"
            )
        target *= 0.85

    if schemes:
        compress_(model, schemes)
    phys = {c.name: c for m in model.modules() if type(m) is EmbeddingBagCollection for c in m.embedding_bag_configs()}
    placement: Dict[str, List[str]] = {}
    for path, module_plan in splan.plan.items():
        for name, ps in module_plan.items():
            placement.setdefault(name, []).append(f"{name}: {ps.sharding_type} {sorted(set(ps.ranks or []))}")
    report = []
    for t in tables:
        cfg = cfgs[t.name]
        names = [t.name] if cfg is None else [p.name(t.name) for p in scheme_class_for(cfg)(t, cfg).physical_tables()]
        report.append(TablePlan(t.name, t.num_embeddings, t.embedding_dim, "none" if cfg is None else cfg.name, RATIOS[level[t.name]],
                                cost[t.name], proxy[t.name], [s for n in names for s in placement.get(n, [])]))
    return CompressionPlan(schemes, splan, report, world_size, memory_per_rank, _per_rank_bytes(splan, world_size, phys),
                           time.perf_counter() - t0)


def parse_bytes(text: str) -> int:
    """'16GiB', '512MiB', '80GB', '1e9' -> bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "b": 1}
    s = text.strip().lower()
    for u in sorted(units, key=len, reverse=True):
        if s.endswith(u):
            return int(float(s[: -len(u)]) * units[u])
    try:
        return int(float(s))
    except ValueError:
        raise ValueError(f"cannot read a size from {text!r}; use e.g. 16GiB, 512MiB, 80GB") from None


def tables_module(tables: Sequence[EmbeddingBagConfig]) -> nn.Module:
    """A meta-device holder of one EBC over ``tables`` (for planning tables without a model)."""
    holder = nn.Module()
    holder.ebc = EmbeddingBagCollection(list(tables), device=torch.device("meta"))
    return holder


