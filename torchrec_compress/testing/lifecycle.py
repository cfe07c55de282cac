"""Workers and helpers for the lifecycle tests: every registered scheme after DMP, a trained
`torchrec-compress train` run exported."""
from __future__ import annotations

import copy
import os
import warnings
from typing import Dict, List

import torch
from torchrec import EmbeddingBagConfig
from torchrec.distributed.model_parallel import DistributedModelParallel

from ..config import SchemeConfig, presets
from ..distributed.plans import uniform_plan
from ..distributed.sharders import sharders
from ..modules import CompressedEmbeddingBagCollection
from .data import random_bags


def preset_tables(rows: int = 2000, dim: int = 16, ratio: float = 2.0) -> tuple[List[EmbeddingBagConfig], Dict[str, SchemeConfig]]:
    """One table per benchmark preset of the registry (``t_<preset>``), compressed by it."""
    tables, schemes = [], {}
    for name, make in presets().items():
        tables.append(EmbeddingBagConfig(name=f"t_{name}", embedding_dim=dim, num_embeddings=rows, feature_names=[name]))
        schemes[f"t_{name}"] = make(ratio, dim)
    return tables, schemes


def scheme_state(module: CompressedEmbeddingBagCollection) -> Dict[str, Dict[str, torch.Tensor]]:
    """Table -> every buffer and small parameter of its scheme, as plain tensors."""
    return {t: {k: v.detach().clone() for k, v in [*s.named_buffers(), *s.named_parameters()]}
            for t, s in module.scheme_states().items()}


def dmp_state_worker(rank: int, world: int, sharding_type: str) -> Dict[str, Dict[str, torch.Tensor]]:
    """Every preset's scheme built on meta, sharded by DMP (which zero-fills meta buffers),
    then one evaluation forward: the scheme state the model starts training with."""
    tables, schemes = preset_tables()
    model = CompressedEmbeddingBagCollection(copy.deepcopy(tables), schemes, device=torch.device("meta"))
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=uniform_plan(model, sharding_type, world),
                                   sharders=sharders())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unfitted data-driven schemes say so: expected here
        dmp.eval()(random_bags(tables, 4, seed=rank).kjt())
    return scheme_state(dmp.module)


def export_trained_run(config: str, out: str, overrides: List[str]) -> Dict[str, float]:
    """Load the final checkpoint of a ``torchrec-compress train`` run into an unsharded model,
    ``quant.export`` it (fp32 tables: the deployed layout of every scheme) and evaluate it on
    the run's held-out test split (as the run's ``results["test"]``). Returns its metrics and its embedding bytes."""
    from ..quant.export import export, quantized_memory_report
    from ..train.config import load_config
    from ..train.loop import predictions
    from ..train.metrics import binary_metrics
    from ..train.run import _batches, _model
    from .runs import final_checkpoint_tensors

    cfg = load_config(config, [f"out={out}", *overrides])
    model, _ = _model(cfg, 1, table_device=torch.device("cpu"))
    flat = final_checkpoint_tensors(out)
    model.load_state_dict({k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")})
    inference = export(model, default="fp32")
    metrics = binary_metrics(*predictions(inference, _batches(cfg, "test", 0, 0, 1)))
    return {**metrics, "bytes": quantized_memory_report(inference).total.compressed_bytes,
            "checkpoint": os.path.join(out, "checkpoints")}
