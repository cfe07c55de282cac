"""MovielensLatest_x1 CSV reader: hand-made files (exact ids, labels, skip counts), the fixed
split, and the real 200,686-row file (read from ../shared/data/movielenslatest_x1 at run
time; skipped when absent)."""
import os
import random
import zlib

import pytest
import torch

from torchrec_compress.data.tabular import CtrData
from torchrec_compress.data.movielens import MOVIELENS_COLUMNS, MOVIELENS_FEATURES, load_movielens, read_movielens_csv
from torchrec_compress.testing.data import write_lines

MOVIELENS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "movielenslatest_x1",
                                         "movielenslatest_x1_test_200k.csv.gz"))
HEADER = ",".join(MOVIELENS_COLUMNS)
# (label, user, item, tag); with 10 rows and seed 0 the split is train 0,1,3,4,5,7,8,9 / validation 6 / test 2
GOOD = [(1, 5, 100, 7), (0, 5, 101, 7), (0, 6, 100, 8), (1, 7, 102, 7), (0, 5, 100, 9),
        (1, 6, 101, 7), (0, 8, 100, 7), (0, 7, 101, 9), (1, 5, 103, 7), (0, 6, 100, 9)]
BAD = ["1,2,3", "1,2,3,4,5", "2,5,100,7", "yes,5,100,7", "1,abc,100,7", "0,5,1.5,7", "0,5,100,", "", HEADER]
EXPECTED_SKIPS = {"rows with the wrong number of columns": 2, "bad labels": 2, "non-integer ids": 3, "empty lines": 1,
                  "repeated header lines": 1}


def write(path, lines, header=True, gz=True) -> str:
    return write_lines(path, lines, HEADER if header else None, gz)


def mixed_lines():
    out = []
    for i, r in enumerate(GOOD):  # a bad line after each of the first 9 good ones
        out.append(",".join(map(str, r)))
        if i < len(BAD):
            out.append(BAD[i])
    return out


@pytest.mark.parametrize("header,gz", [(True, True), (False, True), (True, False)])
def test_reader_exact_values_and_skips(tmp_path, header, gz):
    columns, labels, summary = read_movielens_csv(write(tmp_path / ("m.csv.gz" if gz else "m.csv"), mixed_lines(), header, gz))
    assert summary.rows == 10 and summary.header is header and summary.skipped == EXPECTED_SKIPS and not summary.truncated_files
    assert labels.tolist() == [r[0] for r in GOOD]
    assert columns == [[r[k] for r in GOOD] for k in (1, 2, 3)]  # raw ints


def test_load_reindexes_each_field_from_train_only(tmp_path):
    d = load_movielens(write(tmp_path / "m.csv.gz", mixed_lines()))
    assert isinstance(d, CtrData) and d.features == MOVIELENS_FEATURES and d.dense_in == 1
    assert [len(s) for s in d.splits] == [8, 1, 1]
    # train users 5 x4, 6 x2, 7 x2 -> 1, 2, 3; items 100 x3, 101 x3 -> 1, 2 (102, 103 once: OOV); tags 7 x5, 9 x3 -> 1, 2
    assert d.cardinalities == [4, 3, 3]
    assert d.vocabularies == [{5: 1, 6: 2, 7: 3}, {100: 1, 101: 2}, {7: 1, 9: 2}]
    assert d.train.ids.t().tolist() == [[1, 1, 3, 1, 2, 3, 1, 2], [1, 2, 0, 1, 2, 2, 0, 1], [1, 1, 1, 2, 1, 2, 1, 2]]
    assert d.train.labels.tolist() == [1, 0, 1, 0, 1, 0, 1, 0]
    assert d.validation.ids.tolist() == [[0, 1, 1]] and d.validation.labels.tolist() == [0]  # user 8 unseen in train
    assert d.test.ids.tolist() == [[2, 1, 0]] and d.test.labels.tolist() == [0]  # tag 8 unseen in train
    b = next(d.train.batches(4))
    assert b.sparse_features.keys() == MOVIELENS_FEATURES and torch.equal(b.sparse_features["item_id"].values(), torch.tensor([1, 2, 0, 1]))
    assert torch.equal(b.dense_features, torch.ones(4, 1))
    d1 = load_movielens(write(tmp_path / "m.csv.gz", mixed_lines()), min_count=1)
    assert d1.cardinalities == [4, 5, 3] and d1.vocabularies[1] == {100: 1, 101: 2, 102: 3, 103: 4}
    h = load_movielens(write(tmp_path / "m.csv.gz", mixed_lines()), mode="hash", num_embeddings=[11, 13, 17])
    assert h.cardinalities == [11, 13, 17] and h.test.ids.tolist() == [[zlib.crc32(b"6") % 11, zlib.crc32(b"100") % 13, zlib.crc32(b"8") % 17]]
    other = load_movielens(write(tmp_path / "m.csv.gz", mixed_lines()), seed=3)
    assert not torch.equal(other.train.labels, d.train.labels) or not torch.equal(other.train.ids, d.train.ids)


def test_truncated_gzip_and_garbage(tmp_path):
    rng = random.Random(0)
    lines = [f"{rng.randint(0, 1)},{rng.randint(0, 90000)},{rng.randint(0, 90000)},{rng.randint(0, 90000)}" for _ in range(3000)]
    full = tmp_path / "full.csv.gz"
    write(full, lines)
    data = full.read_bytes()
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(data[: len(data) // 2])
    complete = zlib.decompressobj(31).decompress(cut.read_bytes()).count(b"\n") - 1  # whole lines readable, less the header
    columns, labels, summary = read_movielens_csv(str(cut))
    assert 0 < summary.rows == complete < 3000 and not summary.skipped
    assert len(summary.truncated_files) == 1 and "cut.csv.gz" in summary.truncated_files[0]
    assert columns[0] == [int(x.split(",")[1]) for x in lines[:complete]]
    with pytest.raises(ValueError, match=r"junk.csv.gz: \d+ of the first 100 lines are malformed"):
        read_movielens_csv(write(tmp_path / "junk.csv.gz", lines[:10] + ["<html>not a csv</html>"] * 200))
    with pytest.raises(ValueError, match=r"avazu.csv.gz: header 'label,user_id,item_id'"):  # another layout behind a 'label' header
        read_movielens_csv(write(tmp_path / "avazu.csv.gz", ["label,user_id,item_id", "1,2,3"], header=False))
    with pytest.raises(ValueError, match=r"hdr.csv.gz: no valid rows"):
        read_movielens_csv(write(tmp_path / "hdr.csv.gz", []))


# ----------------------------------------------------------------------------- the real file


@pytest.fixture(scope="module")
def real() -> CtrData:
    if not os.path.exists(MOVIELENS):
        pytest.skip(f"MovielensLatest_x1 not found at {MOVIELENS}")
    return load_movielens(MOVIELENS)


@pytest.mark.data
def test_real_file(real):
    assert real.summary.rows == 200686 and not real.summary.skipped and real.summary.header  # PROVENANCE.md
    labels = torch.cat([s.labels for s in real.splits])
    assert labels.sum().item() == 66850  # positive rate 0.333
    assert [len(s) for s in real.splits] == [160548, 20068, 20070]
    # distinct values over all rows (PROVENANCE.md): users 11,412, items 16,602, tags 47,203; train-only, min_count 2, + OOV row:
    assert real.cardinalities == [6430, 10527, 34956]  # pinned: the split and vocabulary are fixed
    for s in real.splits:
        assert s.ids.min() >= 0 and (s.ids < torch.tensor(real.cardinalities)).all()
    train_oov = (real.train.ids == 0).float().mean(0)
    test_oov = (real.test.ids == 0).float().mean(0)
    assert (train_oov < 0.2).all() and (test_oov > train_oov).all()  # unseen ids are OOV; rare train ids too


@pytest.mark.data
def test_dlrm_learns_movielens(real):
    from torchrec_compress.testing.runs import train_ctr_dlrm

    val, test = train_ctr_dlrm(real, 2048, 8192)
    # measured: 1-2 epochs, seeds 0-2, split seeds 0-1: validation and test 0.908-0.918
    assert val["auc"] > 0.89 and test["auc"] > 0.89 and test["samples"] == 20070
