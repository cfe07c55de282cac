"""Training and inference speed of each scheme against stock TorchRec, side by side.

Same logical tables (Criteo Kaggle or CriteoTB cardinalities), same Zipf batches, one
process. Training step = embedding forward + backward with the fused row-wise Adagrad
inside backward, under DMP (stock: TorchRec's EmbeddingBagCollection on FBGEMM's fused
TBE; ours: the CompressedEmbeddingBagCollection of the scheme). Inference = the same
tables exported to FBGEMM's IntNBit tables at fp32 (stock: ``torchrec.inference.modules.
quantize_embeddings`` of the plain EBC; ours: ``quant.export``). Repetitions are
interleaved (stock, scheme A, scheme B, stock, ...) and the median is reported, with the
ratio scheme / stock. Embedding traffic (rows read x row bytes per second) is put next
to this machine's memory copy bandwidth, the physical limit. Per training step it also
counts, from a ``torch.profiler`` trace of one step after warm-up, the host syncs
(``aten::_local_scalar_dense``: every ``.item()`` / ``int(tensor)``, a stream stall on a GPU)
and the aten / fbgemm ops (launches on a GPU): deterministic, unlike the timings.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.overrides import TorchFunctionMode
from tabulate import tabulate
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.inference.modules import quantize_embeddings

from ..config import SchemeConfig, presets
from ..data.mlperf import DLRMV2_CARDINALITIES
from ..models import logical_tables
from ..data.synthetic import CRITEO_KAGGLE_CARDINALITIES, SyntheticCriteo, cat_names
from ..modules.compressed_ebc import CompressedEmbeddingBagCollection
from ..quant.export import export
from ..train.loop import local_process_group, shard_for_training

SPEED_DEFAULT = ("hashing", "qr", "qr_add", "memcom", "memrec", "freq_threshold", "fiited")  # registry presets timed by default
SIZES = {"kaggle": CRITEO_KAGGLE_CARDINALITIES, "criteotb": DLRMV2_CARDINALITIES}


def copy_bandwidth(mib: int = 512, reps: int = 5) -> float:
    """This machine's memory copy bandwidth in bytes/s (read + write of a ``mib`` MiB tensor)."""
    src = torch.empty(mib * 2**18, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times)


class _Emb(torch.nn.Module):
    def __init__(self, ebc: torch.nn.Module) -> None:
        super().__init__()
        self.ebc = ebc

    def forward(self, kjt):  # type: ignore[no-untyped-def]
        return self.ebc(kjt).values()


class _Loss(torch.nn.Module):
    """``kjt -> (loss, loss)`` with loss = SUM(emb * g): what ``TrainPipelineSparseDist`` drives."""

    def __init__(self, ebc: torch.nn.Module, g: torch.Tensor) -> None:
        super().__init__()
        self.ebc = ebc
        self.register_buffer("g", g)

    def forward(self, kjt):  # type: ignore[no-untyped-def]
        loss = (self.ebc(kjt).values() * self.g).sum()
        return loss, loss.detach()


def _pipelined_step(ebc: torch.nn.Module, g: torch.Tensor, dev: torch.device) -> Callable[[Sequence[object]], None]:
    """One pass of ``TrainPipelineSparseDist`` over a list of KJTs (our module sharded as one
    pipelineable module: its transform runs in the pipeline's input distribution)."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    model = _Loss(ebc, g)
    dmp, opt = shard_for_training(model, model, lr_sparse=0.01, lr_dense=0.01, device=dev, pipelineable=True)
    pipe = TrainPipelineSparseDist(dmp, opt, dev)

    def run(batches: Sequence[object]) -> None:
        it = iter(batches)
        while True:
            try:
                pipe.progress(it)
            except StopIteration:
                break
    return run


def _tables(cards: Sequence[int], dim: int) -> List[EmbeddingBagConfig]:
    return logical_tables(cat_names(len(cards)), cards, dim)


class HostReads(TorchFunctionMode):
    """Counts ``Tensor.tolist()`` calls (TorchRec's and ours): on a GPU each is a device-to-host
    copy, a sync like ``.item()``, but it never shows as ``aten::_local_scalar_dense``."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if getattr(func, "__name__", "") == "tolist":
            self.count += 1
        return func(*args, **(kwargs or {}))


def step_counts(step: Callable[[object], None], batch: object, device: torch.device = torch.device("cpu")) -> Dict[str, int]:
    """``{"syncs": host syncs, "ops": aten/fbgemm ops}`` of one call of ``step(batch)``. Host
    syncs = ``aten::_local_scalar_dense`` events (``.item()``, ``int(t)``, ``bool(t)``) + ``tolist()``
    calls (:class:`HostReads`); ``local_scalar_dense`` alone is the issue's first measure. On CUDA
    also ``cuda_sync_warnings``: the synchronizing calls ``torch.cuda.set_sync_debug_mode`` reports."""
    import warnings

    reads = HostReads()
    with torch.profiler.profile() as prof, reads:
        step(batch)
    events = prof.key_averages()
    scalar = sum(e.count for e in events if e.key == "aten::_local_scalar_dense")
    out = {"syncs": scalar + reads.count, "local_scalar_dense": scalar, "tolist": reads.count,
           "ops": sum(e.count for e in events if e.key.startswith(("aten::", "fbgemm::")))}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step(batch)
                torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        out["cuda_sync_warnings"] = sum("synchroniz" in str(w.message) for w in caught)
    return out


def scaling_counts(name: str, n_features: int, batch: int = 8, warm: int = 2, dim: int = 16, ratio: float = 10.0) -> Dict[str, int]:
    """:func:`step_counts` of one training step (1-process DMP, fused row-wise Adagrad) after
    ``warm`` steps, ``n_features`` tables of 2000-4000 rows, every one compressed with preset
    ``name`` ("stock": TorchRec's EBC). Batch 8 keeps every zeroed buffer under PyTorch's
    memset threshold (above it ``zero_`` adds a ``fill_`` op: a CPU artefact)."""
    cards = [2000 + 37 * i for i in range(n_features)]
    tables = _tables(cards, dim)
    data = [b.sparse_features for b in SyntheticCriteo(cards, batch, 2, seed=0)]
    ebc = (EmbeddingBagCollection(tables, device=torch.device("meta")) if name == "stock" else
           CompressedEmbeddingBagCollection(tables, {t.name: presets()[name](ratio, dim) for t in tables}, device=torch.device("meta")))
    model = _Emb(ebc)
    dmp, opt = shard_for_training(model, model, lr_sparse=0.01, lr_dense=0.01)
    g = torch.randn(batch, dim * n_features)

    def step(kjt):  # type: ignore[no-untyped-def]
        (dmp(kjt) * g).sum().backward()
        opt.step()
        opt.zero_grad()

    for _ in range(warm):
        step(data[0])
    return step_counts(step, data[1])


def bench_step_counts(schemes: Sequence[str], features: Sequence[int] = (26, 52), warms: Sequence[int] = (3, 201)) -> Dict[str, object]:
    """Host syncs and ops per training step of every scheme and stock, for each number of
    features and after each number of warm-up steps (3: the procedures still count / search;
    201: FreqThreshold, Saec, MPE past their last event). Both measured steps fall between
    FIITED's re-planning events (after 1, 2, 4, ... steps, then every ``interval``): a step
    after 2 or 200 would be one."""
    rows: Dict[str, Dict[str, Dict[str, int]]] = {}
    with local_process_group():
        for name in ["stock", *schemes]:
            for w in warms:
                for n in features:
                    rows.setdefault(name, {})[f"F{n}_warm{w}"] = scaling_counts(name, n, warm=w)
    return {"features": list(features), "warms": list(warms), "rows": rows, "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def format_step_counts(res: Dict[str, object]) -> str:
    stock = res["rows"]["stock"]
    head = ["scheme"] + [f"{k}: syncs / ops (x stock)" for k in next(iter(res["rows"].values()))]
    rows = []
    for name, r in res["rows"].items():
        rows.append([name] + [f"{c['syncs']} / {c['ops']} ({c['ops'] / stock[k]['ops']:.1f}x)" for k, c in r.items()])
    return tabulate(rows, headers=head, tablefmt="github")


def _timed(step: Callable[[object], None], batches: Sequence[object], device: torch.device = torch.device("cpu")) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in batches:
        step(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_speed(sizes: str = "kaggle", max_rows: Optional[int] = 2_000_000, dim: int = 64, ratio: float = 10.0, batch: int = 2048,
                batches: int = 8, reps: int = 3, schemes: Sequence[str] = SPEED_DEFAULT, min_rows: int = 10_000,
                stock_limit_bytes: int = 8 * 2**30, device: str = "cpu", inference: bool = True,
                pipeline: bool = True, ranks: int = 1) -> Dict[str, object]:
    """Samples/s of a training step (on ``device``, one process) and, with ``inference``, of
    inference lookups (exported, on CPU) per scheme and for stock TorchRec; with ``pipeline``
    also of the same step under TorchRec's ``TrainPipelineSparseDist`` (``pipe_s``).
    ``ranks > 1``: the training steps on that many gloo ranks (tables sharded table-wise,
    ``batch`` per rank; samples/s are global, counts and times rank 0's; no inference)."""
    if ranks > 1:
        from ..testing.multiprocess import run_on_ranks

        kw = dict(sizes=sizes, max_rows=max_rows, dim=dim, ratio=ratio, batch=batch, batches=batches, reps=reps,
                  schemes=list(schemes), min_rows=min_rows, stock_limit_bytes=stock_limit_bytes, device=device,
                  inference=False, pipeline=pipeline)
        res = run_on_ranks(_speed_on_rank, kw, world_size=ranks)[0]
        for r in res["runs"].values():
            for k in ("train_samples_s", "pipe_samples_s"):
                if k in r:
                    r[k] *= ranks
        return {**res, "ranks": ranks}
    dev = torch.device(device)
    cards = [v if max_rows is None else min(v, max_rows) for v in SIZES[sizes]]
    tables = _tables(cards, dim)
    full_bytes = sum(t.num_embeddings * t.embedding_dim * 4 for t in tables)
    data = [b.sparse_features.to(dev) for b in SyntheticCriteo(cards, batch, batches, seed=0)]
    ids_per_batch = data[0].values().numel()
    runs: Dict[str, Dict[str, object]] = {}
    train_fns, infer_fns, pipe_fns = {}, {}, {}
    with local_process_group():
        variants: Dict[str, Optional[Dict[str, SchemeConfig]]] = {}
        if full_bytes <= stock_limit_bytes:
            variants["stock"] = None
        for name in schemes:
            variants[name] = {t.name: presets()[name](ratio, dim) for t in tables if t.num_embeddings >= min_rows}
        for name, sch in variants.items():
            try:
                ebc = (EmbeddingBagCollection(_tables(cards, dim), device=torch.device("meta")) if sch is None else
                       CompressedEmbeddingBagCollection(_tables(cards, dim), sch, device=torch.device("meta")))
            except ValueError as e:
                runs[name] = {"skipped": str(e)}
                continue
            model = _Emb(ebc)
            dmp, opt = shard_for_training(model, model, lr_sparse=0.01, lr_dense=0.01, device=dev)
            g = torch.randn(batch, dim * len(tables), device=dev)

            def train_step(kjt, dmp=dmp, opt=opt, g=g):  # type: ignore[no-untyped-def]
                (dmp(kjt) * g).sum().backward()
                opt.step()
                opt.zero_grad()

            stored = ebc.memory_report().total.compressed_bytes if sch is not None else full_bytes
            train_fns[name] = train_step
            runs[name] = {"stored_bytes": stored, "train_s": [], "infer_s": [], "pipe_s": []}
            train_step(data[0])  # warm-up (first-call allocations)
            runs[name].update({f"{k}_per_step": v for k, v in step_counts(train_step, data[1 % len(data)], dev).items()})
            if pipeline:
                twin = (EmbeddingBagCollection(_tables(cards, dim), device=torch.device("meta")) if sch is None else
                        CompressedEmbeddingBagCollection(_tables(cards, dim), sch, device=torch.device("meta")))
                pipe_fns[name] = _pipelined_step(twin, g, dev)
                pipe_fns[name](data[:2])  # warm-up
            if inference:  # an unsharded copy exported to FBGEMM's IntNBit tables at fp32, on CPU
                plain = (EmbeddingBagCollection(_tables(cards, dim)) if sch is None else CompressedEmbeddingBagCollection(_tables(cards, dim), sch))
                infer = quantize_embeddings(_Emb(plain), dtype=torch.float32, inplace=False) if sch is None else export(_Emb(plain), default="fp32")
                infer.eval()
                infer_fns[name] = lambda kjt, m=infer: m(kjt.to(torch.device("cpu")))
                with torch.no_grad():
                    infer_fns[name](data[0])
        for _ in range(reps):  # interleaved repetitions
            for name in train_fns:
                runs[name]["train_s"].append(_timed(train_fns[name], data, dev))
                if name in pipe_fns:
                    runs[name]["pipe_s"].append(_timed(lambda batches, f=pipe_fns[name]: f(batches), [data], dev))
                if name in infer_fns:
                    with torch.no_grad():
                        runs[name]["infer_s"].append(_timed(infer_fns[name], data))
    bw = copy_bandwidth()
    n = batch * len(data)
    for name, r in runs.items():
        if "skipped" in r:
            continue
        r["train_samples_s"] = n / statistics.median(r["train_s"])
        if r["pipe_s"]:
            r["pipe_samples_s"] = n / statistics.median(r["pipe_s"])
        if r["infer_s"]:
            r["infer_samples_s"] = n / statistics.median(r["infer_s"])
            # embedding rows read per logical lookup: one d-row (stock); the schemes read their own physical rows
            r["infer_emb_bytes_s"] = ids_per_batch * len(data) * dim * 4 / statistics.median(r["infer_s"])
    stock = runs.get("stock")
    for name, r in runs.items():
        if stock is not None and "skipped" not in r:
            r["train_vs_stock"] = r["train_samples_s"] / stock["train_samples_s"]
            if "infer_samples_s" in r:
                r["infer_vs_stock"] = r["infer_samples_s"] / stock["infer_samples_s"]
            r["ops_vs_stock"] = r["ops_per_step"] / stock["ops_per_step"]
            if "pipe_samples_s" in r and "pipe_samples_s" in stock:
                r["pipe_vs_stock"] = r["pipe_samples_s"] / stock["pipe_samples_s"]
    return {"device": str(dev), "pipeline": pipeline, "ranks": 1, "sizes": sizes, "max_rows": max_rows, "dim": dim, "ratio": ratio, "batch": batch, "batches": batches, "reps": reps,
            "full_bytes": full_bytes, "stock_fits": full_bytes <= stock_limit_bytes, "copy_bandwidth_bytes_s": bw,
            "runs": runs, "torch_threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def _speed_on_rank(rank: int, world: int, kw: Dict[str, object]) -> Dict[str, object]:
    return bench_speed(**kw)


def format_speed(res: Dict[str, object], fmt: str = "simple") -> str:
    rows = []
    for name, r in res["runs"].items():
        if "skipped" in r:
            rows.append([name, "-", "-", "-", "-", "-", "-", "-", "-", "-", f"skipped: {r['skipped'][:60]}"])
            continue
        vs = {k: f"{r[k]:.2f}x" if k in r else "n/a" for k in ("train_vs_stock", "infer_vs_stock", "ops_vs_stock", "pipe_vs_stock")}
        rows.append([name, f"{res['full_bytes'] / r['stored_bytes']:.1f}x", f"{r['train_samples_s']:,.0f}",
                     vs["train_vs_stock"], f"{r['pipe_samples_s']:,.0f}" if "pipe_samples_s" in r else "-", vs["pipe_vs_stock"],
                     r["syncs_per_step"], f"{r['ops_per_step']} ({vs['ops_vs_stock']})",
                     f"{r['infer_samples_s']:,.0f}" if "infer_samples_s" in r else "-", vs["infer_vs_stock"],
                     f"{r['infer_emb_bytes_s'] / res['copy_bandwidth_bytes_s']:.1%}" if "infer_samples_s" in r else "-"])
    head = (f"{res['sizes']} sizes (max rows {res['max_rows']}), dim {res['dim']}, batch {res['batch']}"
            f"{' per rank, %d gloo ranks (global samples/s)' % res['ranks'] if res.get('ranks', 1) > 1 else ''}, {res['reps']} interleaved reps; "
            f"copy bandwidth {res['copy_bandwidth_bytes_s'] / 1e9:.1f} GB/s")
    if not res["stock_fits"]:
        head += f"; stock TorchRec not run: {res['full_bytes'] / 2**30:.1f} GiB of fp32 tables do not fit"
    return head + "\n\n" + tabulate(rows, headers=["variant", "ratio", "train samples/s", "vs stock", "pipelined samples/s", "vs stock", "host syncs/step",
                                                   "ops/step (vs stock)", "infer samples/s", "vs stock",
                                                   "logical emb bytes/s / copy BW"], tablefmt=fmt)
