"""Helpers for tests that run training: compare two `torchrec-compress train` runs (results, final
checkpoints), train a small DLRM on a CTR data set."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, Optional, Sequence

import torch


def torchrun_train(config: str, overrides: Sequence[str], cwd: str, fault: Optional[str] = None,
                   timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrec-compress train --config config overrides...`` on 2 local gloo ranks under
    torchrun (no restarts, one thread per rank); ``fault``: TORCHREC_COMPRESS_FAULT for it."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHREC_COMPRESS_FAULT"} | {"OMP_NUM_THREADS": "1"}
    if fault:
        env["TORCHREC_COMPRESS_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max_restarts", "0",
                           "-m", "torchrec_compress.cli", "train", "--config", config, *overrides],
                          cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


def results(out: str) -> Dict[str, object]:
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def same_run(ra: Dict[str, object], rb: Dict[str, object]) -> None:
    """Same steps, per-step losses, evaluations and per-epoch metrics (timings aside)."""
    assert ra["steps"] == rb["steps"] and ra["losses"] == rb["losses"] and ra["evals"] == rb["evals"]
    for x, y in zip(ra["epochs"], rb["epochs"], strict=True):
        diff = {k: (x[k], y.get(k)) for k in x if k != "samples_per_s" and x[k] != y.get(k)}
        assert not diff and x.keys() == y.keys(), diff


def final_checkpoint_tensors(out: str) -> Dict[str, torch.Tensor]:
    """Every tensor of ``<out>/checkpoints/latest`` (model, fused and dense optimizer state),
    flattened to ``{dotted.key: tensor}`` (DCP -> one torch.save file)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    root = os.path.join(out, "checkpoints")
    with open(os.path.join(root, "latest")) as f:
        ckpt = os.path.join(root, f.read().strip())
    dst = os.path.join(out, "final_checkpoint.pt")
    dcp_to_torch_save(ckpt, dst)
    flat: Dict[str, torch.Tensor] = {}
    stack = [("", torch.load(dst, weights_only=False)), ("dense.", torch.load(os.path.join(ckpt, "replicated.pt"), weights_only=False)["dense"])]
    while stack:
        pre, node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, (list, tuple)) else []
        for k, v in items:
            if isinstance(v, torch.Tensor):
                flat[f"{pre}{k}"] = v
            else:
                stack.append((f"{pre}{k}.", v))
    return flat


def assert_same_tensors(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and len(a) > 10, sorted(set(a) ^ set(b))[:10]
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def train_ctr_dlrm(data, batch_size: int, eval_batch_size: int, epochs: int = 2, seed: int = 0) -> tuple:
    """A DLRM (dim 16) trained on ``data.train`` (a :class:`~torchrec_compress.data.tabular.CtrData`)
    for ``epochs``; returns its ``(validation, test)`` metrics."""
    from ..models import build_dlrm, logical_tables
    from ..train.loop import local_process_group, predictions, shard_for_training, train_steps
    from ..train.metrics import binary_metrics

    with local_process_group():
        model = build_dlrm(logical_tables(data.features, data.cardinalities, 16), data.dense_in, [32], [64, 32, 1], seed=seed)
        dmp, opt = shard_for_training(model, model.sparse_arch, lr_sparse=0.05, lr_dense=0.01)
        for epoch in range(epochs):
            train_steps(dmp, opt, data.train.batches(batch_size, shuffle_seed=epoch), progress=False)
        return tuple(binary_metrics(*predictions(dmp, split.batches(eval_batch_size))) for split in (data.validation, data.test))
