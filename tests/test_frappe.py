"""Frappe (real data, read from ../shared/data/frappe at run time; skipped when absent)."""
import gzip
import os

import pytest
import torch

from torchrec_compress.data.frappe import FRAPPE_CARDINALITIES, FRAPPE_FIELDS, load_frappe, read_libfm
from torchrec_compress.train import local_process_group

pytestmark = pytest.mark.data


def test_reader_on_the_real_files(shared_data):
    train, test = load_frappe(os.path.join(shared_data, "frappe"))
    assert train.ids.shape == (57722, 10) and test.ids.shape == (28860, 10)
    assert abs(train.labels.mean().item() - 0.330) < 0.001  # PROVENANCE.md: positive rate 0.330
    assert (train.ids.max(0).values < torch.tensor(FRAPPE_CARDINALITIES)).all() and train.ids.min() >= 0
    b = next(train.batches(8))
    assert b.sparse_features.keys() == FRAPPE_FIELDS and b.sparse_features.stride() == 8
    assert torch.equal(b.sparse_features["item"].values(), train.ids[:8, 1])


def test_reader_rejects_malformed_rows(tmp_path):
    p = tmp_path / "bad.libfm.gz"
    with gzip.open(p, "wt") as f:
        f.write("1 266:1 1244:1 5042:1 5049:1 5054:1 5055:1 5058:1 5062:1 5074:1 5149:1\n")
        f.write("0 1:1 2:1\n")
    with pytest.raises(ValueError, match=r"bad.libfm.gz:2: expected a label"):
        read_libfm(str(p))
    with gzip.open(p, "wt") as f:  # an index of the item field in the user column
        f.write("1 1244:1 1244:1 5042:1 5049:1 5054:1 5055:1 5058:1 5062:1 5074:1 5149:1\n")
    with pytest.raises(ValueError, match=r"row 1, field 'user': global index 1244"):
        read_libfm(str(p))


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["freq_threshold", "saec", "memrec", "fiited"])
def test_schemes_train_on_frappe(shared_data, scheme):
    from torchrec_compress.benchmarks.quality import frappe_data, run_one

    with local_process_group():
        r = run_one(frappe_data(os.path.join(shared_data, "frappe")), scheme, 4.0, seed=0, epochs=3)
    assert r["achieved_ratio"] >= 3.9
    assert r["auc"] > 0.88  # uncompressed reaches ~0.94 at 5 epochs; a chance model 0.5
