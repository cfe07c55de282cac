"""Criteo TSV reader: layouts written by the test (missing values, malformed rows, gzip) and the real samples."""
import math
import os

import pytest
import torch

from torchrec_compress.data.criteo import CriteoTSV
from torchrec_compress.testing.data import write_lines

SIZES = [1000] * 26
GOOD = "1\t" + "\t".join(["5", "", "-1"] + ["2"] * 10) + "\t" + "\t".join(["68fd1e64", ""] + ["0000000a"] * 24)


def test_values_missing_and_hashing(tmp_path):
    p = write_lines(tmp_path / "a.tsv.gz", [GOOD, GOOD.replace("1\t5", "0\t7", 1)])
    (b,) = list(CriteoTSV([p], SIZES, batch_size=8))
    assert b.labels.tolist() == [1.0, 0.0]
    assert b.dense_features.shape == (2, 13)
    assert b.dense_features[0, 0].item() == pytest.approx(math.log(6))
    assert b.dense_features[0, 1].item() == 0.0 and b.dense_features[0, 2].item() == 0.0  # missing, negative
    kjt = b.sparse_features
    assert kjt.keys()[0] == "cat_0" and kjt.stride() == 2
    assert kjt["cat_0"].values().tolist() == [int("68fd1e64", 16) % 1000] * 2
    assert kjt["cat_1"].values().tolist() == [0, 0]  # missing id
    assert kjt["cat_2"].values().tolist() == [10, 10]


def test_malformed_rows_are_counted_and_skipped(tmp_path):
    bad = [
        "",                                      # empty line
        GOOD + "\textra",                        # too many columns
        GOOD.replace("\t5\t", "\tfive\t", 1),    # non-numeric int
        GOOD.replace("68fd1e64", "zzzz", 1),     # non-hex id
        "7" + GOOD[1:],                          # bad label
        "\t".join(GOOD.split("\t")[:30]),        # short row: padded, kept
    ]
    p = write_lines(tmp_path / "b.tsv", [GOOD] * 20 + bad, gz=False)
    reader = CriteoTSV([p], SIZES, batch_size=7)
    batches = list(reader)
    assert sum(b.labels.numel() for b in batches) == 21
    s = reader.summary
    assert s.rows == 21 and s.padded == 1
    assert s.skipped == {"empty lines": 1, "rows with too many columns": 1, "non-numeric ints": 1, "non-hex ids": 1, "bad labels": 1}
    assert "21 rows read (1 short rows padded)" in str(s) and "1 non-hex ids" in str(s)


def test_truncated_gzip_and_mostly_garbage(tmp_path):
    p = write_lines(tmp_path / "c.tsv.gz", [GOOD] * 2000)
    raw = (tmp_path / "c.tsv.gz").read_bytes()
    (tmp_path / "t.tsv.gz").write_bytes(raw[: len(raw) // 2])
    reader = CriteoTSV([str(tmp_path / "t.tsv.gz"), p], SIZES, batch_size=500)
    n = sum(b.labels.numel() for b in reader)
    assert 2000 < n < 4000 and reader.summary.truncated_files
    garbage = write_lines(tmp_path / "g.tsv", ["not\ta\tcriteo\tfile"] * 300, gz=False)
    with pytest.raises(ValueError, match=r"of the first 100 lines are malformed"):
        list(CriteoTSV([garbage], SIZES, batch_size=10))


def test_ranks_split_batches(tmp_path):
    p = write_lines(tmp_path / "d.tsv", [GOOD] * 10, gz=False)
    a = list(CriteoTSV([p], SIZES, batch_size=3, rank=0, world_size=2))
    b = list(CriteoTSV([p], SIZES, batch_size=3, rank=1, world_size=2))
    assert [x.labels.numel() for x in a] == [3, 3] and [x.labels.numel() for x in b] == [3, 1]


@pytest.mark.data
def test_real_samples_and_ragged_head(shared_data):
    train = os.path.join(shared_data, "criteo_kaggle_sample", "criteo_train_10k.tsv.gz")
    head = os.path.join(shared_data, "criteo-kaggle-head", "train_head1000.txt.gz")
    big = [10**7] * 26
    r = CriteoTSV([train], big, batch_size=1000)
    full = list(r)
    assert r.summary.rows == 10_000 and r.summary.bad == 0
    h = CriteoTSV([head], big, batch_size=1000)
    (hb,) = list(h)
    assert h.summary.rows == 1000 and h.summary.padded == 498 and h.summary.bad == 0  # PROVENANCE: 502 full rows
    # the ragged copy parses to the same tensors as the first 1000 rows of the full-width file
    assert torch.equal(hb.labels, full[0].labels)
    assert torch.equal(hb.dense_features, full[0].dense_features)
    assert torch.equal(hb.sparse_features.values(), full[0].sparse_features.values())
    test = CriteoTSV([os.path.join(shared_data, "criteo_kaggle_sample", "criteo_test_unlabeled_10k.tsv.gz")], big, batch_size=5000, labelled=False)
    assert sum(b.labels.numel() for b in test) == 10_000 and test.summary.bad == 0
