"""Distributed pieces: sharders, the sharded twin of the compressed module, plans, the
compression-aware planner, and the collectives and state helpers schemes use when sharded.
Names are imported on first use (the unsharded module imports ``distributed.state``)."""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"CpuRowWiseEmbeddingBagCollectionSharder": ".ebc_sharder", "sharders": ".sharders"}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'torchrec_compress.distributed' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
