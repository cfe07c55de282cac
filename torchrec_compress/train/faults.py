"""Fault injection for the reliability tests: ``TORCHREC_COMPRESS_FAULT=<point>:<rank>:<step>``
makes that rank SIGKILL itself at ``point`` (``step``: after that optimizer step;
``save``: inside the checkpoint of that step, after the shards are written and before the
rename). Unset, it costs one dictionary lookup per step."""
from __future__ import annotations

import os
import signal

ENV = "TORCHREC_COMPRESS_FAULT"
POINTS = ("step", "save")


def maybe_kill(point: str, rank: int, step: int) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    try:
        where, r, s = spec.split(":")
        r, s = int(r), int(s)
    except ValueError:
        raise ValueError(f"{ENV}={spec!r}: expected <point>:<rank>:<step> with point in {POINTS}") from None
    if where not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: point must be one of {POINTS}")
    if (where, r, s) == (point, rank, step):
        os.kill(os.getpid(), signal.SIGKILL)
