"""What every scheme implements: physical tables, the id transform and the combine.

A :class:`TableScheme` is built once per *logical* table (an ``EmbeddingBagConfig``)
and describes how that table is stored in ordinary physical ``EmbeddingBagConfig``
tables of a standard inner TorchRec ``EmbeddingBagCollection``:

* ``physical_tables()``: the physical tables (name suffix, rows, dim, init).
* ``transform(values)``: logical ids ``[N]`` -> one id tensor ``[N]`` per physical table.
* ``combine(parts, values)``: physical lookups -> logical embeddings.

Pooled schemes (``per_value = False``) combine *pooled* bags ``[B, d_p] -> [B, d]``;
this is exact only for sums and concatenations. Schemes with a per-id product
(QR-mult, MEmCom) set ``per_value = True``: the inner EBC then looks up every id as a
bag of one (``[N, d_p]``), ``combine`` runs per id, and the module pools afterwards,
so gradients reach every physical table under any TorchRec sharding type.

A per-id *scalar* times a pooled-compatible lookup (MEmCom's w[x] * E[h(x)], Mem-Rec's
alpha(x) * SUM_k T[h_k(x)]) needs no per-id rows of the big table: such schemes set
``id_weighted = True``; their first physical table is looked up in the ``pooled`` EBC with
real bags, every id weighted by :meth:`TableScheme.id_weight` of the other tables' per-id
lookups (FBGEMM's weighted TBE: the output is ``[B, d]``, and FBGEMM gives the weights'
gradient).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Hashable, List, Optional, Protocol, Sequence, Tuple, Union

import torch
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import JaggedTensor

from ..config import SchemeConfig

_BYTES_PER_ELEMENT = {DataType.FP32: 4, DataType.FP16: 2, DataType.BF16: 2}

# a scheme's constants: ints for one table, or [N] int64 tensors (each id its own table's)
Constants = Dict[str, Union[int, torch.Tensor]]
# (ids, lengths, weights) of a feature's virtual features laid end to end: each one tensor or a list
Routed = Tuple[Union[torch.Tensor, List[torch.Tensor]], Union[torch.Tensor, List[torch.Tensor]],
               Union[None, torch.Tensor, List[torch.Tensor]]]


@dataclass(frozen=True)
class PhysicalTable:
    """One physical table of a scheme. ``suffix`` is appended to the logical table name."""

    suffix: str
    num_embeddings: int
    embedding_dim: int
    init_fn: Optional[Callable[[torch.Tensor], Optional[torch.Tensor]]] = None
    role: str = "table"
    export_dtype: Optional[str] = None  # dtype quant.export gives this table unless told otherwise
    lookups: int = 1  # ids per logical id read from this table (e.g. Mem-Rec's K hashes)
    # packed per-id scalars (several ids per physical row): under row-wise Adagrad the ids of a
    # row would share one state; such tables train with element-wise Adagrad (FBGEMM EXACT_ADAGRAD)
    elementwise_optimizer: bool = False

    def name(self, logical: str) -> str:
        return f"{logical}{self.suffix}"

    def feature_suffixes(self) -> List[str]:
        """Suffixes of the virtual features that read this table, one per lookup."""
        return [self.suffix] if self.lookups == 1 else [f"{self.suffix}{k}" for k in range(self.lookups)]


def uniform_init(table: EmbeddingBagConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """The logical table's own init range, so compressed embeddings start at the same scale."""
    return partial(torch.nn.init.uniform_, a=table.get_weight_init_min(), b=table.get_weight_init_max())


def uniform_draw(table: EmbeddingBagConfig, rows: int, dim: int, seed: int) -> torch.Tensor:
    """``[rows, dim]`` drawn like the table's init (uniform over its range), from ``seed``: the
    same on every rank (rows an event restarts: FIITED's fresh chunks, MPE's retraining)."""
    g = torch.Generator().manual_seed(seed % 2**63)
    lo, hi = table.get_weight_init_min(), table.get_weight_init_max()
    return torch.rand(rows, dim, generator=g) * (hi - lo) + lo


def constant_init(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return partial(torch.nn.init.constant_, val=value)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def bag_index(lengths: torch.Tensor, n: Optional[int] = None) -> torch.Tensor:
    """``[B]`` bag lengths -> ``[N]`` the bag of every value (0, 0, 1, 2, 2, ...); ``n`` = N when
    the caller knows it (no host read of ``lengths.sum()``)."""
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths.long(), output_size=n)


def ragged_parts(jt: JaggedTensor, rows: torch.Tensor, masks: List[torch.Tensor]) -> Routed:
    """For ragged schemes' :meth:`TableScheme.route`: the K physical parts' ``rows [N]`` (or
    ``rows[:, k]`` when 2-D) of the ids selected by ``masks[k] [N]``, laid end to end part by
    part, with their ``[K * B]`` per-bag counts (part-major) and weights. One ``index_add_`` of
    the masks for the counts, one masked select: no host read (the parts' sizes stay on the
    device; the inner KJT learns them when it needs them, once for all features)."""
    lengths, weights = jt.lengths(), jt.weights_or_none()
    n, b, k = jt.values().numel(), lengths.numel(), len(masks)
    m = torch.stack(masks)  # [K, N]
    at = bag_index(lengths, n).unsqueeze(0) + (torch.arange(k, device=lengths.device) * b).unsqueeze(1)  # [K, N]
    counts = torch.zeros(k * b, dtype=lengths.dtype, device=lengths.device).index_add_(
        0, at.reshape(-1), m.reshape(-1).to(lengths.dtype))
    per_part = (rows.t() if rows.dim() == 2 else rows.unsqueeze(0).expand(k, n))[m]  # part-major
    ws = weights.unsqueeze(0).expand(k, n)[m] if weights is not None else None
    return per_part, counts, ws


def round_dim_ok(dim: int) -> bool:
    """FBGEMM's CPU training kernels need dims that are multiples of 4."""
    return dim > 0 and dim % 4 == 0


class TableAccess(Protocol):
    """What a scheme's procedure may do to its own physical tables, sharded or not (given
    to :meth:`TableScheme.event`, :meth:`TableScheme.fit` and :meth:`TableScheme.inference`
    by the module). ``suffix`` names the physical table (``PhysicalTable.suffix``)."""

    group: Optional["torch.distributed.ProcessGroup"]  # ranks that share the scheme's decisions (None: one process)

    def read(self, suffix: str) -> torch.Tensor:
        """The whole ``[rows, dim]`` table, the same on every rank (gathered when sharded)."""

    def write(self, suffix: str, full: torch.Tensor) -> None:
        """Overwrite the table with ``full [rows, dim]`` (each rank writes the shards it holds)."""


class TableScheme:
    """Base class; subclasses are registered with ``@register_scheme(Config)``.

    Class attributes a scheme declares next to itself (the registry reads them):
    ``preset`` (``(ratio, dim) -> config`` used by ``bench quality``/``bench speed``/the demo)
    and ``reference`` (the plain-torch reference of its paper's equations, see
    ``torchrec_compress.testing.reference``)."""

    per_value: bool = False
    # True: physical_tables()[0] is read in pooled bags, each id weighted by id_weight() of the
    # other tables' per-id lookups (a scalar per id times a sum of rows of the first table)
    id_weighted: bool = False
    accepts_any_id: bool = False  # True: ids >= num_embeddings are valid (hashed by design)
    ragged: bool = False  # True: route() sends each id to a subset of the physical tables
    observes_gradients: bool = False  # True: observe(grad, jt, group) sees the gradient of the table's output
    sees_ids: bool = False  # True: see(values, group) gets every training batch's ids before the lookup
    identity_combine: bool = False  # True: combine(parts) is parts[0] (one physical lookup, no product or sum)
    identity_transform: bool = False  # True: transform(values) is [values] (the ids read their own rows)
    counts_per_feature: bool = False  # True: fit() takes counts [F, v], one row per feature, not their sum [v]
    data_driven: bool = False  # True: its procedure learns from the data (counts, warm-up, search); see fitted()
    training_buffers: Tuple[str, ...] = ()  # buffers only training needs (e.g. id counts): not in the deployed bytes
    host_buffers: Tuple[str, ...] = ()  # 0-dim counters read on the host each step: kept in host memory on any device
    parameter_lr_scale: float = 1.0  # learning rate of initial_parameters(), in units of the dense one

    def __init__(self, table: EmbeddingBagConfig, config: Optional[SchemeConfig]) -> None:
        self.table = table
        self.config = config
        if table.num_embeddings <= 0:
            raise ValueError(f"table {table.name!r}: num_embeddings must be > 0, got {table.num_embeddings}")
        if not round_dim_ok(table.embedding_dim):
            raise ValueError(
                f"table {table.name!r}: embedding_dim={table.embedding_dim} is not allowed; "
                "FBGEMM kernels need a positive multiple of 4"
            )

    # --- host counters (``host_buffers``): read once per change, not once per step ---------
    def _host_int(self, name: str) -> int:
        """A 0-dim counter buffer's value, read once per change: the buffer's version (bumped
        by every in-place write: the scheme's own, load_state_dict, DCP's load) says when."""
        b = getattr(self.buffers, name)
        key = (id(b), b._version)
        memo = self.__dict__.setdefault("_memo", {}).get(name)
        if memo is None or memo[0] != key:
            memo = (key, int(b))
            self._memo[name] = memo
        return memo[1]

    def _set_host(self, name: str, value: int) -> None:
        """Write a counter buffer and remember what it holds now (no read back)."""
        b = getattr(self.buffers, name)
        b.fill_(value)
        self.__dict__.setdefault("_memo", {})[name] = ((id(b), b._version), int(value))

    # --- the three steps -------------------------------------------------------------
    def physical_tables(self) -> List[PhysicalTable]:
        raise NotImplementedError

    def transform(self, values: torch.Tensor, c: Optional[Constants] = None) -> List[torch.Tensor]:
        """``[N]`` logical ids -> one ``[N]`` id tensor per entry of :meth:`feature_suffixes`.
        ``c``: the :meth:`constants` (default: this table's; in a batch, ``[N]`` tensors)."""
        raise NotImplementedError

    # --- batching: the features of every table whose scheme returns the same batch_key() go
    # through ONE transform and ONE combine (a fixed number of ops whatever their number) ---
    def batch_key(self) -> Optional[Hashable]:
        """Equal keys: :meth:`transform` and :meth:`combine` of one of the tables, given the
        per-id :meth:`constants` of each id's own table, compute every table's (so the key
        holds whatever else they depend on, e.g. the dims). None: the table's features are
        transformed and combined one by one (procedures, per-table maps)."""
        return None

    def constants(self) -> Dict[str, int]:
        """What tables of one :meth:`batch_key` differ in (rows, hash functions), as ints."""
        return {}

    def batch_maps(self, index: int) -> Dict[str, torch.Tensor]:
        """1-D maps a batched :meth:`transform` reads (e.g. FreqThreshold's sorted ids), for this
        table at ``index`` in its group: the group lays each name's maps end to end, passes the
        whole in ``c[name]`` and each id's table's start in ``c[name + "_start"]``. Rebuilt only
        when one of :meth:`map_buffers` changes."""
        return {}

    def batch_parameters(self) -> Dict[str, torch.Tensor]:
        """Small trainable tensors a batched pooled :meth:`combine` reads (e.g. MixedDim's
        projection): the group stacks each name's over its features (``c[name] [F_g, ...]``,
        each feature its table's), one ``stack`` per name and forward."""
        return {}

    def combine_group(self, tables: List["TableScheme"], parts: List[torch.Tensor], values: torch.Tensor,
                      c: Constants) -> torch.Tensor:
        """A per-value batch's :meth:`combine` (``tables``: each of its tables' schemes once, in
        the order of ``c["_table"]``; ``c`` also holds their :meth:`batch_parameters` stacked
        ``[T, ...]``). Default: :meth:`combine`."""
        return self.combine(parts, values, c)

    def map_buffers(self) -> List[torch.Tensor]:
        """The buffers :meth:`batch_maps` are made from (their version says when to rebuild)."""
        return []

    @staticmethod
    def join_batch(impls: Sequence["TableScheme"]) -> None:
        """Called once by the module with the schemes of all its tables of one :meth:`batch_key`
        (module order), before their state is made: schemes that share state across a batch
        (FIITED's flat address structure) set it up here."""

    def route_batch(self, values: torch.Tensor, lengths: torch.Tensor, weights: Optional[torch.Tensor],
                    c: Constants) -> Optional[Tuple[Routed, object]]:
        """A ragged batch's inner ids, routed id by id (FIITED): ``values [N]`` of F features,
        ``lengths [F * B]``, the per-id ``c`` -> (:class:`Routed` part-major over the F x B bags,
        what :meth:`observe_group` reuses). None: the batch's :meth:`transform` serves."""
        return None

    def see_batch(self, values: torch.Tensor, c: Constants, group: Optional["torch.distributed.ProcessGroup"]) -> None:
        """:meth:`see` of a whole batch (``values [N]``, per-id ``c``), where :attr:`sees_ids`
        and :meth:`route_batch` is not None: the module calls it instead of each table's."""
        raise NotImplementedError

    @staticmethod
    def observe_group(impls: Sequence["TableScheme"], grad: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                      weights: Optional[torch.Tensor], c: Constants, mean: bool, routed: object,
                      group: Optional["torch.distributed.ProcessGroup"]) -> None:
        """Backward hook on a routed batch's outputs ``grad [B, F, d]`` (where :attr:`observes_gradients`)."""
        raise NotImplementedError

    def load_buffer(self, name: str, tensor: torch.Tensor, saved: Dict[str, torch.Tensor]) -> torch.Tensor:
        """A buffer as ``load_state_dict`` should copy it, given the loaded ``saved`` state (its
        names without prefix): where a stored layout depends on more than the table. Default: as saved."""
        return tensor

    def batch_active(self) -> Optional[List[bool]]:
        """For a ragged scheme in a batch: which of its virtual features get the ids now (a
        stage decides it for every id at once, read on the host, e.g. Saec: the warm-up table,
        then the centroids; the key holds the schedule so a group shares it). None: all."""
        return None

    def feature_suffixes(self) -> List[str]:
        return [s for p in self.physical_tables() for s in p.feature_suffixes()]

    def route(self, jt: JaggedTensor) -> Routed:
        """The pooled path's inner ids of this feature's K virtual features (:meth:`feature_suffixes`
        order), laid end to end: ``(ids, lengths, weights)``, each one tensor (part-major: part k's
        ids, then part k+1's; lengths ``[K * B]``) or a list of K. Default: every id goes to every
        physical table (:meth:`transform`); ragged schemes send each id to some (:func:`ragged_parts`)."""
        ids = self.transform(jt.values())
        w = jt.weights_or_none()
        return ids, [jt.lengths()] * len(ids), None if w is None else [w] * len(ids)

    def combine(self, parts: List[torch.Tensor], values: Optional[torch.Tensor], c: Optional[Constants] = None) -> torch.Tensor:
        """Lookups -> embeddings: pooled parts ``[B, d_p]`` -> ``[B, d]`` (in a batch ``[B, F_g, d_p]``
        -> ``[B, F_g, d]``, ``values`` None: combine along the last dim), or per id ``[N, d_p]``
        with the ids ``[N]`` and their :meth:`constants`."""
        raise NotImplementedError

    def weighted_lookups(self) -> int:
        """Where :attr:`id_weighted`: the lookups K of the first physical table (its first K
        :meth:`feature_suffixes` go to the weighted bags, the rest per id); else 0."""
        return self.physical_tables()[0].lookups if self.id_weighted else 0

    def id_weight(self, parts: List[torch.Tensor], values: torch.Tensor, c: Optional[Constants] = None) -> torch.Tensor:
        """Where :attr:`id_weighted`: the per-id lookups of the physical tables after the first
        (``[N, d_p]`` each, :meth:`feature_suffixes` order) -> ``[N]`` each id's scalar weight;
        ``c`` as for :meth:`transform`. The logical embedding is then
        ``id_weight(x) * SUM_k T_0[transform(x)[k]]`` over the first table's lookups."""
        raise NotImplementedError

    def before_combine(self, training: bool) -> None:
        """Called once per forward before the first :meth:`combine` (under
        ``TrainPipelineSparseDist`` the transform of the next batch may already have run)."""

    # --- schemes that change their storage while training (FIITED) -------------------
    def step(self, training: bool) -> bool:
        """Called once per forward before the transform; True: run :meth:`event` now."""
        return False

    def event(self, tables: TableAccess) -> Dict[str, torch.Tensor]:
        """The scheme's procedure at this step (fit, cluster, choose, re-plan): identical on
        every rank. Returns rows of physical tables (by name) to reset: their optimizer state
        is zeroed and their weights set to :meth:`reset_values`."""
        return {}

    def reset_values(self, physical: str, rows: torch.Tensor, dim: int) -> Optional[torch.Tensor]:
        """``[len(rows), dim]`` weights for rows an event resets (the same on every rank);
        None: zeros."""
        return None

    # --- data-driven schemes (the lifecycle) ---------------------------------------------
    def fitted(self) -> bool:
        """False while a data-driven scheme has not finished its procedure (its lookups are
        then not what it will deploy); the module warns when such a table is evaluated."""
        return True

    def fit(self, counts: torch.Tensor, tables: TableAccess, embeddings: Optional[torch.Tensor] = None) -> None:
        """Fit from id ``counts [v]`` (summed over the table's features; ``[F, v]``, one row per
        feature, where :attr:`counts_per_feature`; the same on every rank) given up front
        (``torchrec_compress.fit_``) instead of counted while training."""

    def status(self) -> Dict[str, object]:
        """Where the scheme's procedure stands (stage, kept ids or chunks), for run reports."""
        return {}

    def inference(self, tables: TableAccess) -> Optional[Tuple[SchemeConfig, Dict[str, torch.Tensor], Dict[str, torch.Tensor]]]:
        """What export deploys instead of the trained layout: ``(config, {suffix: [rows, d]
        weights}, {buffer: tensor})`` of the deployed scheme, or None (deployed as trained)."""
        return None

    def see(self, values: torch.Tensor, group: Optional["torch.distributed.ProcessGroup"]) -> None:
        """Called once per training forward (after :meth:`step`, before the transform) with
        ``[N]`` ids of the table's features, when :attr:`sees_ids` (ids of every rank when sharded)."""

    def see_features(self, values: List[torch.Tensor], group: Optional["torch.distributed.ProcessGroup"]) -> None:
        """What the module calls when :attr:`sees_ids`: ``[N_f]`` ids of each of the table's
        features (``feature_names`` order). Default: :meth:`see` of them all, concatenated;
        a scheme that tells its fields apart (Saec) overrides this."""
        self.see(torch.cat(values), group)

    def observe(self, grad: torch.Tensor, jt: JaggedTensor, group: Optional["torch.distributed.ProcessGroup"]) -> None:
        """Backward hook on the pooled output ``grad [B, d]`` of feature ``jt`` (summed over ``group`` when sharded)."""

    def observe_key(self) -> Hashable:
        """Observing tables with the same key share one :meth:`observe_batch` (default: each its own)."""
        return id(self)

    @staticmethod
    def observe_batch(impls: Sequence["TableScheme"], grad: torch.Tensor, jts: Sequence[JaggedTensor],
                      group: Optional["torch.distributed.ProcessGroup"]) -> None:
        """Backward hook on T features' pooled outputs ``grad [B, T, d]`` (tables of one
        :meth:`observe_key`). Default: :meth:`observe` of each."""
        for t, (impl, jt) in enumerate(zip(impls, jts)):
            impl.observe(grad[:, t], jt, group)

    # --- state outside the tables (id maps) -------------------------------------------
    def initial_buffers(self) -> Dict[str, torch.Tensor]:
        """Maps the scheme keeps (name -> tensor of its final shape). The module registers
        them as buffers of the scheme's state module (``SchemeState``: they follow ``.to()``,
        ``state_dict`` and DMP); transforms read them as ``self.buffers.<name>``."""
        return {}

    def initial_parameters(self) -> Dict[str, torch.Tensor]:
        """Small trainable tensors the scheme keeps beside its tables (e.g. MPE's precision
        logits); replicated and trained data-parallel under DMP. Read as ``self.buffers.<name>``."""
        return {}

    def memory_parts(self) -> Dict[str, int]:
        """Stored bytes by part (physical tables and maps) for ``memory_report``."""
        width = _BYTES_PER_ELEMENT.get(self.table.data_type, 4)
        parts = {p.name(self.table.name): p.num_embeddings * p.embedding_dim * width for p in self.physical_tables()}
        if self.extra_bytes():
            parts[f"{self.table.name} (maps)"] = self.extra_bytes()
        return parts

    # --- memory accounting -----------------------------------------------------------
    def extra_bytes(self) -> int:
        """Bytes kept outside the physical tables (maps, per-id state, small parameters)."""
        kept = [t for n, t in self.initial_buffers().items() if n not in self.training_buffers]
        return sum(t.numel() * t.element_size() for t in kept + list(self.initial_parameters().values()))

    def training_bytes(self) -> int:
        """Bytes held only while training (id counts, warm-up tables): not deployed."""
        return sum(t.numel() * t.element_size() for n, t in self.initial_buffers().items() if n in self.training_buffers)

    def table_bytes(self) -> int:
        width = _BYTES_PER_ELEMENT.get(self.table.data_type, 4)
        return sum(p.num_embeddings * p.embedding_dim * width for p in self.physical_tables())

    def paper_bytes(self) -> Optional[int]:
        """The stored bytes as the scheme's paper counts them, where that leaves out state
        :meth:`memory_parts` counts (e.g. FIITED: its kept chunks only); None: the paper
        counts the same. Reported beside the honest count, never instead of it."""
        return None

    @property
    def name(self) -> str:
        return "none" if self.config is None else self.config.name

    def _target_bytes(self) -> Optional[float]:
        ratio = getattr(self.config, "ratio", None)
        if ratio is None:
            return None
        return self.table.num_embeddings * self.table.embedding_dim * 4 / ratio

    def _too_small(self, detail: str) -> ValueError:
        return ValueError(
            f"table {self.table.name!r} ({self.table.num_embeddings} x {self.table.embedding_dim}): "
            f"{self.config!r} cannot be reached: {detail}"
        )


class Uncompressed(TableScheme):
    """A table left as it is: one physical table with the logical name, rows and dim."""

    identity_combine = True
    identity_transform = True

    def physical_tables(self) -> List[PhysicalTable]:
        return [PhysicalTable("", self.table.num_embeddings, self.table.embedding_dim, self.table.init_fn)]

    def batch_key(self) -> Hashable:
        return ("none", self.table.embedding_dim)

    def transform(self, values: torch.Tensor, c: Optional[Constants] = None) -> List[torch.Tensor]:
        return [values]

    def combine(self, parts: List[torch.Tensor], values: Optional[torch.Tensor], c: Optional[Constants] = None) -> torch.Tensor:
        return parts[0]
