"""The lookup plan: which logical features are transformed and combined together.

Features whose tables' schemes return the same :meth:`~torchrec_compress.schemes.base.
TableScheme.batch_key` form one :class:`Group`: one transform over all their ids (each id
reading its own table's constants, ``[F_g, C]`` gathered per id), one slice of the inner
KJT, one combine, one pooling. So a step costs a fixed number of ops per group, whatever
the number of features, and the number of groups is the number of distinct (scheme, dim)
pairs. Every other feature (schemes with a procedure or per-table maps) is a *single*,
transformed and combined on its own.

The plan is built once per input key order (and device). The input KJT is permuted once
(``fbgemm.permute_2D_sparse_data``) so that every group's ids are contiguous.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedTensor

from ..schemes.base import TableScheme


@dataclass
class Group:
    """Features of one batch key, in plan order (positions ``start .. start + len(features)``)."""

    scheme: TableScheme  # the first table's scheme: its transform and combine serve the group
    features: List[str]
    start: int
    dim: int  # logical embedding dim (the same for the whole group: it is part of the key)
    part_dims: List[int]  # d_p of each virtual feature suffix
    suffixes: List[str]
    per_value: bool
    pooling: PoolingType  # per-value and ragged groups pool after the lookups (same for the group: part of its key)
    ragged: bool
    constants: List[Dict[str, int]]  # per feature
    tables: List[TableScheme] = field(default_factory=list)  # each table's scheme once, in order
    table_index: List[int] = field(default_factory=list)  # per feature: its table's index in ``tables``
    routes: bool = False  # its scheme routes id by id (:meth:`~TableScheme.route_batch`), sees and observes as a batch
    # id-weighted (:attr:`~TableScheme.id_weighted`): its first table's lookups K, the first K
    # suffixes in weighted bags, the rest per id; 0: not id-weighted
    lookups: int = 0
    _device: Dict[object, object] = field(default_factory=dict)
    _maps: Tuple[object, Dict[str, torch.Tensor]] = (None, {})

    @property
    def weighted(self) -> bool:
        return self.lookups > 0

    @property
    def size(self) -> int:
        return len(self.features)

    def keys(self) -> List[str]:
        """Inner virtual features, suffix-major: ``(s, f)`` for s in suffixes for f in features."""
        return [k for ks in self.keys_by_suffix() for k in ks]

    def keys_by_suffix(self) -> List[List[str]]:
        return [[f"{f}{s}" for f in self.features] for s in self.suffixes]

    def _suffixes_in(self, kind: str) -> range:
        """Indices of the suffixes whose lookups go to the inner EBC ``kind`` ("pooled",
        "weighted" or "per_id")."""
        n = len(self.suffixes)
        if self.weighted:
            return {"weighted": range(self.lookups), "per_id": range(self.lookups, n)}.get(kind, range(0))
        if kind == "weighted":
            return range(0)
        return range(n) if self.per_value == (kind == "per_id") else range(0)

    def inner_keys(self, kind: str) -> List[str]:
        """The group's virtual features in the inner EBC ``kind``, suffix-major."""
        ks = self.keys_by_suffix()
        return [k for s in self._suffixes_in(kind) for k in ks[s]]

    def inner_dims(self, kind: str) -> List[int]:
        """``d_p`` of each of the group's suffixes in the inner EBC ``kind``."""
        return [self.part_dims[s] for s in self._suffixes_in(kind)]

    def tensors(self, device: torch.device) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``[F_g]`` arange and each constant ``[F_g]`` (int64) on ``device`` (cached), with
        the start of each feature's table in every laid-out map (``<map>_start``) and its
        table's index in the group (``_table``)."""
        if device not in self._device:
            per_feature = [dict(c, _table=t) for c, t in zip(self.constants, self.table_index)]
            for name, sizes in self._map_sizes().items():
                starts = [sum(sizes[:i]) for i in range(len(sizes))]
                for c, t in zip(per_feature, self.table_index):
                    c[f"{name}_start"] = starts[t]
            consts = {n: torch.tensor([c[n] for c in per_feature], dtype=torch.int64, device=device) for n in per_feature[0]}
            self._device[device] = (torch.arange(self.size, device=device), consts)
        return self._device[device]

    def per_id_constants(self, fidx: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``[n]`` feature index within the group -> each constant ``[n]`` of every id's table,
        and the group's laid-out maps (:meth:`TableScheme.batch_maps`) whole."""
        out = {n: t[fidx] for n, t in self.tensors(fidx.device)[1].items()}
        out.update(self.maps())
        return out

    def stacked_parameters(self) -> Optional[Dict[str, torch.Tensor]]:
        """Each of the tables' :meth:`~torchrec_compress.schemes.base.TableScheme.batch_parameters`
        stacked over the group's features, ``[F_g, ...]`` (a feature reads its table's); None: none."""
        names = list(self.tables[0].batch_parameters())
        if not names:
            return None
        flat = self._flat(self.table_index)
        if flat is not None:
            return flat
        own = [impl.batch_parameters() for impl in self.tables]
        return {n: torch.stack([own[t][n] for t in self.table_index]) for n in names}

    def table_parameters(self) -> Dict[str, torch.Tensor]:
        """Each of the tables' :meth:`~torchrec_compress.schemes.base.TableScheme.batch_parameters`
        stacked over the group's tables, ``[T, ...]`` (``c["_table"]`` indexes it per id)."""
        flat = self._flat(list(range(len(self.tables))))
        if flat is not None:
            return flat
        own = [impl.batch_parameters() for impl in self.tables]
        return {n: torch.stack([o[n] for o in own]) for n in own[0]}

    def _flat(self, which: List[int]) -> Optional[Dict[str, torch.Tensor]]:
        """The rows ``which`` (indices into ``tables``) of the tables' family parameter
        (``FlatParameters``): the parameter itself when they are all of it in order, else one
        ``index_select`` per name; None when the tables are not one family."""
        fams = [getattr(getattr(impl, "buffers", None), "_family", None) for impl in self.tables]
        if not fams or fams[0] is None or any(f is None or f[0] is not fams[0][0] for f in fams):
            return None
        flat = fams[0][0]
        rows = [fams[t][1] for t in which]
        names = list(flat._parameters)
        if rows == list(range(len(flat._states))):
            return {n: flat.rows(n) for n in names}
        device = flat.rows(names[0]).device
        key = ("flat", tuple(rows), device)
        if key not in self._device:
            self._device[key] = torch.tensor(rows, dtype=torch.int64, device=device)
        idx = self._device[key]
        return {n: flat.rows(n).index_select(0, idx) for n in names}

    def full_constants(self, features: Sequence[str], device: torch.device) -> Dict[str, torch.Tensor]:
        """Each constant ``[F]`` over ``features`` (every feature of the module): the group's
        own for its features, its first feature's elsewhere (valid values for the masked ids
        an elementwise pass gives the other features)."""
        key = ("full", tuple(features), device)
        if key not in self._device:
            mine = self.tensors(device)[1]
            at = {f: i for i, f in enumerate(self.features)}
            index = torch.tensor([at.get(f, 0) for f in features], dtype=torch.int64, device=device)
            self._device[key] = {n: t[index] for n, t in mine.items()}
        return self._device[key]

    def _map_sizes(self) -> Dict[str, List[int]]:
        sizes: Dict[str, List[int]] = {}
        for i, impl in enumerate(self.tables):
            for name, t in impl.batch_maps(i).items():
                sizes.setdefault(name, []).append(t.numel())
        return sizes

    def maps(self) -> Dict[str, torch.Tensor]:
        """Every table's :meth:`TableScheme.batch_maps` laid end to end, rebuilt only when one
        of the buffers they come from changed (an event, a load): no ops in a plain step."""
        key = tuple((id(b), b._version) for impl in self.tables for b in impl.map_buffers())
        if not key:
            return {}
        if self._maps[0] != key:
            parts: Dict[str, List[torch.Tensor]] = {}
            for i, impl in enumerate(self.tables):
                for name, t in impl.batch_maps(i).items():
                    parts.setdefault(name, []).append(t)
            self._maps = (key, {n: torch.cat(ts) for n, ts in parts.items()})
        return self._maps[1]


class Plan:
    """Groups and singles, and where an input key order puts them.

    Groups and singles come from the module's own feature order (``output_names``), so the
    inner KJTs have the same keys in the same order for any input order (TorchRec's sharded
    EBC fixes its feature permutation at its first input). ``order[p]``: the input key index
    at plan position p (groups first, in first-seen order, then the singles); ``permute``:
    that order as a tensor, None when it is the input order.
    Cached per device: the permutation, each group's inner-output columns, the output order."""

    def __init__(self, keys: Sequence[str], feature_table: Dict[str, EmbeddingBagConfig],
                 schemes: Dict[str, TableScheme], output_names: Sequence[str], batch: bool = True) -> None:
        if sorted(keys) != sorted(output_names):
            raise ValueError(f"KJT keys {list(keys)} are not the features {list(output_names)}")
        by_key: Dict[object, List[str]] = {}
        singles: List[str] = []
        for f in output_names:  # the module's order, whatever the input's: the inner KJTs' keys never change order
            impl = schemes[feature_table[f].name]
            key = impl.batch_key() if batch else None
            if key is None:
                singles.append(f)
                continue
            after = impl.per_value or impl.ragged or impl.id_weighted  # pooled (MEAN) after the inner lookups: the pooling is the group's
            by_key.setdefault((key, impl.per_value, feature_table[f].pooling if after else None), []).append(f)
        self.groups: List[Group] = []
        pos = 0
        for (_, per_value, _), feats in by_key.items():
            impl = schemes[feature_table[feats[0]].name]
            phys = impl.physical_tables()
            names = list(dict.fromkeys(feature_table[f].name for f in feats))
            self.groups.append(Group(
                scheme=impl, features=feats, start=pos, dim=feature_table[feats[0]].embedding_dim,
                part_dims=[p.embedding_dim for p in phys for _ in p.feature_suffixes()], suffixes=impl.feature_suffixes(),
                per_value=per_value, pooling=feature_table[feats[0]].pooling, ragged=impl.ragged,
                constants=[schemes[feature_table[f].name].constants() for f in feats],
                tables=[schemes[n] for n in names], table_index=[names.index(feature_table[f].name) for f in feats],
                routes=type(impl).route_batch is not TableScheme.route_batch,
                lookups=impl.weighted_lookups()))
            pos += len(feats)
        self.singles = singles
        self.single_start = pos
        # tables whose ids a routed batch sees (not the module, table by table)
        self.routed_tables = frozenset(t.table.name for g in self.groups if g.routes for t in g.tables)
        plan_features = [f for g in self.groups for f in g.features] + singles
        index = {k: i for i, k in enumerate(keys)}
        self.order = [index[f] for f in plan_features]
        self.features = plan_features
        self.identity = self.order == list(range(len(keys)))
        self.position = {f: p for p, f in enumerate(plan_features)}
        # direct: every feature one lookup whose combine is the identity (no per-id, no single):
        # the inner KJT goes in the module's order and the inner output IS the module's output
        self.direct = not singles and all(not g.per_value and len(g.suffixes) == 1 and g.scheme.identity_combine
                                          for g in self.groups)
        self._keys = list(keys)
        self.to_module_order = [index[f] for f in output_names]  # input index of each output feature
        suffix = {f: g.suffixes[0] for g in self.groups for f in g.features}
        self.direct_keys = [f"{f}{suffix[f]}" for f in output_names] if self.direct else []
        self._dims = {f: feature_table[f].embedding_dim for f in output_names}
        self._table = {f: feature_table[f].name for f in output_names}
        self._n_phys = {feature_table[f].name: len(schemes[feature_table[f].name].physical_tables()) for f in output_names}
        self._output = list(output_names)
        self._device: Dict[object, Optional[torch.Tensor]] = {}

    def inner_table_order(self) -> List[Tuple[List[str], int]]:
        """(tables, physical tables each) in the order the inner EBCs should hold them: a direct
        plan's in the module's order; else each group's i-th physical tables side by side (its
        inner keys are then the inner EBC's own order: no permute in TorchRec's input
        distribution, one split of its output), then each single's."""
        out: List[Tuple[List[str], int]] = []
        if self.direct:
            return [([t], 1) for t in dict.fromkeys(self._table[f] for f in self._output)]
        for g in self.groups:
            out.append((list(dict.fromkeys(self._table[f] for f in g.features)), len(g.scheme.physical_tables())))
        for f in self.singles:
            t = self._table[f]
            if all(t not in names for names, _ in out):
                out.append(([t], self._n_phys[t]))
        return out

    def group_of_input_feature(self, device: torch.device) -> torch.Tensor:
        """``[F]`` the group index of each input feature (a direct plan's elementwise pass)."""
        key = ("group_of", device)
        if key not in self._device:
            at = {f: gi for gi, g in enumerate(self.groups) for f in g.features}
            self._device[key] = torch.tensor([at[f] for f in self._keys], dtype=torch.int64, device=device)
        return self._device[key]

    def to_module(self, device: torch.device) -> Optional[torch.Tensor]:
        """``[F]`` input index of each output feature (None: the input is in the module's order)."""
        if self._keys == self._output:
            return None
        key = ("to_module", device)
        if key not in self._device:
            self._device[key] = torch.tensor(self.to_module_order, dtype=torch.int32, device=device)
        return self._device[key]

    def permute(self, device: torch.device) -> Optional[torch.Tensor]:
        """``[F]`` input key index of each plan position (None: the input order already)."""
        if self.identity:
            return None
        key = ("permute", device)
        if key not in self._device:
            self._device[key] = torch.tensor(self.order, dtype=torch.int32, device=device)
        return self._device[key]

    def columns(self, name: object, kt: KeyedTensor, wanted: Sequence[str]) -> Optional[torch.Tensor]:
        """Columns of ``kt`` (an inner EBC's output) holding ``wanted``, in order (cached by
        ``name`` and ``kt``'s keys); None: all of ``kt``'s, in its order."""
        key = (name, tuple(kt.keys()), kt.values().device)
        if key not in self._device:
            self._device[key] = None if list(kt.keys()) == list(wanted) else column_index(kt.keys(), kt.length_per_key(), wanted, kt.values().device)
        return self._device[key]

    def output_columns(self, device: torch.device) -> Optional[Tuple[torch.Tensor, torch.Tensor, int]]:
        """(the permutation taking the plan-ordered output to the module's logical order, its
        inverse, the width it moves: every feature's dim when they are all equal, so whole
        ``[B, d]`` blocks move, else 1 column); None: the same order."""
        if self.features == self._output:
            return None
        key = ("output", device)
        if key not in self._device:
            dims = {self._dims[f] for f in self.features}
            if len(dims) == 1:
                perm = torch.tensor([self.position[f] for f in self._output], dtype=torch.int64, device=device)
                width = dims.pop()
            else:
                perm = column_index(self.features, [self._dims[f] for f in self.features], self._output, device)
                width = 1
            self._device[key] = (perm, torch.argsort(perm), width)
        return self._device[key]

    def blocks(self, kind: str, kt: KeyedTensor) -> Tuple[Optional[List[torch.Tensor]], Dict[str, torch.Tensor]]:
        """``kt``'s values in one split (its backward is one cat; a slice's or a gather's would
        zero-fill the whole width): each group's columns (groups of ``kind``, "pooled",
        "weighted" or "per_id"; other groups get None) when ``kt``'s keys start with the groups' in the plan's
        order (the inner EBCs are built so), else None; and every other key's ``[B, d]``."""
        key = ("blocks", kind, tuple(kt.keys()))
        if key not in self._device:
            mine = [bool(g.inner_keys(kind)) for g in self.groups]
            group_keys = [k for g in self.groups for k in g.inner_keys(kind)]
            n = len(group_keys)
            keys, dims = list(kt.keys()), kt.length_per_key()
            if keys[:n] == group_keys:
                widths = [sum(g.size * d for d in g.inner_dims(kind)) for g, m in zip(self.groups, mine) if m]
                self._device[key] = (mine, widths + dims[n:], keys[n:])
            else:  # the groups gather their columns; the singles' keys (if any) come from one split
                ours = set(group_keys)
                self._device[key] = (None, dims, keys if any(k not in ours for k in keys) else [])
        mine, widths, rest = self._device[key]
        if mine is None:
            return None, dict(zip(rest, kt.values().split(widths, dim=1))) if rest else {}
        parts = kt.values().split(widths, dim=1)
        it = iter(parts[:len(widths) - len(rest)])
        return [next(it) if m else None for m in mine], dict(zip(rest, parts[len(widths) - len(rest):]))


def column_index(keys: Sequence[str], dims: Sequence[int], wanted: Sequence[str], device: torch.device) -> torch.Tensor:
    """Columns of a KeyedTensor (``keys`` with widths ``dims``) holding ``wanted``, in order."""
    offsets, at = {}, 0
    for k, d in zip(keys, dims):
        offsets[k] = (at, d)
        at += d
    return torch.tensor([c for w in wanted for c in range(offsets[w][0], offsets[w][0] + offsets[w][1])], dtype=torch.int64, device=device)
