"""Training run configuration (YAML), validated with messages that say what is allowed."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional

import yaml

from ..config import SchemeConfig, scheme_types
DATA_KINDS = ("synthetic", "synthetic_first_order", "frappe", "criteo_tsv", "criteo_npy", "criteo_multihot", "avazu_csv", "movielens_csv")
SYNTHETIC_KINDS = ("synthetic", "synthetic_first_order")  # RealisticSynthetic (default) / SyntheticCriteo (first-order, for regression)
CSV_KINDS = ("avazu_csv", "movielens_csv")  # one CSV file, split 80/10/10 (train / eval / test) by a fixed seeded permutation
MODEL_KINDS = ("dlrm", "dlrm_dcn")
SPARSE_OPTIMIZER_NAMES = ("rowwise_adagrad", "adagrad", "sgd")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    kind: str = "synthetic"
    batch_size: int = 1024
    root: Optional[str] = None  # frappe: folder with the libFM files; criteo_npy / criteo_multihot: the day files
    train_paths: List[str] = dataclasses.field(default_factory=list)  # criteo_tsv; avazu_csv / movielens_csv: the one file
    eval_paths: List[str] = dataclasses.field(default_factory=list)
    train_days: List[int] = dataclasses.field(default_factory=lambda: list(range(23)))  # criteo_npy / criteo_multihot
    eval_days: List[int] = dataclasses.field(default_factory=lambda: [23])  # first half of the first one (MLPerf's validation)
    cardinalities: List[int] = dataclasses.field(default_factory=list)  # synthetic / criteo_* table sizes
    multi_hot: List[int] = dataclasses.field(default_factory=list)  # ids per sample and feature (synthetic, criteo_multihot)
    train_batches: int = 100  # synthetic
    eval_batches: int = 10


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    kind: str = "dlrm"
    embedding_dim: int = 16
    dense_arch: List[int] = dataclasses.field(default_factory=lambda: [64])
    over_arch: List[int] = dataclasses.field(default_factory=lambda: [64, 32, 1])
    dcn_num_layers: int = 3
    dcn_low_rank_dim: int = 64


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    lr_sparse: float = 0.05
    lr_dense: float = 0.01
    seed: int = 0
    checkpoint: bool = True  # DCP checkpoint under <out>/checkpoints after every epoch
    # MLPerf DLRMv2's schedule: linear warm-up, constant, then (1 - progress)^2 decay to 0
    lr_warmup_steps: int = 0
    lr_decay_start: int = 0
    lr_decay_steps: int = 0
    sparse_optimizer: str = "rowwise_adagrad"  # fused: rowwise_adagrad | adagrad | sgd
    eval_every: int = 0  # steps between evaluations (0: at the end of each epoch only)
    checkpoint_every: int = 0  # steps between checkpoints (0: at the end of each epoch only)
    max_steps: int = 0  # stop (and checkpoint) after this many steps in all (0: no limit)
    target_auc: float = 0.0  # stop at the first evaluation reaching it (MLPerf DLRMv2: 0.80275)
    tensorboard: bool = True  # <out>/tensorboard scalars, when tensorboard is installed
    plots: bool = True  # <out>/curves.png, when matplotlib is installed
    mlperf_log: bool = False  # <out>/mlperf.log (mlperf_logging's :::MLLOG events), when mlperf-logging is installed


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """``schemes: auto``: the compression planner chooses schemes for this budget."""
    memory_per_rank: str = ""  # e.g. "8GiB": embeddings + optimizer state per rank


def lr_scale(step: int, cfg: "TrainConfig") -> float:
    """Multiplier of the base learning rates at global step ``step`` (0-based)."""
    if step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_decay_steps > 0 and step >= cfg.lr_decay_start:
        left = cfg.lr_decay_start + cfg.lr_decay_steps - step
        return max(0.0, left / cfg.lr_decay_steps) ** 2
    return 1.0


@dataclasses.dataclass(frozen=True)
class RunConfig:
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    schemes: Dict[str, SchemeConfig]  # empty with plan.memory_per_rank set: `schemes: auto`
    out: str = "runs/train"
    plan: PlanConfig = PlanConfig()

    @property
    def auto(self) -> bool:
        return bool(self.plan.memory_per_rank)


def _section(cls: type, raw: Any, where: str) -> Any:
    raw = raw or {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {raw!r}")
    allowed = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(allowed)}")
    return cls(**raw)


def _scheme(table: str, raw: Any) -> SchemeConfig:
    SCHEME_TYPES = scheme_types()
    if not isinstance(raw, Mapping) or "type" not in raw:
        raise ValueError(f"schemes.{table}: expected {{type: <one of {sorted(SCHEME_TYPES)}>, ...}}, got {raw!r}")
    kw = dict(raw)
    name = kw.pop("type")
    if name not in SCHEME_TYPES:
        raise ValueError(f"schemes.{table}.type: {name!r} is not a scheme; use one of {sorted(SCHEME_TYPES)}")
    fields = {f.name for f in dataclasses.fields(SCHEME_TYPES[name])}
    unknown = sorted(set(kw) - fields)
    if unknown:
        raise ValueError(f"schemes.{table}: {name} has no option(s) {unknown}; allowed: {sorted(fields)}")
    return SCHEME_TYPES[name](**kw)


def parse_config(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a config mapping (e.g. ``yaml.safe_load`` of ``examples/frappe.yaml``)."""
    unknown = sorted(set(raw) - {"data", "model", "train", "schemes", "plan", "out"})
    if unknown:
        raise ValueError(f"config: unknown sections {unknown}; allowed: data, model, train, schemes, plan, out")
    data = _section(DataConfig, raw.get("data"), "data")
    model = _section(ModelConfig, raw.get("model"), "model")
    train = _section(TrainConfig, raw.get("train"), "train")
    plan = _section(PlanConfig, raw.get("plan"), "plan")
    if data.kind not in DATA_KINDS:
        raise ValueError(f"data.kind: {data.kind!r}; use one of {list(DATA_KINDS)}")
    if model.kind not in MODEL_KINDS:
        raise ValueError(f"model.kind: {model.kind!r}; use one of {list(MODEL_KINDS)}")
    for name, value in (("data.batch_size", data.batch_size), ("train.epochs", train.epochs), ("model.embedding_dim", model.embedding_dim)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: must be a positive int, got {value!r}")
    for name in ("lr_warmup_steps", "lr_decay_start", "lr_decay_steps", "eval_every", "checkpoint_every", "max_steps"):
        value = getattr(train, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"train.{name}: must be an int >= 0, got {value!r}")
    for name in ("lr_sparse", "lr_dense"):
        value = getattr(train, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"train.{name}: must be a number > 0, got {value!r}")
    if not isinstance(train.target_auc, (int, float)) or not 0.0 <= train.target_auc < 1.0:
        raise ValueError(f"train.target_auc: must be in [0, 1) (0: no target), got {train.target_auc!r}")
    if train.sparse_optimizer not in SPARSE_OPTIMIZER_NAMES:
        raise ValueError(f"train.sparse_optimizer: {train.sparse_optimizer!r}; use one of {list(SPARSE_OPTIMIZER_NAMES)}")
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in data.cardinalities):
        raise ValueError(f"data.cardinalities: every table size must be an int >= 1, got {data.cardinalities!r}")
    if data.multi_hot and (len(data.multi_hot) != len(data.cardinalities or [0] * 26)
                           or any(not isinstance(h, int) or isinstance(h, bool) or h < 1 for h in data.multi_hot)):
        raise ValueError(f"data.multi_hot: one int >= 1 per table ({len(data.cardinalities or [0] * 26)}), got {data.multi_hot!r}")
    if data.multi_hot and data.kind not in SYNTHETIC_KINDS + ("criteo_multihot",):
        raise ValueError(f"data.multi_hot: only for data.kind synthetic, synthetic_first_order or criteo_multihot, not {data.kind!r}")
    if data.kind in ("criteo_npy", "criteo_multihot"):
        if not data.root or len(data.cardinalities) != 26 or not data.train_days or not data.eval_days:
            raise ValueError(f"data: {data.kind} needs root (the day files), 26 cardinalities, train_days and eval_days")
        if data.kind == "criteo_multihot" and not data.multi_hot:
            raise ValueError("data.multi_hot: criteo_multihot needs the 26 multi-hot sizes (MLPerf DLRMv2: 3, 2, 1, 2, 6, ...)")
    if data.kind == "frappe" and not data.root:
        raise ValueError("data.root: the Frappe folder is required for data.kind=frappe (e.g. ../shared/data/frappe)")
    if data.kind in CSV_KINDS and len(data.train_paths) != 1:
        raise ValueError(f"data.train_paths: {data.kind} reads one CSV file (split 80/10/10 into train, eval and test), got {data.train_paths!r}")
    if data.kind == "criteo_tsv" and (not data.train_paths or len(data.cardinalities) != 26):
        raise ValueError("data: criteo_tsv needs train_paths and 26 cardinalities (table sizes ids are taken modulo)")
    schemes = raw.get("schemes") or {}
    if schemes == "auto":
        if not plan.memory_per_rank:
            raise ValueError("schemes: auto needs plan.memory_per_rank (e.g. plan: {memory_per_rank: 8GiB})")
        from ..distributed.planner import parse_bytes

        parse_bytes(plan.memory_per_rank)  # raises with the allowed forms
        schemes = {}
    elif plan.memory_per_rank:
        raise ValueError("plan.memory_per_rank is only used with `schemes: auto`")
    if not isinstance(schemes, Mapping):
        raise ValueError(f"schemes: expected a mapping table -> scheme, or auto, got {schemes!r}")
    return RunConfig(data, model, train, {t: _scheme(t, s) for t, s in schemes.items()}, str(raw.get("out", "runs/train")), plan)


def apply_overrides(raw: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    """``section.key=value`` overrides (value parsed as YAML), e.g. ``train.epochs=2``."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected section.key=value")
        path, value = item.split("=", 1)
        node = raw
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p} is not a section")
        node[leaf] = yaml.safe_load(value)
    return raw


def load_config(path: str, overrides: Optional[List[str]] = None) -> RunConfig:
    """Read, override and validate a YAML run config; every problem is a ``ValueError``."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except OSError as e:
        raise ValueError(f"--config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--config {path}: expected a mapping of sections (data, model, train, schemes, plan, out)")
    try:
        return parse_config(apply_overrides(raw, list(overrides or [])))
    except TypeError as e:  # a value of the wrong kind reached a dataclass, e.g. `data: 3`
        raise ValueError(f"--config {path}: {e}") from None
