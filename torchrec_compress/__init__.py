"""torchrec-compress: embedding-table compression schemes for TorchRec.

Public API::

    from torchrec_compress import CompressedEmbeddingBagCollection, compress_, fit_, Hashing, QR, MEmCom, sharders

Names are imported on first use (PEP 562), so ``torchrec-compress --help`` does not wait
for torchrec's import.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "SchemeConfig": ".config",
    "register_scheme": ".config",
    "CompressedEmbeddingBagCollection": ".modules",
    "MemoryReport": ".modules",
    "TableMemory": ".modules",
    "compress_": ".modules.compress",
    "fit_": ".modules.compress",
    "FIITED": ".schemes",
    "FreqThreshold": ".schemes",
    "Hashing": ".schemes",
    "MEmCom": ".schemes",
    "MPE": ".schemes",
    "MemRec": ".schemes",
    "MixedDim": ".schemes",
    "QR": ".schemes",
    "Saec": ".schemes",
    "sharders": ".distributed.sharders",
}
__all__ = sorted(_WHERE)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'torchrec_compress' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(list(globals()) + __all__)
