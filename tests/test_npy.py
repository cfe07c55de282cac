"""TorchRec's npy layouts: one-hot days (TorchRec's own reader) and MLPerf DLRMv2 multi-hot npz days."""
import numpy as np
import pytest
import torch

from torchrec_compress.data.mlperf import DLRMV2_MULTI_HOT
from torchrec_compress.data.npy import CriteoNpy, MultiHotCriteoNpy
from torchrec_compress.data.synthetic import SyntheticCriteo

CARDS = [50 + 7 * i for i in range(26)]
HOT = [1, 3, 2] + [1] * 20 + [4, 1, 2]


def _write_days(root, rows_per_day, multi_hot=None, seed=0):
    """Day files in TorchRec's layouts, from the synthetic stream; returns (dense, labels, bags per feature)."""
    out = []
    for d, n in enumerate(rows_per_day):
        b = SyntheticCriteo([10**6] * 26, n, 1, seed=seed + d, multi_hot=multi_hot).batch(0)
        dense = np.log(np.exp(b.dense_features.numpy()) + 2).astype(np.float32)  # log(x + 3) of the counts
        labels = b.labels.numpy().astype(np.int32).reshape(-1, 1)
        np.save(root / f"day_{d}_dense.npy", dense)
        np.save(root / f"day_{d}_labels.npy", labels)
        per_f = b.sparse_features.to_dict()
        bags = [per_f[f"cat_{f}"].values().view(n, -1).numpy().astype(np.int32) for f in range(26)]
        if multi_hot is None:
            np.save(root / f"day_{d}_sparse.npy", np.stack([x[:, 0] for x in bags], axis=1))
        else:
            np.savez(root / f"day_{d}_sparse_multi_hot.npz", **{str(f): x for f, x in enumerate(bags)})
        out.append((dense, labels.reshape(-1), bags))
    return out


def _concat(days):
    return (np.concatenate([d[0] for d in days]), np.concatenate([d[1] for d in days]),
            [np.concatenate([d[2][f] for d in days]) for f in range(26)])


def test_one_hot_days_through_torchrec_reader(tmp_path):
    dense, labels, bags = _concat(_write_days(tmp_path, [70, 50]))
    batches = list(CriteoNpy(str(tmp_path), [0, 1], CARDS, batch_size=32))
    assert len(batches) == 3  # 120 rows, 32 per batch, last partial dropped
    b = batches[1]
    rows = slice(32, 64)
    torch.testing.assert_close(b.dense_features, torch.from_numpy(dense[rows]))
    assert b.labels.dtype == torch.float32 and b.labels.tolist() == labels[rows].tolist()
    per_f = b.sparse_features.to_dict()
    for f in (0, 13, 25):
        assert per_f[f"cat_{f}"].values().tolist() == (bags[f][rows, 0] % CARDS[f]).tolist()


def test_multi_hot_days_straddle_files_and_split_over_ranks(tmp_path):
    dense, labels, bags = _concat(_write_days(tmp_path, [70, 50], multi_hot=HOT))
    full = list(MultiHotCriteoNpy(str(tmp_path), [0, 1], CARDS, HOT, batch_size=16))
    assert len(full) == 7  # 120 // 16
    b = full[4]  # rows 64..80 straddle day 0 (70 rows) and day 1
    rows = slice(64, 80)
    torch.testing.assert_close(b.dense_features, torch.from_numpy(dense[rows]))
    assert b.labels.tolist() == labels[rows].astype(np.float32).tolist()
    per_f = b.sparse_features.to_dict()
    for f in range(26):
        jt = per_f[f"cat_{f}"]
        assert jt.lengths().tolist() == [HOT[f]] * 16
        assert jt.values().tolist() == (bags[f][rows] % CARDS[f]).reshape(-1).tolist()
    r0 = list(MultiHotCriteoNpy(str(tmp_path), [0, 1], CARDS, HOT, batch_size=16, rank=0, world_size=2))
    r1 = list(MultiHotCriteoNpy(str(tmp_path), [0, 1], CARDS, HOT, batch_size=16, rank=1, world_size=2))
    assert len(r0) == len(r1) == 3  # 7 global batches: the 7th cannot be shared evenly
    assert torch.equal(r1[2].labels, full[5].labels) and torch.equal(r0[2].dense_features, full[4].dense_features)
    val = list(MultiHotCriteoNpy(str(tmp_path), [0], CARDS, HOT, batch_size=16, stage="val"))
    test = list(MultiHotCriteoNpy(str(tmp_path), [0], CARDS, HOT, batch_size=16, stage="test"))
    assert torch.equal(val[0].dense_features, torch.from_numpy(dense[:16])) and torch.equal(test[0].dense_features, torch.from_numpy(dense[35:51]))


def test_multi_hot_errors_name_file_and_feature(tmp_path):
    _write_days(tmp_path, [20], multi_hot=HOT)
    wrong = list(HOT)
    wrong[1] = 2
    with pytest.raises(ValueError, match=r"day_0_sparse_multi_hot.npz: feature cat_1 has shape \(20, 3\), expected \[20, 2\]"):
        list(MultiHotCriteoNpy(str(tmp_path), [0], CARDS, wrong, batch_size=8))
    with pytest.raises(FileNotFoundError, match="day_1_dense.npy not found"):
        MultiHotCriteoNpy(str(tmp_path), [0, 1], CARDS, HOT, batch_size=8)
    z = dict(np.load(tmp_path / "day_0_sparse_multi_hot.npz"))
    z["3"][2, 0] = -5
    np.savez(tmp_path / "day_0_sparse_multi_hot.npz", **z)
    with pytest.raises(ValueError, match="feature cat_3 has negative id -5"):
        list(MultiHotCriteoNpy(str(tmp_path), [0], CARDS, HOT, batch_size=8))


def test_synthetic_multi_hot_extends_the_one_hot_stream():
    one = SyntheticCriteo(CARDS, 64, 1, seed=3).batch(0)
    multi = SyntheticCriteo(CARDS, 64, 1, seed=3, multi_hot=DLRMV2_MULTI_HOT).batch(0)
    assert torch.equal(one.labels, multi.labels) and torch.equal(one.dense_features, multi.dense_features)
    a, m = one.sparse_features.to_dict(), multi.sparse_features.to_dict()
    for f, h in enumerate(DLRMV2_MULTI_HOT):
        bags = m[f"cat_{f}"].values().view(64, h)
        assert m[f"cat_{f}"].lengths().tolist() == [h] * 64
        assert torch.equal(bags[:, 0], a[f"cat_{f}"].values())  # the one-hot id leads its bag
        assert int(bags.min()) >= 0 and int(bags.max()) < CARDS[f]
    big = m["cat_20"].values().view(64, 100)  # 100 ids per bag, spread over the table
    assert len(set(big[0].tolist())) > 50
    with pytest.raises(ValueError, match="multi_hot must give one size >= 1 per feature"):
        SyntheticCriteo(CARDS, 4, 1, multi_hot=[1, 2])


@pytest.mark.parametrize("kind", ["criteo_npy", "criteo_multihot"])
def test_train_cli_on_npy_days(tmp_path, kind):
    import json

    from torchrec_compress.cli import main

    _write_days(tmp_path, [96, 64, 40], multi_hot=HOT if kind == "criteo_multihot" else None)
    out = tmp_path / "run"
    main(["train", "--config", "examples/synthetic.yaml", f"out={out}", f"data.kind={kind}", f"data.root={tmp_path}",
          "data.train_days=[0, 1]", "data.eval_days=[2]", "data.batch_size=16", f"data.cardinalities={CARDS}", "schemes={}",
          *([f"data.multi_hot={HOT}"] if kind == "criteo_multihot" else [])])
    ep = json.loads((out / "results.json").read_text())["epochs"][0]
    assert ep["steps"] == 10 and ep["eval_samples"] == 16  # 160 rows / 16; validation = first half of day 2 (20 rows)
