"""MovielensLatest_x1 (BARS / FuxiCTR; He & Chua's ml-tag) CSV reader with a fixed seeded split.

File layout: ``label,user_id,item_id,tag_id`` (header optional, recognised by its first
field being ``label``); the three ids are integers from one shared index space. Each field
is re-indexed on its own, from the TRAINING split only (:func:`~torchrec_compress.data.tabular.build_vocabulary`):
values seen at least ``min_count`` times in train get ids ``1..V`` by frequency rank (ties:
by raw value), id ``0`` is the out-of-vocabulary row (train values rarer than
``min_count``, validation / test values never seen in train); tables have ``V + 1`` rows.
``mode="hash"`` instead takes ``crc32(str(raw)) mod num_embeddings``. No dense features:
batches carry one constant dense feature (``1.0``). Ids are kept in a
:class:`~torchrec_compress.data.tabular.CtrData` like Avazu's.

Robustness as the Avazu / Criteo readers: empty lines, rows without 4 columns, labels other
than 0/1, non-integer ids and repeated header lines are counted and skipped in the summary;
a truncated gzip ends the file with a note; a mostly malformed file raises ``ValueError``
naming the file. The file ``../shared/data/movielenslatest_x1`` holds is MovieLens-derived
(GroupLens terms: read it at run time, never copy it).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from .tabular import DEFAULT_FRACTIONS, CsvReadSummary, CtrData, make_ctr_data, read_csv_rows

MOVIELENS_COLUMNS: List[str] = ["label", "user_id", "item_id", "tag_id"]
MOVIELENS_FEATURES: List[str] = MOVIELENS_COLUMNS[1:]


def read_movielens_csv(path: str, max_bad_fraction: float = 0.5, min_rows_for_check: int = 100
                       ) -> Tuple[List[List[int]], torch.Tensor, CsvReadSummary]:
    """Read a MovielensLatest_x1 CSV (``.gz`` or plain, header optional). Returns ``(columns,
    labels, summary)``: ``columns`` = 3 lists (user_id, item_id, tag_id) of N raw ints,
    ``labels [N]`` float in {0, 1}."""
    summary = CsvReadSummary(name="movielens")
    width = len(MOVIELENS_COLUMNS)

    def parse(cols: List[str]) -> Optional[tuple]:
        if len(cols) != width:
            summary.skip("rows with the wrong number of columns")
            return None
        if cols[0] not in ("0", "1"):
            summary.skip("bad labels")
            return None
        try:
            ids = [int(c) for c in cols[1:]]
        except ValueError:
            summary.skip("non-integer ids")
            return None
        return (cols[0] == "1", ids)

    rows = list(read_csv_rows(path, summary, parse, MOVIELENS_COLUMNS, max_bad_fraction, min_rows_for_check))
    labels = torch.tensor([float(r[0]) for r in rows])
    columns = [list(c) for c in zip(*(r[1] for r in rows))]
    return columns, labels, summary


def load_movielens(path: str, seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS, mode: str = "vocab",
                   min_count: int = 2, num_embeddings: Union[None, int, Sequence[int]] = None,
                   max_bad_fraction: float = 0.5) -> CtrData:
    """MovielensLatest_x1 CSV -> :class:`CtrData` (features user_id, item_id, tag_id; ``dense_in``
    1): a fixed seeded permutation split 80/10/10 (seed 0 by default), per-field ids from
    train-only vocabularies (OOV/rare = 0, tables ``V + 1`` rows) or ``mode="hash"``. On the
    200,686-row test file of the benchmark: 160,548 / 20,068 / 20,070 rows."""
    columns, labels, summary = read_movielens_csv(path, max_bad_fraction)
    return make_ctr_data("movielens", MOVIELENS_FEATURES, columns, labels, summary, seed, fractions, mode, min_count, num_embeddings)
