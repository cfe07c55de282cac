"""CompressedEmbeddingBagCollection: a drop-in for ``torchrec.EmbeddingBagCollection``.

Every scheme is a KJT transform, a standard inner TorchRec ``EmbeddingBagCollection``
over small physical tables, and a combine back to the logical features:

    KJT (logical features, raw ids)
      -> transform  (hash / quotient-remainder / ...; one virtual feature per physical table)
      -> inner EBCs  ``pooled`` (sum-compatible schemes), ``per_id`` (bags of one id) and
                    ``weighted`` (bags weighted by per-id scalars from ``per_id``: MEmCom, Mem-Rec)
      -> combine    (sum / product / concat; ``per_id`` lookups are pooled here)
    KeyedTensor with the keys, dims and order of ``EmbeddingBagCollection(tables)``

The inner EBCs are ordinary children, so ``DistributedModelParallel`` shards them with
TorchRec's own sharders and planner (FBGEMM kernels, fused optimizers unchanged).
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, Dict, Hashable, List, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.types import ShardedModule
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from .. import schemes as _schemes  # noqa: F401  (fills the registry)
from ..config import SchemeConfig, scheme_class_for
from ..schemes.base import TableAccess, TableScheme, Uncompressed, uniform_init
from ..distributed.collectives import all_gather_id_counts, world
from ..distributed.positions import encode_positions, weighted_lookup, with_weights
from ..distributed.state import agree_stride, copy_full_into_, full_tensor, inner_process_group, zero_rows_and_state_
from .batched import Group, Plan
from .memory import MemoryReport, TableMemory


INNER = ("pooled", "weighted", "per_id")  # the inner EBCs, in the order sharded modules and optimizers list them


class CompressedEmbeddingBagCollection(nn.Module):
    """Drop-in ``EmbeddingBagCollection`` whose tables are stored by compression schemes.

    Args:
        tables: the logical tables, exactly as for ``torchrec.EmbeddingBagCollection``.
        schemes: table name -> scheme config (``Hashing``, ``QR``, ``MEmCom``, ...);
            tables without an entry stay uncompressed (bit-identical to the stock EBC).
        is_weighted: whether input KJTs carry per-id weights (SUM-pooled tables).
        device: device of the physical tables (``meta`` for DMP to materialize).
        validate: check every input KJT (keys, lengths, id ranges, device) and raise a
            ``ValueError`` naming table, feature and value instead of failing in FBGEMM.

    Shapes: ``forward(KJT with B bags per feature) -> KeyedTensor [B, sum(dims)]``.

    Example::

        cebc = CompressedEmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name="t_user", embedding_dim=64, num_embeddings=10**6, feature_names=["user"])],
            schemes={"t_user": MEmCom(ratio=16)},
        )
        kt = cebc(kjt)                      # KeyedTensor, keys ["user"]
        print(cebc.memory_report())
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        schemes: Optional[Mapping[str, SchemeConfig]] = None,
        is_weighted: bool = False,
        device: Optional[torch.device] = None,
        validate: bool = True,
    ) -> None:
        super().__init__()
        schemes = dict(schemes or {})
        if not tables:
            raise ValueError("CompressedEmbeddingBagCollection needs at least one table")
        names = [t.name for t in tables]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate table names in {names}")
        unknown = sorted(set(schemes) - set(names))
        if unknown:
            raise ValueError(f"schemes given for unknown tables {unknown}; tables are {names}")
        for t in tables:
            if not t.feature_names:
                t.feature_names = [t.name]
            if is_weighted and t.pooling != PoolingType.SUM:
                raise ValueError(f"table {t.name!r}: weighted input needs SUM pooling, got {t.pooling}")

        self._tables = tables
        self._is_weighted = is_weighted
        self._validate = validate
        self._schemes: Dict[str, TableScheme] = {}
        for t in tables:
            cfg = schemes.get(t.name)
            if cfg is not None and not isinstance(cfg, SchemeConfig):
                raise ValueError(f"table {t.name!r}: scheme must be a SchemeConfig (e.g. Hashing(ratio=8)), got {cfg!r}")
            impl = Uncompressed(t, None) if cfg is None else scheme_class_for(cfg)(t, cfg)
            self._schemes[t.name] = impl
        batches: Dict[Hashable, List[TableScheme]] = {}
        for impl in self._schemes.values():
            if impl.batch_key() is not None:
                batches.setdefault((type(impl), impl.batch_key()), []).append(impl)
        for impls in batches.values():  # before their state is made: it may depend on the batch (FIITED)
            type(impls[0]).join_batch(impls)

        # feature -> (table, scheme); logical output order = table order, then feature order.
        self._feature_table: Dict[str, EmbeddingBagConfig] = {}
        for t in tables:
            for f in t.feature_names:
                if f in self._feature_table:
                    raise ValueError(f"feature {f!r} is used by tables {self._feature_table[f].name!r} and {t.name!r}")
                self._feature_table[f] = t
        self._embedding_names = [f for t in tables for f in t.feature_names]
        self._dims = [t.embedding_dim for t in tables for _ in t.feature_names]

        cfg_of: Dict[Tuple[str, int], EmbeddingBagConfig] = {}
        for t in tables:
            impl = self._schemes[t.name]
            for i, p in enumerate(impl.physical_tables()):
                cfg_of[(t.name, i)] = EmbeddingBagConfig(
                    name=p.name(t.name),
                    num_embeddings=p.num_embeddings,
                    embedding_dim=p.embedding_dim,
                    feature_names=[f"{f}{s}" for f in t.feature_names for s in p.feature_suffixes()],
                    data_type=t.data_type,
                    # per-id lookups are bags of one and ragged routes see part of a bag:
                    # the logical pooling is applied after combine
                    pooling=PoolingType.SUM if impl.per_value or impl.ragged or impl.id_weighted else t.pooling,
                    init_fn=p.init_fn or uniform_init(t),
                )
        pooled_cfgs: List[EmbeddingBagConfig] = []
        per_id_cfgs: List[EmbeddingBagConfig] = []
        weighted_cfgs: List[EmbeddingBagConfig] = []
        for names, n_phys in self._plan(tuple(self._embedding_names)).inner_table_order():
            for i in range(n_phys):
                for name in names:
                    impl = self._schemes[name]  # id-weighted: the first table in weighted bags, its weight tables per id
                    kind = weighted_cfgs if impl.id_weighted and i == 0 else \
                        per_id_cfgs if impl.per_value or impl.id_weighted else pooled_cfgs
                    kind.append(cfg_of[(name, i)])
        every = pooled_cfgs + weighted_cfgs + per_id_cfgs
        _check_unique([c.name for c in every], "physical table")
        _check_unique([f for c in every for f in c.feature_names], "physical feature")

        self._pooled_cfgs, self._per_id_cfgs, self._weighted_cfgs = pooled_cfgs, per_id_cfgs, weighted_cfgs
        self._elementwise = [p.name(t.name) for t in tables for p in self._schemes[t.name].physical_tables() if p.elementwise_optimizer]
        self.pooled: Optional[EmbeddingBagCollection] = (
            EmbeddingBagCollection(pooled_cfgs, is_weighted=is_weighted, device=device) if pooled_cfgs else None
        )
        self.per_id: Optional[EmbeddingBagCollection] = (
            EmbeddingBagCollection(per_id_cfgs, is_weighted=False, device=device) if per_id_cfgs else None
        )
        # id-weighted schemes' first tables: bags weighted by scalars computed from the per-id lookups
        self.weighted: Optional[EmbeddingBagCollection] = (
            EmbeddingBagCollection(weighted_cfgs, is_weighted=True, device=device) if weighted_cfgs else None
        )
        # id maps of schemes that keep them (FreqThreshold, Saec): plain buffers, replicated
        self.maps = nn.ModuleDict()
        for t in tables:
            impl = self._schemes[t.name]
            if impl.initial_buffers() or impl.initial_parameters():
                self.maps[t.name] = SchemeState(impl, device)
        # the small trainable tensors of tables that batch together, one flat [T, ...] parameter
        # per name: one optimizer step and one DDP gradient per family, not one per table
        self.flat_parameters = nn.ModuleDict()
        families: Dict[Hashable, List[SchemeState]] = {}
        for t in tables:
            impl = self._schemes[t.name]
            if t.name in self.maps and impl.batch_key() is not None and impl.batch_parameters():
                families.setdefault((type(impl).__name__, impl.batch_key()), []).append(self.maps[t.name])
        for states in families.values():
            if FlatParameters.fits(states):
                self.flat_parameters[f"f{len(self.flat_parameters)}"] = FlatParameters(states)
        self._register_load_state_dict_pre_hook(_moved_to_weighted, with_module=True)
        # follows .to(); lets forward() check the input device without touching sharded tables
        self.register_buffer("_device_probe", torch.empty(0, device=device), persistent=False)
        self._materialized = False  # scheme state checked after DMP's materialization (materialize())
        self._warned: set = set()

    # ------------------------------------------------------------------ torchrec API
    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        """The logical tables (what ``torchrec.models.dlrm.SparseArch`` reads)."""
        return self._tables

    def is_weighted(self) -> bool:
        return self._is_weighted

    def inner_collections(self) -> List[nn.Module]:
        """The inner EBCs that exist, in :data:`INNER` order (``pooled``, ``weighted``, ``per_id``)."""
        return [m for m in (getattr(self, n) for n in INNER) if m is not None]

    @property
    def device(self) -> torch.device:
        return self._device_probe.device

    def scheme(self, table_name: str) -> TableScheme:
        return self._schemes[table_name]

    def scheme_states(self) -> Dict[str, "SchemeState"]:
        """Table -> the module holding its scheme's buffers and small parameters (tables whose
        scheme keeps any state). Their ``steps`` counters are brought up to date first (a
        finished schedule counts its steps on the host; ``state_dict`` does the same)."""
        for state in self.maps.values():
            _flush_steps(state, "", False)
        return dict(self.maps.items())

    # ------------------------------------------------------------------ forward
    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """``features``: KJT over the logical feature names, B bags each -> ``KeyedTensor [B, sum(dims)]``."""
        state, pooled_kjt, per_id_kjt, weighted_kjt = self.split(features)
        pooled_out = self.pooled(pooled_kjt) if pooled_kjt is not None else None
        per_id_out = self.per_id(per_id_kjt) if per_id_kjt is not None else None
        weighted_out = None
        if weighted_kjt is not None:
            source = self.id_weights(state, per_id_out)
            if isinstance(self.weighted, ShardedModule) and source.requires_grad:  # sharded in place by DMP, training
                weighted_out = weighted_lookup(self.weighted, weighted_kjt, source, self._sync_group())
            else:  # unsharded: the position codes are the identity, the weights go in as they are
                weighted_out = self.weighted(with_weights(weighted_kjt, source))
        return self.combine(state, pooled_out, per_id_out, weighted_out)

    def split(self, features: KeyedJaggedTensor) -> Tuple["SplitState", Optional[KeyedJaggedTensor], Optional[KeyedJaggedTensor],
                                                          Optional[KeyedJaggedTensor]]:
        """Validate and transform: logical KJT -> (what :meth:`combine` needs, the ``pooled``
        inner KJT, the ``per_id`` inner KJT with every id a bag of one, the ``weighted`` inner
        KJT whose weights are position codes until :meth:`id_weights` gives them; None where unused).

        A fixed number of ops per :class:`~torchrec_compress.modules.batched.Group` and one
        host read (every feature's id count, with the validation's verdict); singles (schemes
        with procedures or per-table maps) add their own per-feature ops."""
        if features.variable_stride_per_key():
            raise ValueError("KJTs with a variable batch size per feature are not supported; give every feature the same stride")
        keys = list(features.keys())
        n_keys, batch = len(keys), features.stride()
        if self._validate:
            self._check_input(features)
        plan = self._plan(tuple(keys))
        values, lengths2d = features.values(), features.lengths().view(n_keys, batch)
        weights = features.weights_or_none() if self._is_weighted else None  # an unweighted collection ignores weights
        counts = lengths2d.sum(dim=1)  # [F] ids per feature
        flags = self._check_values(features, counts) if self._validate else None
        host = (counts if flags is None else torch.cat([flags.to(counts.dtype), counts])).tolist()  # the forward's host sync
        if flags is not None:
            if any(host[:len(flags)]):
                self._explain(features)
            host = host[len(flags):]
        if plan.direct:
            return self._direct_split(plan, keys, values, features.lengths(), lengths2d, weights, counts, host)
        perm = plan.permute(values.device)
        if perm is not None:  # every group's ids contiguous
            lengths2d, values, weights = torch.ops.fbgemm.permute_2D_sparse_data(perm, lengths2d, values, weights, values.numel())
            counts = counts.index_select(0, perm)
            host = [host[i] for i in plan.order]
        offsets = [0]
        for h in host:
            offsets.append(offsets[-1] + h)
        state = SplitState(plan=plan, batch=batch, counts=counts)
        for p in range(plan.single_start, n_keys):
            a, n = offsets[p], host[p]
            state.jts[plan.features[p]] = JaggedTensor(values=values.narrow(0, a, n), lengths=lengths2d[p],
                                                       weights=None if weights is None else weights.narrow(0, a, n))
        position = plan.position
        self._procedures(plan.features, values, counts, lambda f: values.narrow(0, offsets[position[f]], host[position[f]]),
                         plan.routed_tables)

        pooled = _InnerBatch(self._is_weighted)
        per_id = _InnerBatch(False)
        weighted = _InnerBatch(False, deferred=True)
        for g in plan.groups:
            a, n = offsets[g.start], offsets[g.start + g.size] - offsets[g.start]
            vals, lens = values.narrow(0, a, n), lengths2d.narrow(0, g.start, g.size)  # [n], [F_g, B]
            w = None if weights is None else weights.narrow(0, a, n)
            fidx = torch.repeat_interleave(g.tensors(vals.device)[0], counts.narrow(0, g.start, g.size), output_size=n)
            c = g.per_id_constants(fidx)
            if g.routes:  # routed id by id (FIITED): one route over every feature of the batch
                if g.scheme.sees_ids and self.training:
                    g.scheme.see_batch(vals, c, self._sync_group())
                flat = lens.reshape(-1)
                (i, counts_r, w_r), routed = g.scheme.route_batch(vals, flat, w, c)
                pooled.add(g.keys(), i, counts_r, w_r, None)
                state.groups.append(lens if g.pooling == PoolingType.MEAN else None)
                state.routed[len(state.groups) - 1] = (vals, flat, w, c, routed)
                continue
            ids = g.scheme.transform(vals, c)  # S x [n], suffix-major like g.keys()
            n_ids = host[g.start:g.start + g.size]
            if g.weighted:  # the first table's K lookups in real bags, weighted (after the per-id lookups) by id_weight
                k, flat = g.lookups, lens.reshape(-1)
                weighted.add(g.inner_keys("weighted"), ids[:k], [flat] * k, None, n_ids * k, source=("group", len(state.groups)))
                per_id.add(g.inner_keys("per_id"), _cat(ids[k:]), None, None, n_ids * (len(ids) - k))
                state.groups.append((vals, lens, w, fidx, c))
                continue
            if g.per_value:
                per_id.add(g.keys(), _cat(ids), None, None, n_ids * len(ids))
                state.groups.append((vals, lens, w, fidx, c))
                continue
            active = g.scheme.batch_active()  # stage-routed (Saec): every id to one of its tables
            flat = lens.reshape(-1)
            empty = torch.zeros_like(flat) if active is not None else None
            for s, (keys_s, i) in enumerate(zip(g.keys_by_suffix(), ids)):
                if active is None or active[s]:
                    pooled.add(keys_s, i, flat, w, n_ids)
                else:  # the keys stay (the inner KJT's keys never change), their bags are empty
                    pooled.add(keys_s, i[:0], empty, None if w is None else w[:0], [0] * g.size)
            state.groups.append(lens if g.ragged and g.pooling == PoolingType.MEAN else None)
        for p in range(plan.single_start, n_keys):
            f = plan.features[p]
            impl, jt = self._schemes[self._feature_table[f].name], state.jts[f]
            suffixes = impl.feature_suffixes()
            if impl.per_value or impl.id_weighted:
                k = impl.weighted_lookups()
                for j, (s, i) in enumerate(zip(suffixes, impl.transform(jt.values()))):
                    if j < k:
                        weighted.add([f"{f}{s}"], i, jt.lengths(), None, [host[p]], source=("single", f))
                    else:
                        per_id.add([f"{f}{s}"], i, None, None, [host[p]])
                continue
            i, lens, w = impl.route(jt)
            pooled.add([f"{f}{s}" for s in suffixes], i, lens, w, None if impl.ragged else [host[p]] * len(suffixes))
        state.sources = weighted.sources
        return state, pooled.kjt(batch), self._per_id_kjt(per_id), weighted.kjt(batch, self._rank())

    def _rank(self) -> int:
        """This process's rank among the sharded inner tables' (0 when unsharded): the source
        rank in the weighted KJT's position codes."""
        group = self._sync_group()
        return dist.get_rank(group) if group is not None else 0

    def id_weights(self, state: "SplitState", per_id_out: Optional[KeyedTensor]) -> torch.Tensor:
        """The ``weighted`` inner KJT's per-sample weights, ``[N_w]`` float32 in its order: each
        id's :meth:`~TableScheme.id_weight` from the per-id lookups ``per_id_out`` (times its
        KJT weight in a weighted collection), once per lookup of the first table.
        Differentiable: FBGEMM's weighted TBE returns their gradient, which reaches the
        per-id tables."""
        plan_blocks = state.plan.blocks("per_id", per_id_out)
        done: Dict[Hashable, torch.Tensor] = {}
        for src in state.sources:
            if src not in done:
                done[src] = self._id_weights(state, src, per_id_out, plan_blocks)
        return _cat([done[src] for src in state.sources])

    def _id_weights(self, state: "SplitState", src: Tuple[str, object], per_id_out: KeyedTensor,
                    plan_blocks: Tuple[Optional[List[torch.Tensor]], Dict[str, torch.Tensor]]) -> torch.Tensor:
        """``[n]`` the id weights of one id-weighted group (``("group", index)``) or single
        feature (``("single", name)``), times their KJT weights in a weighted collection."""
        blocks, single = plan_blocks
        if src[0] == "single":
            f = src[1]
            impl, jt = self._schemes[self._feature_table[f].name], state.jts[f]
            k, n = impl.weighted_lookups(), jt.values().numel()
            out = impl.id_weight([single[f"{f}{s}"][:n] for s in impl.feature_suffixes()[k:]], jt.values())
            w = jt.weights_or_none() if self._is_weighted else None
        else:
            gi = src[1]
            g = state.plan.groups[gi]
            vals, _, w, fidx, c = state.groups[gi]
            out = g.scheme.id_weight(self._per_id_rows(state, gi, per_id_out, blocks), vals, c)
        return out if w is None else out * w

    def _per_id_rows(self, state: "SplitState", gi: int, per_id_out: KeyedTensor,
                     blocks: Optional[List[torch.Tensor]]) -> List[torch.Tensor]:
        """Group ``gi``'s per-id lookups (``[S, F_g * d_p]`` per suffix, row i = a feature's
        i-th id) -> ``[n, d_p]`` per suffix, row i = the group's i-th id."""
        g = state.plan.groups[gi]
        vals, _, _, fidx, _ = state.groups[gi]
        rows = per_id_out.values()
        x = blocks[gi] if blocks is not None else \
            _select_columns(rows, state.plan.columns(("per_id", gi), per_id_out, g.inner_keys("per_id")))  # [S, sum(widths)]
        counts = state.counts.narrow(0, g.start, g.size)
        pos = torch.arange(vals.numel(), device=vals.device) - (counts.cumsum(0) - counts)[fidx]  # [n] row in its feature
        dims = g.inner_dims("per_id")
        return [t.reshape(rows.shape[0], g.size, d)[pos, fidx] for t, d in zip(_split(x, [g.size * d for d in dims]), dims)]

    def _direct_split(self, plan: Plan, keys: List[str], values: torch.Tensor, lengths: torch.Tensor, lengths2d: torch.Tensor,
                      weights: Optional[torch.Tensor], counts: torch.Tensor, host: List[int]
                      ) -> Tuple["SplitState", KeyedJaggedTensor, None, None]:
        """A direct plan: every group's transform runs elementwise over all the ids in the input's
        order (the other features' ids masked to 0, with the group's constants), one select per
        group; the inner KJT is the input's lengths and weights with the new ids, permuted into
        the module's order (one integer permute) only when the input has another order."""
        state = SplitState(plan=plan, batch=lengths2d.shape[1], counts=counts)
        offsets = [0]
        for h in host:
            offsets.append(offsets[-1] + h)
        at = {f: i for i, f in enumerate(keys)}
        self._procedures(keys, values, counts, lambda f: values.narrow(0, offsets[at[f]], host[at[f]]))
        n = values.numel()
        device = values.device
        fidx = torch.repeat_interleave(torch.arange(len(host), device=device), counts, output_size=n)  # [N] feature of each id
        mixed = len(plan.groups) > 1
        group = plan.group_of_input_feature(device)[fidx] if mixed else None
        ids = values
        for gi, g in enumerate(plan.groups):
            if g.scheme.identity_transform:
                continue
            member = group == gi if mixed else None
            c = {k: t[fidx] for k, t in g.full_constants(keys, device).items()}
            c.update(g.maps())
            own = g.scheme.transform(values if member is None else torch.where(member, values, 0), c)[0]
            ids = own if member is None else torch.where(member, own, ids)
        back = plan.to_module(device)
        if back is not None:
            lengths2d, ids, weights = torch.ops.fbgemm.permute_2D_sparse_data(back, lengths2d, ids, weights, n)
            lengths = lengths2d.reshape(-1)
            host = [host[i] for i in plan.to_module_order]
        kjt = KeyedJaggedTensor(keys=plan.direct_keys, values=ids, lengths=lengths, weights=weights,
                                stride=state.batch, length_per_key=host)
        return state, kjt, None, None

    def _procedures(self, keys: List[str], values: torch.Tensor, counts: torch.Tensor,
                    feature_ids: Callable[[str], torch.Tensor], batched_see: frozenset = frozenset()) -> None:
        """The schemes' own procedures (counting, clustering, search, re-planning), before the
        transform. ``values [N]``: the ids of the features ``keys`` laid end to end, ``counts [F]``
        of each; ``feature_ids(f)``: the ``[N_f]`` ids of feature f, for schemes that see ids their
        own way. Id counts of every counting table are added at once (:meth:`_count`); tables in
        ``batched_see`` see their ids with their batch (:meth:`~TableScheme.see_batch`)."""
        self.materialize()
        counting = []
        for t in self._tables:
            impl = self._schemes[t.name]
            if impl.step(self.training):
                for name, rows in impl.event(self.tables(t.name)).items():
                    self._reset_rows(name, rows, impl)
            if impl.sees_ids and self.training:
                if t.name in self._count_layout():
                    counting.append(t.name)
                elif t.name not in batched_see:
                    impl.see_features([feature_ids(f) for f in t.feature_names], self._sync_group())
            if not self.training and impl.data_driven and t.name not in self._warned and not impl.fitted():
                self._warned.add(t.name)
                warnings.warn(unfitted_message(t.name, impl), stacklevel=5)
        if counting:
            self._count(tuple(counting), keys, values, counts)

    def _count_layout(self) -> Dict[str, int]:
        """Table -> the start of its ``counts`` buffer in the module's flat count tensor (the
        tables whose scheme counts ids while training, :meth:`~torchrec_compress.schemes.
        lifecycle.Scheduled.count_offset`), in table order; the last slot takes ids not counted."""
        if "_count_starts" not in self.__dict__:
            starts, at = {}, 0
            for t in self._tables:
                impl = self._schemes[t.name]
                if hasattr(impl, "count_offset") and "counts" in impl.initial_buffers():
                    starts[t.name] = at
                    at += impl.initial_buffers()["counts"].numel()
            self._count_starts, self._count_size = starts, at + 1
        return self._count_starts

    def _count_flat(self) -> torch.Tensor:
        """The flat ``[sum of counts + 1]`` int32 tensor whose slices ARE the tables' ``counts``
        buffers (so one ``index_add_`` counts every table); re-made, keeping the counts, when a
        buffer is no longer its slice (``.to()``, DMP's placement)."""
        flat = self.__dict__.get("_counts_flat")
        layout = self._count_layout()
        if flat is None or any(self.maps[n]._buffers["counts"].data_ptr() != flat.data_ptr() + 4 * a for n, a in layout.items()):
            device = self.maps[next(iter(layout))].counts.device
            flat = torch.zeros(self._count_size, dtype=torch.int32, device=device)
            for n, a in layout.items():
                state = self.maps[n]
                part = flat.narrow(0, a, state.counts.numel())
                part.copy_(state.counts)
                state._buffers["counts"] = part
            self._counts_flat = flat
        return flat

    @torch.no_grad()
    def _count(self, tables: Tuple[str, ...], keys: List[str], values: torch.Tensor, counts: torch.Tensor) -> None:
        """Count the ids of every feature of ``tables`` in one ``index_add_`` (one all-gather of
        (id, count) pairs over the ranks when sharded): feature f's id x at its table's start +
        ``count_offset`` + x; the other features' ids go to the flat tensor's last slot."""
        flat = self._count_flat()
        key = ("count", tables, tuple(keys), values.device)
        cache = self.__dict__.setdefault("_count_cache", {})
        if key not in cache:
            layout, trash = self._count_layout(), self._count_size - 1
            rows = []
            for f in keys:
                t = self._feature_table[f]
                if t.name in tables:
                    rows.append((1, layout[t.name] + self._schemes[t.name].count_offset(t.feature_names.index(f))))
                else:
                    rows.append((0, trash))
            cache[key] = torch.tensor(rows, dtype=torch.int64, device=values.device).t().contiguous()  # [2, F]
        scale, shift = torch.repeat_interleave(cache[key], counts, dim=1, output_size=values.numel()).to(flat.device)
        at = values.to(flat.device, torch.int64) * scale + shift
        group = self._sync_group()
        if world(group) == 1:  # index_add sums the duplicates itself: no unique (a sort)
            flat.index_add_(0, at, torch.ones_like(at, dtype=flat.dtype))
        else:
            ids, n = all_gather_id_counts(at, group)
            flat.index_add_(0, ids, n.to(flat.dtype))

    def combine(self, state: "SplitState", pooled_out: Optional[KeyedTensor], per_id_out: Optional[KeyedTensor],
                weighted_out: Optional[KeyedTensor] = None) -> KeyedTensor:
        """Inner lookups (``pooled`` and ``weighted``: ``[B, d_p]`` per virtual feature;
        ``per_id``: ``[S, d_p]``, row i = the feature's i-th id) -> the logical ``KeyedTensor [B, sum(dims)]``."""
        for impl in self._schemes.values():  # once per forward, where the lookups are combined (pipelined too)
            impl.before_combine(self.training)
        plan, batch = state.plan, state.batch
        if plan.direct:
            values = pooled_out.values()
            if list(pooled_out.keys()) != plan.direct_keys:  # not expected (the inner EBCs keep their order): per key
                by_key = pooled_out.to_dict()
                values = torch.cat([by_key[k] for k in plan.direct_keys], dim=1)
            return KeyedTensor(keys=self._embedding_names, length_per_key=self._dims, values=values)  # the inner output is the output
        # each group's columns of the inner outputs: one split when the inner EBC kept the plan's
        # order (split's backward is one cat; a gather's or a slice's would zero-fill the whole width)
        blocks, single = {}, {}
        for kind, kt in (("pooled", pooled_out), ("per_id", per_id_out), ("weighted", weighted_out)):
            if kt is not None:
                blocks[kind], views = plan.blocks(kind, kt)
                single.update(views)
        outs: List[torch.Tensor] = []
        group_observers: List[Tuple[Group, tuple, int]] = []  # (batch, what its route kept, first column)
        for gi, (g, gs) in enumerate(zip(plan.groups, state.groups)):
            widths = [g.size * d for d in g.part_dims]
            if g.weighted:  # weighted bags of the first table's K lookups: their sum
                x = blocks["weighted"][gi] if blocks["weighted"] is not None else \
                    _select_columns(weighted_out.values(), plan.columns(("weighted", gi), weighted_out, g.inner_keys("weighted")))
                out = _sum_lookups(x, g.lookups, batch)  # [B, F_g * d]
                if g.pooling == PoolingType.MEAN:
                    out = (out.view(batch, g.size, g.dim) / gs[1].t().clamp(min=1).unsqueeze(2).to(out.dtype)).reshape(batch, -1)
                outs.append(out)
                continue
            if not g.per_value:
                x = blocks["pooled"][gi] if blocks["pooled"] is not None else \
                    _select_columns(pooled_out.values(), plan.columns(("pooled", gi), pooled_out, g.keys()))
                parts = [t.view(batch, g.size, d) for t, d in zip(_split(x, widths), g.part_dims)]  # views [B, F_g, d_p]
                out = g.scheme.combine(parts, None, g.stacked_parameters())  # [B, F_g, d]
                if gs is not None:  # a ragged scheme's MEAN: the inner tables summed
                    out = out / gs.t().clamp(min=1).unsqueeze(2).to(out.dtype)
                if gi in state.routed and g.scheme.observes_gradients and self.training and out.requires_grad:
                    group_observers.append((g, state.routed[gi], sum(o.shape[1] for o in outs)))
                outs.append(out.reshape(batch, g.size * g.dim))
                continue
            vals, lens, w, fidx, c = gs
            parts = self._per_id_rows(state, gi, per_id_out, blocks["per_id"])
            per = g.scheme.combine_group(g.tables, parts, vals, {**c, **g.table_parameters()})  # [n, d]
            outs.append(_pool_group(per, lens, w, g.pooling, batch))
        observers: List[Tuple[TableScheme, JaggedTensor, int, int]] = []  # (impl, jt, first column, width)
        for p in range(plan.single_start, len(plan.features)):
            f = plan.features[p]
            t = self._feature_table[f]
            impl = self._schemes[t.name]
            suffixes = impl.feature_suffixes()
            jt = state.jts[f]
            if impl.id_weighted:  # the first table's weighted bags: their sum
                k = impl.weighted_lookups()
                out = _sum_lookups(_cat([single[f"{f}{s}"] for s in suffixes[:k]], dim=1), k, batch)
                if t.pooling == PoolingType.MEAN:
                    out = out / jt.lengths().clamp(min=1).unsqueeze(1).to(out.dtype)
                outs.append(out)
                continue
            if not impl.per_value:
                out = impl.combine([single[f"{f}{s}"] for s in suffixes], jt.values())
                if impl.ragged and t.pooling == PoolingType.MEAN:
                    out = out / jt.lengths().clamp(min=1).unsqueeze(1).to(out.dtype)
                if impl.observes_gradients and self.training and out.requires_grad:
                    observers.append((impl, jt, sum(o.shape[1] for o in outs), out.shape[1]))
                outs.append(out)
                continue
            n = jt.values().numel()
            per = impl.combine([single[f"{f}{s}"][:n] for s in suffixes], jt.values())
            outs.append(_pool_group(per, jt.lengths().view(1, -1), jt.weights() if self._is_weighted else None, t.pooling, batch))
        values = _cat(outs, dim=1)
        if observers or group_observers:  # one hook for every observing table (FIITED: one pass over all its tables)
            values.register_hook(functools.partial(_observe, observers, group_observers, batch, self._sync_group()))
        reorder = plan.output_columns(values.device)
        if reorder is not None:  # a permutation of the columns: its backward is the inverse gather
            values = _PermuteColumns.apply(values, *reorder)
        return KeyedTensor(keys=self._embedding_names, length_per_key=self._dims, values=values)

    def _plan(self, keys: Tuple[str, ...]) -> Plan:
        """The :class:`Plan` of this input key order (cached)."""
        cache = self.__dict__.setdefault("_plans", {})
        if keys not in cache:
            cache[keys] = Plan(keys, self._feature_table, self._schemes, self._embedding_names)
        return cache[keys]

    def materialize(self) -> None:
        """Give every scheme state its initial value if ``DistributedModelParallel`` has just
        materialized it from meta: DMP fills meta buffers with zeros and calls
        ``reset_parameters`` only on modules with meta parameters, so a buffer-only state
        (Saec's map, FreqThreshold's padding) would stay zero. Runs once (first forward, fit_)."""
        if self._materialized or self.device.type == "meta":
            return
        for state in self.maps.values():
            state.materialize()
        self._materialized = True

    def tables(self, table_name: str) -> TableAccess:
        """What the scheme of ``table_name`` may do to its physical tables (sharded or not)."""
        return _Tables(self, table_name)

    def _inner_weight(self, physical: str) -> object:
        """``physical``'s weight in this rank's state: a tensor, or a ShardedTensor once sharded."""
        key = f"embedding_bags.{physical}.weight"
        for inner in self.inner_collections():
            state = inner.state_dict()
            if key in state:
                return state[key]
        raise KeyError(f"no physical table {physical!r}")

    def _sync_group(self) -> Optional[dist.ProcessGroup]:
        """The process group of the sharded inner tables (None when unsharded): what schemes
        that learn from the data sum their statistics over."""
        return inner_process_group(self.inner_collections()[0])

    @torch.no_grad()
    def _reset_rows(self, physical: str, rows: torch.Tensor, impl: TableScheme) -> None:
        """Reset ``rows`` of a physical table to the scheme's ``reset_values`` (default zeros)
        and zero their optimizer state (a reused row must not inherit its previous owner's
        Adagrad sum), in whatever shards this rank holds."""
        if not rows.numel():
            return
        cfg = next(c for c in [*self._pooled_cfgs, *self._per_id_cfgs, *self._weighted_cfgs] if c.name == physical)
        inner = self.pooled if cfg in self._pooled_cfgs else self.per_id if cfg in self._per_id_cfgs else self.weighted
        zero_rows_and_state_(inner, physical, rows, cfg.num_embeddings, impl.reset_values(physical, rows, cfg.embedding_dim))

    def _per_id_kjt(self, inner: "_InnerBatch") -> Optional[KeyedJaggedTensor]:
        """Every id a bag of one: ``[N_k]`` ids per virtual feature k, stride S = max_k N_k
        (features padded with empty bags: a KJT has one stride)."""
        if not inner.keys:
            return None
        device = inner.values[0].device
        stride = agree_stride(max(1, max(inner.counts)), self.per_id, device)
        n = torch.tensor(inner.counts, dtype=torch.int64).to(device, non_blocking=True)
        lengths = (torch.arange(stride, device=device).unsqueeze(0) < n.unsqueeze(1)).view(-1).to(torch.int64)
        return KeyedJaggedTensor(keys=inner.keys, values=_cat(inner.values), lengths=lengths, stride=stride,
                                 length_per_key=inner.counts)

    # ------------------------------------------------------------------ validation
    def _check_input(self, kjt: KeyedJaggedTensor) -> None:
        """Everything checkable on the host without reading the tensors (keys, devices, dtypes,
        sizes: ValueError); the values are :meth:`_check_values`'."""
        keys = list(kjt.keys())
        expected = set(self._embedding_names)
        missing = sorted(expected - set(keys))
        extra = sorted(set(keys) - expected)
        if missing or extra:
            raise ValueError(
                f"KJT keys do not match the tables: missing features {missing}, unknown features {extra}; "
                f"expected {self._embedding_names}"
            )
        values, lengths, weights = kjt.values(), kjt.lengths(), kjt.weights_or_none()
        for what, tensor in (("values", values), ("lengths", lengths), ("weights", weights)):
            if tensor is not None and self.device.type != "meta" and tensor.device != self.device:
                raise ValueError(f"KJT {what} are on {tensor.device}, but the embedding tables are on {self.device}")
        if values.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"KJT values must be int32 or int64 ids, got {values.dtype}")
        if not kjt.variable_stride_per_key():
            # torchrec cannot split such a KJT into features (a RuntimeError or IndexError in to_dict)
            if kjt.stride() == 0:
                raise ValueError(f"KJT has batch size 0 (no bags for features {keys})")
            if lengths.numel() != kjt.stride() * len(keys):
                raise ValueError(
                    f"KJT has {lengths.numel()} lengths for {len(keys)} features x batch size {kjt.stride()}"
                )
        if self._is_weighted and weights is None:
            raise ValueError("this collection is weighted (is_weighted=True) but the KJT has no weights")
        if weights is not None and weights.numel() != values.numel():
            raise ValueError(f"KJT has {weights.numel()} weights for {values.numel()} values")
        if self._is_weighted and weights.dtype != torch.float32:
            # the embedding-bag kernels take fp32 per-sample weights only (a RuntimeError inside them)
            raise ValueError(f"KJT weights must be float32, got {weights.dtype}")

    def _check_values(self, kjt: KeyedJaggedTensor, counts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[3]`` flags (a negative length; lengths not summing to the number of values; an id
        < 0 or >= num_embeddings where the scheme does not hash any id) of every feature at
        once: a fixed number of ops whatever the number of features, no host read (the
        caller reads them). Only when one is set does :meth:`_explain` run, per feature, to
        name table, feature and value. ``counts``: ``[F]`` ids per feature (the lengths' sums).

        Lengths that do not add up make the per-id limits impossible to lay out: on CPU
        ``repeat_interleave`` raises at once (explained here), on a GPU the flag says so."""
        values, lengths = kjt.values(), kjt.lengths()
        keys = list(kjt.keys())
        if counts is None:
            counts = lengths.view(len(keys), -1).sum(dim=1)
        try:  # [N] each id's num_embeddings
            limit = torch.repeat_interleave(self._limits(keys, values.device), counts.clamp(min=0), output_size=values.numel())
        except RuntimeError:
            self._explain(kjt)
            raise
        return torch.stack([(lengths < 0).any(), counts.sum() != values.numel(), ((values < 0) | (values >= limit)).any()])

    def _limits(self, keys: List[str], device: torch.device) -> torch.Tensor:
        """``[F]`` the smallest invalid id of each feature, in KJT key order (int64 max: any id is valid)."""
        cache = self.__dict__.setdefault("_limits_cache", {})
        key = (tuple(keys), device)
        if key not in cache:
            big = torch.iinfo(torch.int64).max
            cache[key] = torch.tensor([big if self._schemes[self._feature_table[f].name].accepts_any_id
                                       else self._feature_table[f].num_embeddings for f in keys], dtype=torch.int64, device=device)
        return cache[key]

    def _explain(self, kjt: KeyedJaggedTensor) -> None:
        """The per-feature checks, raising the ValueError that names what is wrong."""
        values, lengths = kjt.values(), kjt.lengths()
        if lengths.numel() and int(lengths.min()) < 0:
            raise ValueError(f"KJT has negative lengths: {lengths.min().item()}")
        total = int(lengths.sum()) if lengths.numel() else 0
        if total != values.numel():
            raise ValueError(f"KJT lengths sum to {total} but there are {values.numel()} values")
        for f, jt in kjt.to_dict().items():
            v = jt.values()
            if v.numel() == 0:
                continue
            t = self._feature_table[f]
            lo, hi = int(v.min()), int(v.max())
            if lo < 0:
                raise ValueError(f"table {t.name!r}, feature {f!r}: negative id {lo}")
            if hi >= t.num_embeddings and not self._schemes[t.name].accepts_any_id:
                raise ValueError(
                    f"table {t.name!r}, feature {f!r}: id {hi} >= num_embeddings={t.num_embeddings} "
                    f"(scheme {self._schemes[t.name].name})"
                )

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def for_inference(self) -> "CompressedEmbeddingBagCollection":
        """This module with every scheme in its deployed layout (``TableScheme.inference``:
        MPE's precision groups as one table per precision, Saec without its warm-up table);
        itself when no scheme changes. A data-driven scheme that never finished its procedure
        is deployed as it is (e.g. MPE's fp32 table), with a warning naming the table."""
        self.materialize()
        swaps = {}
        for t in self._tables:
            impl = self._schemes[t.name]
            if impl.data_driven and not impl.fitted():  # deployed as it is, and said so
                warnings.warn(unfitted_message(t.name, impl), stacklevel=2)
                continue
            out = impl.inference(self.tables(t.name))
            if out is not None:
                swaps[t.name] = out
        if not swaps:
            return self
        schemes = {t.name: self._schemes[t.name].config for t in self._tables if self._schemes[t.name].config is not None}
        schemes.update({name: cfg for name, (cfg, _, _) in swaps.items()})
        new = CompressedEmbeddingBagCollection(replace_configs(self._tables), schemes, is_weighted=self._is_weighted,
                                               device=self.device, validate=self._validate)
        mine = new.state_dict()
        new.load_state_dict({k: v for k, v in self.state_dict().items() if k in mine and mine[k].shape == v.shape}, strict=False)
        for name, (_, weights, buffers) in swaps.items():
            access = new.tables(name)
            for suffix, w in weights.items():
                access.write(suffix, w)
            for b, value in buffers.items():
                getattr(new.maps[name], b).copy_(value)
        new._materialized = True
        return new.train(self.training)

    # ------------------------------------------------------------------ memory
    def memory_report(self) -> MemoryReport:
        """Bytes of every physical table and map per logical table (logical, unsharded sizes)."""
        self.materialize()
        tables: Dict[str, TableMemory] = {}
        for t in self._tables:
            impl = self._schemes[t.name]
            parts = impl.memory_parts()
            tables[t.name] = TableMemory(
                scheme=impl.name,
                compressed_bytes=sum(parts.values()),
                uncompressed_bytes=t.num_embeddings * t.embedding_dim * 4,
                parts=parts,
                training_bytes=impl.training_bytes(),
                paper_bytes=impl.paper_bytes(),
            )
        return MemoryReport(tables)


class SchemeState(nn.Module):
    """A scheme's maps (buffers) and small parameters, registered under ``maps.<table>`` (a
    table in a :class:`FlatParameters` family: its parameters are frozen views of its row
    there; the forward reads :meth:`trainable`)."""

    def __init__(self, impl: TableScheme, device: Optional[torch.device]) -> None:
        super().__init__()
        self._impl = [impl]  # a list: not a submodule
        impl.buffers = self  # the scheme reads and writes its state here
        host = set(impl.host_buffers)
        for name, tensor in impl.initial_buffers().items():
            # the procedure's 0-dim counters stay in host memory (read every step: no device sync)
            self.register_buffer(name, tensor if name in host or device is None else tensor.to(device))
        for name, tensor in impl.initial_parameters().items():
            self.register_parameter(name, nn.Parameter(tensor.to(device) if device is not None else tensor))
        # True once the state holds real values: DMP's zero fill of meta buffers makes it False
        self.register_buffer("ready", torch.ones((), dtype=torch.int8, device=device))
        self.register_state_dict_pre_hook(_flush_steps)
        self._register_load_state_dict_pre_hook(_load_buffers, with_module=True)
        self.register_load_state_dict_post_hook(_schedule_reloaded)
        self._family: Optional[Tuple["FlatParameters", int]] = None

    def trainable(self, name: str) -> torch.Tensor:
        """The small parameter ``name`` as the forward must read it: row t of its family's flat
        parameter (the gradient goes there), else the table's own."""
        if self._family is not None:
            flat, i = self._family
            return flat.rows(name)[i]
        return getattr(self, name)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        """``.to()``, ``.cuda()``, ``to_empty()``, DMP's placement: everything but the host counters."""
        host = {n: self._buffers[n] for n in self._impl[0].host_buffers if n in self._buffers}
        out = super()._apply(fn, recurse)
        self._buffers.update(host)
        return out

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """DMP calls this after materializing meta parameters; it has just filled the meta
        buffers with zeros, which is not every scheme's initial state (e.g. MPE's bit widths)."""
        impl = self._impl[0]
        for name, tensor in [*impl.initial_parameters().items(), *impl.initial_buffers().items()]:
            getattr(self, name).copy_(tensor)
        self.ready.fill_(1)

    @torch.no_grad()
    def materialize(self) -> None:
        """Initial values for a state DMP zero-filled without calling ``reset_parameters``."""
        if not bool(self.ready):
            self.reset_parameters()


class FlatParameters(nn.Module):
    """One ``[T, ...]`` parameter per name for T tables whose schemes batch together (MPE's
    logits, LSQ+ steps and offsets; MixedDim's projections): the forward, the optimizer and
    DDP see it alone. Each table's own parameter stays in its ``SchemeState`` (the state_dict,
    DCP and ``load_state_dict`` see those, names unchanged) as a frozen view of row t, so
    writing one writes the other; it holds the values when the link breaks (``.to()``, DMP's
    materialization, deepcopy) and :meth:`link` restores it. Not in the state_dict itself."""

    def __init__(self, states: List["SchemeState"]) -> None:
        super().__init__()
        self._states = list(states)  # a list: not submodules (they live under ``maps``)
        for name in list(states[0]._impl[0].batch_parameters()):
            own = [st._parameters[name] for st in states]
            self.register_parameter(name, nn.Parameter(torch.stack([p.detach() for p in own]).clone()))
            for p in own:
                p.requires_grad_(False)
        for i, st in enumerate(states):
            st._family = (self, i)
        self._register_state_dict_hook(_drop_own_keys)

    @staticmethod
    def fits(states: List["SchemeState"]) -> bool:
        names = list(states[0]._impl[0].batch_parameters())
        return len(states) > 1 and all(
            n in st._parameters and st._parameters[n].shape == states[0]._parameters[n].shape
            and st._parameters[n].dtype == states[0]._parameters[n].dtype for st in states for n in names)

    @torch.no_grad()
    def link(self, name: Optional[str] = None) -> None:
        """Make every table's parameter ``name`` (all names if None) row t of the flat one again
        where it is not (cheap: a pointer compare per table when linked)."""
        for n in (self._parameters if name is None else [name]):
            flat = self._parameters[n]
            own = [st._parameters[n] for st in self._states]
            if flat.is_meta or any(p.is_meta for p in own):
                continue
            step = flat[0].numel() * flat.element_size()
            if all(p.device == flat.device and p.data_ptr() == flat.data_ptr() + i * step for i, p in enumerate(own)):
                continue
            flat.copy_(torch.stack([p.detach().to(flat.device) for p in own]))
            for i, p in enumerate(own):
                p.data = flat.data[i]

    def rows(self, name: str) -> torch.Tensor:
        """``[T, ...]``: the parameter itself (what the forward reads)."""
        self.link(name)
        return self._parameters[name]

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        """Nothing of its own to load: the tables' parameters carry the values."""

    def reset_parameters(self) -> None:
        """DMP's materialization: :meth:`link` copies the tables' (re-initialized) values."""


def _moved_to_weighted(module: "CompressedEmbeddingBagCollection", state_dict: Dict[str, torch.Tensor], prefix: str,
                       *args: object) -> None:
    """A state dict saved before the id-weighted tables moved (MEmCom's ``__shared``, Mem-Rec's
    ``__tok`` were per-id tables until 2026-12-04): their ``per_id.`` entries load as ``weighted.``."""
    for cfg in module._weighted_cfgs:
        old, new = f"{prefix}per_id.embedding_bags.{cfg.name}.weight", f"{prefix}weighted.embedding_bags.{cfg.name}.weight"
        if old in state_dict and new not in state_dict:
            state_dict[new] = state_dict.pop(old)


def _drop_own_keys(module: FlatParameters, state_dict: Dict[str, torch.Tensor], prefix: str, local_metadata: object) -> None:
    for name in module._parameters:
        state_dict.pop(prefix + name, None)


def _flush_steps(module: "SchemeState", prefix: str, keep_vars: bool) -> None:
    """Before a state_dict: the steps a finished schedule counted on the host go into its buffer."""
    flush = getattr(module._impl[0], "flush_steps", None)
    if flush is not None:
        flush()


def _load_buffers(module: "SchemeState", state_dict: Dict[str, torch.Tensor], prefix: str, *args: object) -> None:
    """Before load_state_dict copies a :class:`SchemeState`'s buffers: the scheme's
    :meth:`~TableScheme.load_buffer` of each (e.g. FIITED moves keys to its family layout)."""
    saved = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
    impl = module._impl[0]
    for name in module._buffers:
        if prefix + name in state_dict:
            state_dict[prefix + name] = impl.load_buffer(name, state_dict[prefix + name], saved)


def _schedule_reloaded(module: "SchemeState", incompatible_keys: object) -> None:
    """After load_state_dict: the schedule re-reads its buffers (it may be mid-phase again)."""
    impl = module._impl[0]
    if hasattr(impl, "_pending"):  # steps counted on the host: the loaded buffer has its own
        impl._pending = 0
    if hasattr(impl, "_done"):
        impl._done, impl._fitted = False, False


def scheme_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The schemes' own small trainable tensors (e.g. MPE's precision logits) in ``model``
    (sharded or not): what training gives its own learning rate."""
    return [p for m in model.modules() if isinstance(m, (SchemeState, FlatParameters)) for p in m.parameters() if p.requires_grad]


def elementwise_tables(model: nn.Module) -> List[str]:
    """Physical tables of packed per-id scalars (``PhysicalTable.elementwise_optimizer``)
    in every compressed module of ``model``: they need an element-wise optimizer state."""
    return [n for m in model.modules() if isinstance(m, CompressedEmbeddingBagCollection) for n in m._elementwise]


def scheme_lr_scales(model: nn.Module) -> Dict[int, float]:
    """``id(parameter)`` -> its scheme's ``parameter_lr_scale`` (x the dense learning rate)."""
    out = {id(p): m._impl[0].parameter_lr_scale for m in model.modules() if isinstance(m, SchemeState) for p in m.parameters()}
    out.update({id(p): m._states[0]._impl[0].parameter_lr_scale for m in model.modules() if isinstance(m, FlatParameters)
                for p in m.parameters()})
    return out


class _Tables:
    """:class:`~torchrec_compress.schemes.base.TableAccess` of one logical table's physical tables."""

    def __init__(self, module: CompressedEmbeddingBagCollection, table_name: str) -> None:
        self._m, self._name = module, table_name
        self.group = module._sync_group()

    def read(self, suffix: str) -> torch.Tensor:
        return full_tensor(self._m._inner_weight(self._name + suffix), self.group)

    def write(self, suffix: str, full: torch.Tensor) -> None:
        copy_full_into_(self._m._inner_weight(self._name + suffix), full)  # copy_ casts and moves


def unfitted_message(table: str, impl: TableScheme) -> str:
    return (f"table {table!r}: {impl.name} has not finished its procedure (it learns from the training data: "
            f"{impl.config!r}); its lookups are not what it will deploy. Train for more steps or call "
            f"torchrec_compress.fit_(model, batches) first")


def _observe(observers: List[Tuple[TableScheme, JaggedTensor, int, int]], group_observers: List[Tuple[Group, tuple, int]],
             batch: int, group: Optional[dist.ProcessGroup], grad: torch.Tensor) -> None:
    """Backward hook on the combined output ``grad [B, C]``: each routed batch's columns
    (``[B, F_g, d]``) in one ``observe_group``; each observing single's, tables of one
    :meth:`~TableScheme.observe_key` together (``[B, T, d]``) in one ``observe_batch``."""
    for g, (vals, lengths, w, c, routed), start in group_observers:
        g.scheme.observe_group(g.tables, grad.narrow(1, start, g.size * g.dim).view(batch, g.size, g.dim), vals, lengths, w, c,
                               g.pooling == PoolingType.MEAN, routed, group)
    by_key: Dict[Any, List[Tuple[TableScheme, JaggedTensor, int, int]]] = {}
    for o in observers:
        by_key.setdefault(o[0].observe_key(), []).append(o)
    for obs in by_key.values():
        impls, jts = [o[0] for o in obs], [o[1] for o in obs]
        width, start = obs[0][3], obs[0][2]
        if all(o[2] == start + i * width for i, o in enumerate(obs)):  # side by side: a view
            g = grad.narrow(1, start, width * len(obs))
        else:
            cols = torch.cat([torch.arange(o[2], o[2] + width) for o in obs]).to(grad.device)
            g = grad.index_select(1, cols)
        type(impls[0]).observe_batch(impls, g.reshape(grad.shape[0], len(obs), width), jts, group)


def _check_unique(names: List[str], what: str) -> None:
    seen = set()
    for n in names:
        if n in seen:
            raise ValueError(f"generated {what} name {n!r} collides with another; rename the table or feature")
        seen.add(n)


def replace_configs(tables: List[EmbeddingBagConfig]) -> List[EmbeddingBagConfig]:
    """Independent copies of ``tables`` (the module mutates feature_names defaults)."""
    return [dataclasses.replace(t, feature_names=list(t.feature_names)) for t in tables]


@dataclasses.dataclass
class SplitState:
    """What :meth:`CompressedEmbeddingBagCollection.combine` needs from :meth:`~CompressedEmbeddingBagCollection.split`."""

    plan: Plan
    batch: int
    counts: torch.Tensor  # [F] ids per feature, plan order
    jts: Dict[str, JaggedTensor] = dataclasses.field(default_factory=dict)  # the singles' features
    groups: List[Optional[tuple]] = dataclasses.field(default_factory=list)  # per-value groups: (ids, lengths, weights, feature index, constants)
    routed: Dict[int, tuple] = dataclasses.field(default_factory=dict)  # routed groups: (ids, lengths, weights, constants, route_batch's own)
    # whose id weights the weighted KJT's ids take, run by run: ("group", index) / ("single", feature)
    sources: List[Tuple[str, object]] = dataclasses.field(default_factory=list)

    def record_stream(self, stream: torch.Stream) -> None:
        """For TorchRec's pipeline: the tensors outlive the input stream's batch."""
        self.counts.record_stream(stream)
        for jt in self.jts.values():
            jt.record_stream(stream)
        for gs in [*self.groups, *self.routed.values()]:
            for t in (gs or ()):
                for x in (t.values() if isinstance(t, dict) else [t]):
                    if isinstance(x, torch.Tensor):
                        x.record_stream(stream)


class _InnerBatch:
    """The virtual features of one inner KJT as they are transformed."""

    def __init__(self, weighted: bool, deferred: bool = False) -> None:
        """``deferred``: the weights come after the per-id lookups (id-weighted schemes): the
        KJT carries position codes, ``sources`` whose id weights each run of ids takes."""
        self.weighted = weighted
        self.deferred = deferred
        self.sources: List[object] = []
        self.keys: List[str] = []
        self.values: List[torch.Tensor] = []
        self.lengths: List[torch.Tensor] = []
        self.weights: List[torch.Tensor] = []
        self.counts: List[int] = []
        self.known = True  # every key's id count is known on the host

    def add(self, keys: List[str], values: Union[torch.Tensor, List[torch.Tensor]],
            lengths: Union[None, torch.Tensor, List[torch.Tensor]],
            weights: Union[None, torch.Tensor, List[torch.Tensor]], counts: Optional[List[int]],
            source: Optional[Tuple[str, object]] = None) -> None:
        """``values`` / ``lengths`` / ``weights``: one tensor, or several laid end to end (no copy
        until the KJT's). ``source``: whose id weights (:attr:`SplitState.sources`) these ids
        take, in a deferred batch."""
        vals = values if isinstance(values, list) else [values]
        if self.deferred:
            self.sources += [source] * len(vals)
        self.keys += keys
        self.values += vals
        if lengths is not None:
            self.lengths += lengths if isinstance(lengths, list) else [lengths]
        if self.weighted:
            self.weights += weights if isinstance(weights, list) else [weights]
        if counts is None:
            self.known = False
        else:
            self.counts += counts

    def kjt(self, stride: int, rank: int = 0) -> Optional[KeyedJaggedTensor]:
        """The inner KJT; a deferred one's weights are ``rank``'s position codes (``distributed.positions``)."""
        if not self.keys:
            return None
        values = _cat(self.values)
        if self.deferred:
            weights: Optional[torch.Tensor] = encode_positions(values.numel(), rank, values.device)
        else:
            weights = _cat(self.weights) if self.weighted else None
        return KeyedJaggedTensor(keys=self.keys, values=values, lengths=_cat(self.lengths), weights=weights, stride=stride,
                                 length_per_key=self.counts if self.known else None)


class _PermuteColumns(torch.autograd.Function):
    """``[B, C]`` -> its blocks of ``width`` columns in the order ``perm``; backward: the inverse
    gather (index_select's own backward zero-fills the whole input and scatter-adds into it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor, width: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(inverse)
        ctx.width = width
        return _move_blocks(x, perm, width)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (inverse,) = ctx.saved_tensors
        return _move_blocks(grad, inverse, ctx.width), None, None, None


def _move_blocks(x: torch.Tensor, order: torch.Tensor, width: int) -> torch.Tensor:
    """Blocks of ``width`` columns of ``x [B, C]`` in ``order`` (whole rows of a block move at once)."""
    if width == 1:
        return x.index_select(1, order)
    b = x.shape[0]
    return x.reshape(b, -1, width).index_select(1, order).reshape(b, -1)


def _cat(tensors: List[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """``torch.cat``, without its op (a copy) for one tensor."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def _split(x: torch.Tensor, widths: List[int]) -> List[torch.Tensor]:
    return [x] if len(widths) == 1 else list(x.split(widths, dim=1))


def _sum_lookups(x: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """``[B, k * w]``, k lookups' outputs side by side (suffix-major) -> their sum ``[B, w]``."""
    return x if k == 1 else x.view(batch, k, -1).sum(dim=1)


def _select_columns(x: torch.Tensor, cols: Optional[torch.Tensor]) -> torch.Tensor:
    """``x[:, cols]``; None: all of them, in order (no copy)."""
    return x if cols is None else x.index_select(1, cols)


def _pool_group(per: torch.Tensor, lengths: torch.Tensor, weights: Optional[torch.Tensor], pooling: PoolingType,
                batch: int) -> torch.Tensor:
    """Per-id rows ``[n, d]`` of F_g features (their ``lengths [F_g, B]``) -> ``[B, F_g * d]``,
    each feature's bags side by side (SUM or MEAN; weighted: SUM w_i e_i)."""
    n_f = lengths.shape[0]
    if weights is not None:
        per = per * weights.unsqueeze(1).to(per.dtype)
    flat = lengths.reshape(-1)
    bag = torch.repeat_interleave(torch.arange(flat.numel(), device=per.device), flat.long(), output_size=per.shape[0])
    out = torch.zeros(flat.numel(), per.shape[1], dtype=per.dtype, device=per.device).index_add(0, bag, per)
    if pooling == PoolingType.MEAN:
        out = out / flat.clamp(min=1).unsqueeze(1).to(out.dtype)
    return out.view(n_f, batch, per.shape[1]).transpose(0, 1).reshape(batch, n_f * per.shape[1])
