"""Inference lookups/s: exported mixed-precision tables vs stock TorchRec quantized EBCs.

Same logical tables (Criteo Kaggle cardinalities capped at ``max_rows``), same Zipf
batches, one process, interleaved repetitions. Stock = ``torchrec.inference.modules.
quantize_embeddings`` of a plain EBC at FP32 and FP16 (FBGEMM IntNBit tables). Ours:
(a) the same EBC exported with INT8 for small tables and INT4 for large ones, (b) an MPE
model (frequency groups, precisions fixed by a frequency rule rather than a search so
the benchmark needs no training) finalized and exported.
"""
from __future__ import annotations

import statistics
import time
from typing import Dict, List, Sequence

import torch
from tabulate import tabulate
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.inference.modules import quantize_embeddings

from ..models import logical_tables
from ..data.synthetic import CRITEO_KAGGLE_CARDINALITIES, SyntheticCriteo, cat_names
from ..modules.compressed_ebc import CompressedEmbeddingBagCollection
from ..modules.compress import fit_
from ..quant.export import DTYPES, export, quantized_memory_report
from ..schemes.mpe import MPE


def _tables(cards: Sequence[int], dim: int) -> List[EmbeddingBagConfig]:
    return logical_tables(cat_names(len(cards)), cards, dim)


class _Holder(torch.nn.Module):
    def __init__(self, ebc: torch.nn.Module) -> None:
        super().__init__()
        self.ebc = ebc


def _stock(ebc: EmbeddingBagCollection, dtype: torch.dtype, per_table=None) -> torch.nn.Module:
    """TorchRec's own quantization (it swaps child modules only, hence the holder)."""
    q = quantize_embeddings(_Holder(ebc), dtype=dtype, inplace=False, per_table_weight_dtype=per_table).ebc
    assert type(q).__module__.startswith("torchrec.quant"), type(q)
    return q


def _stored_bytes(module: torch.nn.Module) -> int:
    return sum(getattr(t, "elem", t).numel() * getattr(t, "elem", t).element_size() for t in module.state_dict().values())


@torch.no_grad()
def bench_inference(max_rows: int = 1_000_000, dim: int = 64, batch: int = 2048, batches: int = 8, reps: int = 5,
                    big_rows: int = 100_000, seed: int = 0) -> Dict[str, Dict[str, float]]:
    """Median lookups/s and stored bytes of each variant; ``ratio`` = variant / stock FP32."""
    torch.manual_seed(seed)
    cards = [min(v, max_rows) for v in CRITEO_KAGGLE_CARDINALITIES]
    tables = _tables(cards, dim)
    data = [b.sparse_features for b in SyntheticCriteo(cards, batch, batches, seed=seed, split="eval")]
    ebc = EmbeddingBagCollection(tables)
    with torch.no_grad():  # spread like trained rows, so quantization ranges are realistic
        for p in ebc.parameters():
            p.normal_(0, 0.05)

    mixed = {t.name: ("int4" if t.num_embeddings >= big_rows else "int8") for t in tables}
    variants: Dict[str, torch.nn.Module] = {
        "stock fp32": _stock(ebc, torch.float32),
        "stock fp16": _stock(ebc, torch.float16),
        "stock int8/int4": _stock(ebc, torch.qint8, {n: DTYPES[d] for n, d in mixed.items()}),
    }
    plain = CompressedEmbeddingBagCollection(tables, {}, validate=False)
    plain.load_state_dict({f"pooled.{k}": v for k, v in ebc.state_dict().items()}, strict=False)
    variants["ours int8/int4"] = export(plain, mixed)

    big = [t.name for t in tables if t.num_embeddings >= big_rows]
    widths = (0, 2, 4, 8)  # the FBGEMM widths, so that the rule below is what is exported
    mpe = CompressedEmbeddingBagCollection(tables, {n: MPE(target_bits=32.0, groups=10, candidates=widths) for n in big}, validate=False)
    mpe.load_state_dict({f"pooled.{k}": v for k, v in ebc.state_dict().items() if k.split(".")[1] not in big}, strict=False)
    for n in big:
        mpe.per_id.embedding_bags[f"{n}__full"].weight.copy_(ebc.embedding_bags[n].weight)
        # frequency rule: top 10% of ids int8, next 40% int4, next 30% int2, rarest 20% dropped
        rule = torch.tensor([3] + [2] * 4 + [1] * 3 + [0] * 2)  # candidate index over the widths
        mpe.scheme_states()[n].logits.copy_(torch.nn.functional.one_hot(rule, len(widths)).float())
    fit_(mpe, data)  # groups from the benchmark's own id counts
    for n in big:
        mpe.scheme(n).choose_()
    variants["ours MPE (int8/4/2/drop)"] = export(mpe, {n: "int8" for n in [t.name for t in tables if t.name not in big]})

    lookups = sum(int(k.values().numel()) for k in data)
    times: Dict[str, List[float]] = {k: [] for k in variants}
    for name, m in variants.items():  # warm-up
        m(data[0])
    for _ in range(reps):
        for name, m in variants.items():  # interleaved, so machine noise hits every variant alike
            t0 = time.perf_counter()
            for k in data:
                m(k)
            times[name].append(time.perf_counter() - t0)
    base = lookups / statistics.median(times["stock fp32"])
    out = {}
    for name, m in variants.items():
        if name.startswith("ours"):
            stored = quantized_memory_report(m).total.compressed_bytes
        else:
            stored = _stored_bytes(m)
        rate = lookups / statistics.median(times[name])
        out[name] = {"lookups_per_s": rate, "speed_vs_fp32": rate / base, "bytes": stored}
    fp32_bytes = out["stock fp32"]["bytes"]
    for r in out.values():
        r["size_vs_fp32"] = fp32_bytes / r["bytes"]
    return out


def format_results(res: Dict[str, Dict[str, float]]) -> str:
    rows = [[k, f"{v['lookups_per_s'] / 1e6:.2f} M", f"{v['speed_vs_fp32']:.2f}x", f"{v['bytes'] / 2**20:.1f} MiB", f"{v['size_vs_fp32']:.2f}x"]
            for k, v in res.items()]
    return tabulate(rows, headers=["variant", "lookups/s", "speed vs stock fp32", "stored", "smaller than fp32"])
