"""What a run leaves for people to look at: TensorBoard scalars and matplotlib plots.

Both are optional: without tensorboard / matplotlib installed the run goes on and says so once.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence


class ScalarLog:
    """``torch.utils.tensorboard.SummaryWriter`` at ``logdir`` (None: log nothing)."""

    def __init__(self, logdir: Optional[str]) -> None:
        self.writer = None
        if logdir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is an optional extra
            print("note: tensorboard is not installed; no TensorBoard scalars (pip install tensorboard)")
            return
        self.writer = SummaryWriter(logdir)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no plots (pip install matplotlib)")
        return None
    return plt


def _smooth(xs: Sequence[float], k: int) -> List[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
    return out


def plot_curves(results: Dict[str, object], path: str) -> Optional[str]:
    """Train loss per step (raw and moving average) and eval AUC per evaluation of one run's
    ``results.json`` into ``path`` (PNG). Returns the path, or None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    losses: List[float] = list(results.get("losses") or [])
    evals = list(results.get("evals") or [])
    aucs, total = {int(e["step"]): e["auc"] for e in evals}, 0
    for e in results.get("epochs") or []:
        total += int(e["steps"])
        aucs[total] = e["eval_auc"]
    points = sorted(aucs)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    steps = range(1, len(losses) + 1)
    a.plot(steps, losses, color="0.75", lw=0.8, label="step")
    a.plot(steps, _smooth(losses, max(1, len(losses) // 50)), color="C0", label="moving average")
    a.set(xlabel="step", ylabel="train BCE loss", title="training loss")
    a.legend()
    b.plot(points, [aucs[s] for s in points], "o-", color="C1")
    b.set(xlabel="step", ylabel="eval AUC", title="evaluation AUC")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_runs(run_dirs: Sequence[str]) -> List[Dict[str, object]]:
    """``results.json`` of each run folder, with ``name`` and final ``auc`` added."""
    runs = []
    for d in run_dirs:
        path = os.path.join(d, "results.json") if os.path.isdir(d) else d
        if not os.path.exists(path):
            raise ValueError(f"compare: {path} not found (give run folders written by `torchrec-compress train`)")
        with open(path) as f:
            r = json.load(f)
        if not r.get("epochs"):
            raise ValueError(f"compare: {path} has no finished epoch")
        last = r["epochs"][-1]
        r.update(name=os.path.basename(os.path.normpath(os.path.dirname(path))), auc=last["eval_auc"], logloss=last["eval_logloss"])
        r["bytes"] = r.get("embedding_bytes")
        runs.append(r)
    return runs


def plot_memory_vs_auc(runs: Sequence[Dict[str, object]], path: str) -> Optional[str]:
    """Final eval AUC against embedding bytes (log x), one labelled point per run."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(runs):
        if r["bytes"]:
            ax.scatter([r["bytes"]], [r["auc"]], color=f"C{i % 10}")
            ax.annotate(f"{r['name']} ({r['ratio']:.3g}x)", (r["bytes"], r["auc"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set(xlabel="embedding bytes (log scale)", ylabel="final eval AUC", title="memory vs AUC")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_runs(runs: Sequence[Dict[str, object]]) -> str:
    from tabulate import tabulate

    def gib(b: Optional[int]) -> str:
        return "?" if not b else f"{b / 2**30:.3f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"

    paper = any("paper_ratio" in r for r in runs)  # a column only where a scheme's paper counts fewer bytes (FIITED)
    rows = []
    for r in runs:
        row = [r["name"], gib(r["bytes"]), f"{r['ratio']:.2f}x"]
        if paper:
            row.append(f"{r['paper_ratio']:.2f}x" if "paper_ratio" in r else "-")
        rows.append(row + [f"{r['auc']:.4f}", f"{r['logloss']:.4f}", f"{r['epochs'][-1].get('eval_ne', math.nan):.4f}",
                           r["steps"] if "steps" in r else "?"])
    return tabulate(rows, headers=["run", "emb bytes", "ratio"] + ["as its paper counts"] * paper + ["eval AUC", "logloss", "NE", "steps"])


class MLPerfLog:
    """MLPerf-style ``:::MLLOG`` events (``mlperf_logging.mllog``) in ``path``, when the package
    is installed and ``path`` is given; otherwise nothing. Event names are mllog's constants."""

    def __init__(self, path: Optional[str]) -> None:
        self.log = None
        if path is None:
            return
        try:
            from mlperf_logging import mllog
        except ImportError:
            print("note: mlperf-logging is not installed; no MLPerf log (pip install mlperf-logging)")
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        mllog.config(filename=path, root_dir=os.path.dirname(path))
        self.log = mllog.get_mllogger()
        self.c = mllog.constants

    def event(self, key: str, value: object = None, **metadata: object) -> None:
        if self.log is not None:
            self.log.event(key=getattr(self.c, key), value=value, metadata=metadata or None)

    def start(self, key: str, **metadata: object) -> None:
        if self.log is not None:
            self.log.start(key=getattr(self.c, key), metadata=metadata or None)

    def end(self, key: str, **metadata: object) -> None:
        if self.log is not None:
            self.log.end(key=getattr(self.c, key), metadata=metadata or None)
