"""Avazu CTR (Kaggle 2014) CSV reader with a fixed seeded train/validation/test split.

File layout: ``id,click,hour,C1,banner_pos,site_id,...,C21`` (24 comma-separated columns;
the header line is optional, recognised by its first field being ``id``). Features: every
column except ``id`` and ``click`` (22 categorical fields, :data:`AVAZU_FEATURES`);
``hour`` (``YYMMDDHH``) becomes the hour of day (``hour % 100``), kept as a categorical
field named ``hour``. Avazu has no dense features: batches carry one constant dense
feature (``1.0``), as Frappe's do, because DLRM needs a dense input.

Categorical raw strings become ids in one of two modes:

- ``"vocab"`` (default, what the benchmark uses): a per-field vocabulary built from the
  TRAINING split only. Values seen at least ``min_count`` times in train get ids ``1..V``
  by frequency rank (ties: by raw value); id ``0`` is the out-of-vocabulary row, shared by
  train values rarer than ``min_count`` and by validation / test values never seen in
  train. Tables have ``V + 1`` rows. The default ``min_count=2`` makes train's singletons
  train the OOV row, which is what unseen validation / test values then look up (with
  ``min_count=1`` row 0 would never be trained).
- ``"hash"``: ``crc32(raw) mod num_embeddings[i]`` (stable across runs and machines, like
  the Criteo reader's ``mod num_embeddings``); no vocabulary, no OOV row.

Robustness (as :class:`~torchrec_compress.data.criteo.CriteoTSV`): empty lines, rows with
the wrong number of columns, bad click values, bad hours and repeated header lines are
counted and skipped in a :class:`CsvReadSummary`; a truncated gzip ends the file with a
note; a file whose lines are mostly malformed raises ``ValueError`` naming the file. The
whole file is read into memory (meant for samples, not the 40M-row original).

Splits, vocabularies and the robust line loop: :mod:`torchrec_compress.data.tabular`.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from .tabular import DEFAULT_FRACTIONS, CsvReadSummary, CtrData, make_ctr_data, read_csv_rows

AVAZU_COLUMNS: List[str] = [
    "id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id", "app_domain",
    "app_category", "device_id", "device_ip", "device_model", "device_type", "device_conn_type",
    "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
]
AVAZU_FEATURES: List[str] = AVAZU_COLUMNS[2:]  # 22 fields; "hour" is the hour of day


def read_avazu_csv(path: str, max_bad_fraction: float = 0.5, min_rows_for_check: int = 100
                   ) -> Tuple[List[List[str]], torch.Tensor, CsvReadSummary]:
    """Read an Avazu CSV (``.gz`` or plain, header optional). Returns ``(columns, labels,
    summary)``: ``columns`` = 22 lists (one per :data:`AVAZU_FEATURES`) of N raw strings
    (``hour`` already as the hour of day, ``"0".."23"``), ``labels [N]`` float clicks.
    Skips (and counts) empty lines, rows without 24 columns, clicks other than 0/1 and hours
    that are not ``YYMMDDHH`` with ``HH < 24``."""
    summary = CsvReadSummary(name="avazu")
    width = len(AVAZU_COLUMNS)

    def parse(cols: List[str]) -> Optional[tuple]:
        if len(cols) != width:
            summary.skip("rows with the wrong number of columns")
            return None
        if cols[1] not in ("0", "1"):
            summary.skip("bad click values")
            return None
        h = cols[2]
        if not (h.isdigit() and int(h) % 100 < 24):
            summary.skip("bad hour values")
            return None
        cols[2] = str(int(h) % 100)
        return (cols[1] == "1", cols[2:])

    rows = list(read_csv_rows(path, summary, parse, AVAZU_COLUMNS, max_bad_fraction, min_rows_for_check))
    labels = torch.tensor([float(r[0]) for r in rows])
    columns = [list(c) for c in zip(*(r[1] for r in rows))]
    return columns, labels, summary


def load_avazu(path: str, seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS, mode: str = "vocab",
               min_count: int = 2, num_embeddings: Union[None, int, Sequence[int]] = None,
               max_bad_fraction: float = 0.5) -> CtrData:
    """Avazu CSV -> :class:`CtrData` (22 features, ``dense_in`` 1): a fixed seeded permutation
    split 80/10/10 (:func:`split_indices`; the sample is one hour, so no time split), ids from
    train-only vocabularies (default; OOV/rare = 0, tables ``V + 1`` rows) or ``mode="hash"``
    with ``num_embeddings``. On the 9,999-row sample: 7,999 / 999 / 1,001 rows."""
    columns, labels, summary = read_avazu_csv(path, max_bad_fraction)
    return make_ctr_data("avazu", AVAZU_FEATURES, columns, labels, summary, seed, fractions, mode, min_count, num_embeddings)
