"""Export a trained model to an inference model with FBGEMM quantized tables.

Every ``torchrec.EmbeddingBagCollection`` of the model (a plain one, or the inner
``pooled`` / ``weighted`` / ``per_id`` collections of a :class:`CompressedEmbeddingBagCollection`) is
replaced by ``torchrec.quant.embedding_modules.EmbeddingBagCollection``, whose tables are
FBGEMM ``IntNBitTableBatchedEmbeddingBagsCodegen`` tables with one dtype per table. The
compressed modules' transforms and combines stay as they are, so hashing, QR, MEmCom
etc. run unchanged on top of int8/int4/int2 rows (row-wise scale and bias in fp16).
"""
from __future__ import annotations

import copy
from typing import Dict, Mapping, Optional

import torch
import torch.quantization as tq
from torch import nn
from torchrec.distributed.types import ShardedModule
from torchrec.modules.embedding_configs import QuantConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

from ..modules.compressed_ebc import CompressedEmbeddingBagCollection
from ..modules.memory import MemoryReport, TableMemory

DTYPES: Dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "int8": torch.qint8,
    "int4": torch.quint4x2,
    "int2": torch.quint2x4,
}
BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4, "int2": 2}


def _dtype(name: str, where: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"{where}: dtype {name!r} is not supported; use one of {sorted(DTYPES)}") from None


def _physical_dtypes(
    module: nn.Module, ebc: EmbeddingBagCollection, dtypes: Mapping[str, str], default: str, used: set
) -> Dict[str, torch.dtype]:
    """Physical table -> dtype: its own entry, else its logical table's entry, else ``default``."""
    logical, preset = {}, {}
    if isinstance(module, CompressedEmbeddingBagCollection):
        for t in module.embedding_bag_configs():
            for p in module.scheme(t.name).physical_tables():
                logical[p.name(t.name)] = t.name
                if p.export_dtype is not None:  # chosen by the scheme (MPE's precision groups)
                    preset[p.name(t.name)] = p.export_dtype
    out = {}
    for cfg in ebc.embedding_bag_configs():
        # a physical entry wins, then the scheme's own choice, then the logical table's entry
        key = cfg.name if cfg.name in dtypes else (None if cfg.name in preset else logical.get(cfg.name))
        if key in dtypes:
            name = dtypes[key]
            used.add(key)
        else:
            name = preset.get(cfg.name, default)
        bits = BITS.get(str(name).lower(), 32)
        if bits < 16 and (cfg.embedding_dim * bits % 8 or cfg.embedding_dim * bits // 8 % 2):
            # FBGEMM's row-wise quantizer needs an even number of bytes per row
            raise ValueError(
                f"table {cfg.name!r}: dim {cfg.embedding_dim} at {name} packs into {cfg.embedding_dim * bits / 8:g} bytes; "
                f"FBGEMM needs a whole, even number (give this table another dtype, e.g. dtypes={{{cfg.name!r}: 'int8'}})"
            )
        out[cfg.name] = _dtype(name, f"table {cfg.name!r}")
    return out


def _quantize(ebc: EmbeddingBagCollection, per_table: Dict[str, torch.dtype]) -> QuantEmbeddingBagCollection:
    ebc = copy.copy(ebc)  # from_float reads .qconfig; leave the float module untouched
    ebc.qconfig = QuantConfig(
        activation=tq.PlaceholderObserver.with_args(dtype=torch.float),
        weight=tq.PlaceholderObserver.with_args(dtype=torch.float16),
        per_table_weight_dtype=per_table,
    )
    return QuantEmbeddingBagCollection.from_float(ebc)


@torch.no_grad()
def export(model: nn.Module, dtypes: Optional[Mapping[str, str]] = None, default: str = "fp16") -> nn.Module:
    """Inference copy of ``model`` with quantized embedding tables.

    Args:
        model: an unsharded model holding EBCs and/or CompressedEmbeddingBagCollections
            (a DMP-trained model: load its checkpoint into an unsharded model first).
        dtypes: table name -> "fp32" | "fp16" | "int8" | "int4" | "int2". A logical table's
            entry applies to all its physical tables; a physical name (e.g.
            ``"t_user__w"``) overrides it.
        default: dtype of every other table.
    Returns:
        a new module (``model`` is not changed) in eval mode.

    Example::

        inference = export(model, {"t_user": "int4", "t_ad": "int8"}, default="fp16")
    """
    dtypes = dict(dtypes or {})
    _dtype(default, "export default")
    for m in model.modules():
        if isinstance(m, ShardedModule):
            raise ValueError("export needs an unsharded model: load the trained (DCP) checkpoint into an unsharded copy first")
    out = finalize(copy.deepcopy(model))
    used: set = set()
    replaced = 0
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is EmbeddingBagCollection:
                setattr(parent, name, _quantize(child, _physical_dtypes(parent, child, dtypes, default, used)))
                replaced += 1
    if replaced == 0:
        raise ValueError("export: the model holds no torchrec EmbeddingBagCollection")
    unknown = sorted(set(dtypes) - used)
    if unknown:
        raise ValueError(f"export: dtypes given for unknown tables {unknown}")
    return out.eval()


def finalize(model: nn.Module) -> nn.Module:
    """``model`` with every compressed module in its deployed layout
    (:meth:`CompressedEmbeddingBagCollection.for_inference`: e.g. MPE's chosen precisions as
    one table per precision); ``export`` calls it. Changes ``model`` in place and returns it
    (a bare compressed module is returned replaced)."""
    if isinstance(model, CompressedEmbeddingBagCollection):
        return model.for_inference()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, CompressedEmbeddingBagCollection):
                setattr(parent, name, child.for_inference())
    return model


def _rows(weight: torch.Tensor) -> torch.Tensor:
    return getattr(weight, "elem", weight)  # UInt4Tensor / UInt2Tensor wrap the uint8 rows


def _dequantize_rows(raw: torch.Tensor, dim: int, bits: int) -> torch.Tensor:
    """IntNBit TBE rows ``[rows, bytes]`` = fp16 scale, fp16 bias, then ``dim`` little-endian
    ``bits``-bit codes (then alignment padding) -> fp32 ``[rows, dim]`` = code * scale + bias."""
    scale = raw[:, 0:2].contiguous().view(torch.float16).float()
    bias = raw[:, 2:4].contiguous().view(torch.float16).float()
    data = raw[:, 4:4 + dim * bits // 8].to(torch.int64)
    per_byte = 8 // bits
    shifts = torch.arange(per_byte) * bits
    codes = ((data.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(raw.shape[0], -1)[:, :dim]
    return codes.float() * scale + bias


def dequantized_tables(qebc: QuantEmbeddingBagCollection) -> Dict[str, torch.Tensor]:
    """Physical table -> its stored rows dequantized to fp32 ``[rows, dim]`` (the reference for parity)."""
    sd = qebc.state_dict()
    out = {}
    for cfg in qebc.embedding_bag_configs():
        raw = _rows(sd[f"embedding_bags.{cfg.name}.weight"])
        dt, d = cfg.data_type.name, cfg.embedding_dim
        if dt == "FP32":
            out[cfg.name] = raw[:, : 4 * d].contiguous().view(torch.float32)
        elif dt == "FP16":
            out[cfg.name] = raw[:, : 2 * d].contiguous().view(torch.float16).float()
        else:
            out[cfg.name] = _dequantize_rows(raw, d, {"INT8": 8, "INT4": 4, "INT2": 2}[dt])
    return out


def quantized_memory_report(model: nn.Module) -> MemoryReport:
    """Bytes an exported model really stores per logical table: quantized rows including
    FBGEMM's per-row fp16 scale/bias and row alignment, plus the schemes' id maps."""
    tables: Dict[str, TableMemory] = {}
    for m in model.modules():
        if isinstance(m, QuantEmbeddingBagCollection) and not _inside_compressed(model, m):
            sd = m.state_dict()
            for cfg in m.embedding_bag_configs():
                b = _rows(sd[f"embedding_bags.{cfg.name}.weight"]).numel()
                tables[cfg.name] = TableMemory(cfg.data_type.name.lower(), b, cfg.num_embeddings * cfg.embedding_dim * 4, {cfg.name: b})
        if isinstance(m, CompressedEmbeddingBagCollection):
            stored: Dict[str, int] = {}
            dts: Dict[str, str] = {}
            for inner in m.inner_collections():
                sd = inner.state_dict()
                for cfg in inner.embedding_bag_configs():
                    stored[cfg.name] = _rows(sd[f"embedding_bags.{cfg.name}.weight"]).numel()
                    dts[cfg.name] = cfg.data_type.name.lower()
            for t in m.embedding_bag_configs():
                impl = m.scheme(t.name)
                parts = {p.name(t.name): stored[p.name(t.name)] for p in impl.physical_tables()}
                if impl.extra_bytes():
                    parts[f"{t.name} (maps)"] = impl.extra_bytes()
                kinds = sorted({dts[p.name(t.name)] for p in impl.physical_tables()})
                tables[t.name] = TableMemory(f"{impl.name}/{'+'.join(kinds)}", sum(parts.values()), t.num_embeddings * t.embedding_dim * 4, parts)
    return MemoryReport(tables)


def _inside_compressed(model: nn.Module, qebc: nn.Module) -> bool:
    return any(isinstance(m, CompressedEmbeddingBagCollection) and any(qebc is i for i in m.inner_collections()) for m in model.modules())


class _ValuesOf(nn.Module):
    """``model(kjt).values()``: a tensor output for torch.export."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, kjt):  # type: ignore[no-untyped-def]
        return self.model(kjt).values()


def to_program(model: nn.Module, example_kjt) -> "torch.export.ExportedProgram":  # type: ignore[no-untyped-def]
    """``torch.export`` program of an exported (quantized) embedding module for serving.

    Input checks are compiled out (they read tensor values on the host). The program is
    specialized to the example's shapes (batch size and number of ids): TorchRec's KJT
    does not yet export with dynamic jagged sizes here, so export one program per
    serving shape, or pad requests to it. ``torch.export.save`` / ``load`` round-trip it.
    """
    m = copy.deepcopy(model).eval()
    for sub in m.modules():
        if isinstance(sub, CompressedEmbeddingBagCollection):
            sub._validate = False
    with torch.no_grad():
        return torch.export.export(_ValuesOf(m), (example_kjt,), strict=False)


def load_program(path: str) -> "torch.export.ExportedProgram":
    """``torch.export.load`` with TorchRec's KJT allowed in the saved example inputs."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    with torch.serialization.safe_globals([KeyedJaggedTensor]):
        return torch.export.load(path)
