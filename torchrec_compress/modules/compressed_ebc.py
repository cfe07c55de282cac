"""CompressedEmbeddingBagCollection: a drop-in for ``torchrec.EmbeddingBagCollection``.

Every scheme is a KJT transform, a standard inner TorchRec ``EmbeddingBagCollection``
over small physical tables, and a combine back to the logical features:

    KJT (logical features, raw ids)
      -> transform  (hash / quotient-remainder / ...; one virtual feature per physical table)
      -> inner EBCs  ``pooled`` (sum-compatible schemes) and ``per_id`` (bags of one id)
      -> combine    (sum / product / concat; ``per_id`` lookups are pooled here)
    KeyedTensor with the keys, dims and order of ``EmbeddingBagCollection(tables)``

The inner EBCs are ordinary children, so ``DistributedModelParallel`` shards them with
TorchRec's own sharders and planner (FBGEMM kernels, fused optimizers unchanged).
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from .. import schemes as _schemes  # noqa: F401  (fills the registry)
from ..config import SchemeConfig, scheme_class_for
from ..schemes.base import TableAccess, TableScheme, Uncompressed, bag_index, uniform_init
from ..distributed.state import agree_stride, copy_full_into_, full_tensor, inner_process_group, zero_rows_and_state_
from .memory import MemoryReport, TableMemory


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

        # feature -> (table, scheme); logical output order = table order, then feature order.
        self._feature_table: Dict[str, EmbeddingBagConfig] = {}
        for t in tables:
            for f in t.feature_names:
                if f in self._feature_table:
                    raise ValueError(f"feature {f!r} is used by tables {self._feature_table[f].name!r} and {t.name!r}")
                self._feature_table[f] = t
        self._embedding_names = [f for t in tables for f in t.feature_names]
        self._dims = [t.embedding_dim for t in tables for _ in t.feature_names]

        pooled_cfgs: List[EmbeddingBagConfig] = []
        per_id_cfgs: List[EmbeddingBagConfig] = []
        for t in tables:
            impl = self._schemes[t.name]
            for p in impl.physical_tables():
                cfg = EmbeddingBagConfig(
                    name=p.name(t.name),
                    num_embeddings=p.num_embeddings,
                    embedding_dim=p.embedding_dim,
                    feature_names=[f"{f}{s}" for f in t.feature_names for s in p.feature_suffixes()],
                    data_type=t.data_type,
                    # per-id lookups are bags of one and ragged routes see part of a bag:
                    # the logical pooling is applied after combine
                    pooling=PoolingType.SUM if impl.per_value or impl.ragged else t.pooling,
                    init_fn=p.init_fn or uniform_init(t),
                )
                (per_id_cfgs if impl.per_value else pooled_cfgs).append(cfg)
        _check_unique([c.name for c in pooled_cfgs + per_id_cfgs], "physical table")
        _check_unique([f for c in pooled_cfgs + per_id_cfgs for f in c.feature_names], "physical feature")

        self._pooled_cfgs, self._per_id_cfgs = pooled_cfgs, per_id_cfgs
        self._elementwise = [p.name(t.name) for t in tables for p in self._schemes[t.name].physical_tables() if p.elementwise_optimizer]
        self.pooled: Optional[EmbeddingBagCollection] = (
            EmbeddingBagCollection(pooled_cfgs, is_weighted=is_weighted, device=device) if pooled_cfgs else None
        )
        self.per_id: Optional[EmbeddingBagCollection] = (
            EmbeddingBagCollection(per_id_cfgs, is_weighted=False, device=device) if per_id_cfgs else None
        )
        # id maps of schemes that keep them (FreqThreshold, Saec): plain buffers, replicated
        self.maps = nn.ModuleDict()
        for t in tables:
            impl = self._schemes[t.name]
            if impl.initial_buffers() or impl.initial_parameters():
                self.maps[t.name] = SchemeState(impl, device)
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

    @property
    def device(self) -> torch.device:
        return self._device_probe.device

    def scheme(self, table_name: str) -> TableScheme:
        return self._schemes[table_name]

    def scheme_states(self) -> Dict[str, "SchemeState"]:
        """Table -> the module holding its scheme's buffers and small parameters (tables whose
        scheme keeps any state)."""
        return dict(self.maps.items())

    # ------------------------------------------------------------------ forward
    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """``features``: KJT over the logical feature names, B bags each -> ``KeyedTensor [B, sum(dims)]``."""
        jts, pooled_kjt, per_id_kjt = self.split(features)
        pooled_out = self.pooled(pooled_kjt).to_dict() if pooled_kjt is not None else {}
        per_id_out = self.per_id(per_id_kjt).to_dict() if per_id_kjt is not None else {}
        return self.combine(jts, features.stride(), pooled_out, per_id_out)

    def split(
        self, features: KeyedJaggedTensor
    ) -> Tuple[Dict[str, JaggedTensor], Optional[KeyedJaggedTensor], Optional[KeyedJaggedTensor]]:
        """Validate and transform: logical KJT -> (its features, the ``pooled`` inner KJT,
        the ``per_id`` inner KJT with every id a bag of one; None where unused)."""
        if self._validate:
            self._check_input(features)
        jts = features.to_dict()
        batch = features.stride()
        self.materialize()
        for t in self._tables:  # the schemes' own procedures (counting, clustering, search, re-planning)
            impl = self._schemes[t.name]
            if impl.step(self.training):
                for name, rows in impl.event(self.tables(t.name)).items():
                    self._reset_rows(name, rows, impl)
            if impl.sees_ids and self.training:
                impl.see_features([jts[f].values() for f in t.feature_names], self._sync_group())
            if not self.training and impl.data_driven and t.name not in self._warned and not impl.fitted():
                self._warned.add(t.name)
                warnings.warn(unfitted_message(t.name, impl), stacklevel=3)

        pooled_keys: List[str] = []
        pooled_vals: List[torch.Tensor] = []
        pooled_lens: List[torch.Tensor] = []
        pooled_wts: List[torch.Tensor] = []
        per_id_feats: List[Tuple[str, List[Tuple[str, torch.Tensor]]]] = []
        for f in self._embedding_names:
            impl = self._schemes[self._feature_table[f].name]
            jt = jts[f]
            suffixes = impl.feature_suffixes()
            if impl.per_value:
                ids = impl.transform(jt.values())
                per_id_feats.append((f, [(f"{f}{s}", i) for s, i in zip(suffixes, ids)]))
                continue
            for s, (i, lengths, weights) in zip(suffixes, impl.route(jt)):
                pooled_keys.append(f"{f}{s}")
                pooled_vals.append(i)
                pooled_lens.append(lengths)
                if self._is_weighted:
                    pooled_wts.append(weights)
        pooled_kjt = None
        if pooled_keys:
            pooled_kjt = KeyedJaggedTensor(
                keys=pooled_keys,
                values=torch.cat(pooled_vals),
                lengths=torch.cat(pooled_lens),
                weights=torch.cat(pooled_wts) if self._is_weighted else None,
                stride=batch,
            )
        return jts, pooled_kjt, self._per_id_kjt(per_id_feats)

    def combine(
        self, jts: Dict[str, JaggedTensor], batch: int, pooled_out: Dict[str, torch.Tensor], per_id_out: Dict[str, torch.Tensor]
    ) -> KeyedTensor:
        """Inner lookups (``[B, d_p]`` pooled, ``[S, d_p]`` per id) -> logical ``KeyedTensor``."""
        for impl in self._schemes.values():  # once per forward, where the lookups are combined (pipelined too)
            impl.before_combine(self.training)
        outs: List[torch.Tensor] = []
        for f in self._embedding_names:
            t = self._feature_table[f]
            impl = self._schemes[t.name]
            suffixes = impl.feature_suffixes()
            jt = jts[f]
            if not impl.per_value:
                out = impl.combine([pooled_out[f"{f}{s}"] for s in suffixes], jt.values())
                if impl.ragged and t.pooling == PoolingType.MEAN:
                    out = out / jt.lengths().clamp(min=1).unsqueeze(1).to(out.dtype)
                if impl.observes_gradients and self.training and out.requires_grad:
                    out.register_hook(functools.partial(_observe, impl, jt, self._sync_group()))
                outs.append(out)
                continue
            n = jt.values().numel()
            per = impl.combine([per_id_out[f"{f}{s}"][:n] for s in suffixes], jt.values())
            outs.append(_pool(per, jt, t.pooling, self._is_weighted, batch))
        return KeyedTensor(keys=self._embedding_names, length_per_key=self._dims, values=torch.cat(outs, dim=1))

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
        for inner in (self.pooled, self.per_id):
            if inner is not None:
                state = inner.state_dict()
                if key in state:
                    return state[key]
        raise KeyError(f"no physical table {physical!r}")

    def _sync_group(self) -> Optional[dist.ProcessGroup]:
        """The process group of the sharded inner tables (None when unsharded): what schemes
        that learn from the data sum their statistics over."""
        return inner_process_group(self.pooled if self.pooled is not None else self.per_id)

    @torch.no_grad()
    def _reset_rows(self, physical: str, rows: torch.Tensor, impl: TableScheme) -> None:
        """Reset ``rows`` of a physical table to the scheme's ``reset_values`` (default zeros)
        and zero their optimizer state (a reused row must not inherit its previous owner's
        Adagrad sum), in whatever shards this rank holds."""
        if not rows.numel():
            return
        cfg = next(c for c in [*self._pooled_cfgs, *self._per_id_cfgs] if c.name == physical)
        inner = self.pooled if cfg in self._pooled_cfgs else self.per_id
        zero_rows_and_state_(inner, physical, rows, cfg.num_embeddings, impl.reset_values(physical, rows, cfg.embedding_dim))

    def _per_id_kjt(self, feats: List[Tuple[str, List[Tuple[str, torch.Tensor]]]]) -> Optional[KeyedJaggedTensor]:
        """Every id a bag of one: ``[N_f]`` ids per virtual feature, stride S = max_f N_f
        (features padded with empty bags: a KJT has one stride)."""
        if not feats:
            return None
        keys: List[str] = []
        vals: List[torch.Tensor] = []
        counts: List[int] = []
        for _, parts in feats:
            for k, ids in parts:
                keys.append(k)
                vals.append(ids)
                counts.append(ids.numel())
        device = vals[0].device
        stride = agree_stride(max(1, max(counts)), self.per_id, device)
        lengths = torch.cat([_ones_then_zeros(n, stride, device) for n in counts])
        return KeyedJaggedTensor(keys=keys, values=torch.cat(vals), lengths=lengths, stride=stride)

    # ------------------------------------------------------------------ validation
    def _check_input(self, kjt: KeyedJaggedTensor) -> None:
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
        self._check_values(kjt)

    def _check_values(self, kjt: KeyedJaggedTensor) -> None:
        """Lengths (none negative, summing to the number of values) and ids (0 <= id <
        num_embeddings unless the scheme hashes any id) of every feature at once: a fixed
        number of ops whatever the number of features, and one host read. Only when it
        finds something does the per-feature path run, to name table, feature and value."""
        values, lengths = kjt.values(), kjt.lengths()
        keys = list(kjt.keys())
        if kjt.variable_stride_per_key() or not lengths.numel():
            return self._explain(kjt)
        n_keys = len(keys)
        per_key = lengths.view(n_keys, -1).clamp(min=0).sum(dim=1)  # [F] values of each feature
        feature = torch.searchsorted(per_key.cumsum(0), torch.arange(values.numel(), device=values.device), right=True)
        v = values.long()
        limit = self._limits(keys, values.device)[feature.clamp(max=n_keys - 1)]  # [N] each value's num_embeddings
        bad = torch.stack([(lengths < 0).any(), lengths.sum() != values.numel(), ((v < 0) | (v >= limit)).any()])
        if bool(bad.any()):
            self._explain(kjt)

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
    """A scheme's maps (buffers) and small parameters, registered under ``maps.<table>``."""

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


def scheme_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The schemes' own small trainable tensors (e.g. MPE's precision logits) in ``model``
    (sharded or not): what training gives its own learning rate."""
    return [p for m in model.modules() if isinstance(m, SchemeState) for p in m.parameters()]


def elementwise_tables(model: nn.Module) -> List[str]:
    """Physical tables of packed per-id scalars (``PhysicalTable.elementwise_optimizer``)
    in every compressed module of ``model``: they need an element-wise optimizer state."""
    return [n for m in model.modules() if isinstance(m, CompressedEmbeddingBagCollection) for n in m._elementwise]


def scheme_lr_scales(model: nn.Module) -> Dict[int, float]:
    """``id(parameter)`` -> its scheme's ``parameter_lr_scale`` (x the dense learning rate)."""
    return {id(p): m._impl[0].parameter_lr_scale for m in model.modules() if isinstance(m, SchemeState) for p in m.parameters()}


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


def _observe(impl: TableScheme, jt: JaggedTensor, group: Optional[dist.ProcessGroup], grad: torch.Tensor) -> None:
    impl.observe(grad, jt, group)


def _ones_then_zeros(n: int, stride: int, device: torch.device) -> torch.Tensor:
    out = torch.zeros(stride, dtype=torch.int64, device=device)
    out[:n] = 1
    return out


def _pool(per: torch.Tensor, jt: JaggedTensor, pooling: PoolingType, weighted: bool, batch: int) -> torch.Tensor:
    """Pool per-id rows ``[N, d]`` into ``[B, d]`` bags (SUM or MEAN; weighted: SUM w_i e_i)."""
    lengths = jt.lengths()
    if weighted:
        per = per * jt.weights().unsqueeze(1).to(per.dtype)
    bag = bag_index(lengths)
    out = torch.zeros(batch, per.shape[1], dtype=per.dtype, device=per.device).index_add(0, bag, per)
    if pooling == PoolingType.MEAN:
        out = out / lengths.clamp(min=1).unsqueeze(1).to(out.dtype)
    return out


def _check_unique(names: List[str], what: str) -> None:
    seen = set()
    for n in names:
        if n in seen:
            raise ValueError(f"generated {what} name {n!r} collides with another; rename the table or feature")
        seen.add(n)


def replace_configs(tables: List[EmbeddingBagConfig]) -> List[EmbeddingBagConfig]:
    """Independent copies of ``tables`` (the module mutates feature_names defaults)."""
    return [dataclasses.replace(t, feature_names=list(t.feature_names)) for t in tables]
