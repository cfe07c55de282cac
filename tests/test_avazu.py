"""Avazu CSV reader: hand-made files (exact ids, labels, skip counts), the fixed split, and the
real 9,999-row sample (read from ../shared/data/avazu_sample at run time; skipped when absent)."""
import gzip
import os
import random
import zlib

import pytest
import torch

from torchrec_compress.data.avazu import AVAZU_COLUMNS, AVAZU_FEATURES, load_avazu, read_avazu_csv
from torchrec_compress.data.tabular import CtrData, CtrSplit, build_vocabulary, split_indices
from torchrec_compress.testing.data import write_lines

AVAZU = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "avazu_sample", "avazu_train_10k.csv.gz"))
HEADER = ",".join(AVAZU_COLUMNS)
F = {f: i for i, f in enumerate(AVAZU_FEATURES)}


def row(i: int, click="0", hour=None, **values) -> str:
    """24 columns: id, click, hour, then 21 categoricals (``x`` unless given)."""
    cats = [values.get(c, "x") for c in AVAZU_COLUMNS[3:]]
    return ",".join([str(100 + i), str(click), hour if hour is not None else f"141021{i % 3:02d}", *cats])


def good(i: int) -> str:
    """Row i of the hand-made set: clicks at 1, 4, 6; hour of day i % 3; C1 1005 (row 2: 1002);
    site_id unique; app_id a (rows 0-6) / b; device_ip ip{i % 4}."""
    return row(i, click=int(i in (1, 4, 6)), C1="1002" if i == 2 else "1005", site_id=f"s{i}", app_id="a" if i < 7 else "b",
               device_ip=f"ip{i % 4}")


BAD = [
    ",".join(good(0).split(",")[:-1]),  # 23 columns
    good(0) + ",extra",  # 25 columns
    row(50, click="2"),
    row(51, click=""),
    row(52, hour="1410210x"),
    row(53, hour="14102124"),
    "",
    HEADER,  # a repeated header
]
EXPECTED_SKIPS = {"rows with the wrong number of columns": 2, "bad click values": 2, "bad hour values": 2, "empty lines": 1,
                  "repeated header lines": 1}


def write(path, lines, header=True, gz=True) -> str:
    return write_lines(path, lines, HEADER if header else None, gz)


def mixed_lines():
    lines = [good(i) for i in range(10)]
    lines[3] += "\r"  # a Windows line ending is fine
    out = []
    for i, line in enumerate(lines):  # a bad line after each of the first 8 good ones
        out.append(line)
        if i < len(BAD):
            out.append(BAD[i])
    return out


@pytest.mark.parametrize("header,gz", [(True, True), (False, True), (True, False)])
def test_reader_exact_values_and_skips(tmp_path, header, gz):
    path = write(tmp_path / ("a.csv.gz" if gz else "a.csv"), mixed_lines(), header=header, gz=gz)
    columns, labels, summary = read_avazu_csv(path)
    assert summary.rows == 10 and summary.header is header and summary.skipped == EXPECTED_SKIPS and not summary.truncated_files
    assert "avazu: 10 rows read" in str(summary)
    assert len(columns) == 22 and all(len(c) == 10 for c in columns)
    assert labels.tolist() == [0, 1, 0, 0, 1, 0, 1, 0, 0, 0]
    assert columns[F["hour"]] == ["0", "1", "2", "0", "1", "2", "0", "1", "2", "0"]  # hour of day
    assert columns[F["site_id"]] == [f"s{i}" for i in range(10)]
    assert columns[F["C21"]][3] == "x"  # the \r is not part of the last field


def test_vocabulary_by_frequency_rank():
    assert build_vocabulary(["b", "a", "b", "c", "a", "b", "d"], min_count=2) == {"b": 1, "a": 2}
    assert build_vocabulary(["b", "a", "b", "c", "a", "b", "d"], min_count=1) == {"b": 1, "a": 2, "c": 3, "d": 4}
    assert build_vocabulary(["y", "x", "y", "x"]) == {"x": 1, "y": 2}  # ties: by raw value
    assert build_vocabulary([10, 9, 10, 9]) == {9: 1, 10: 2}  # ints compare as ints


def test_split_is_fixed_and_a_partition():
    train, val, test = split_indices(10, seed=0)
    assert (train.tolist(), val.tolist(), test.tolist()) == ([0, 1, 3, 4, 5, 7, 8, 9], [6], [2])  # pinned: the split is fixed
    for n in (9999, 200686, 7):
        parts = split_indices(n, seed=0)
        assert [p.numel() for p in parts] == [int(n * 0.8), int(n * 0.1), n - int(n * 0.8) - int(n * 0.1)]
        assert torch.equal(torch.cat(parts).sort().values, torch.arange(n))
        assert all(torch.equal(a, b) for a, b in zip(parts, split_indices(n, seed=0)))
    assert not torch.equal(split_indices(100, seed=0)[0], split_indices(100, seed=1)[0])
    with pytest.raises(ValueError, match="fractions"):
        split_indices(10, fractions=(0.5, 0.1, 0.1))


def test_load_vocab_from_train_only(tmp_path):
    # split of 10 rows, seed 0: train rows 0,1,3,4,5,7,8,9; validation row 6; test row 2 (pinned above)
    d = load_avazu(write(tmp_path / "a.csv.gz", mixed_lines()))
    assert isinstance(d, CtrData) and d.features == AVAZU_FEATURES and d.dense_in == 1
    assert [len(s) for s in d.splits] == [8, 1, 1] and d.summary.skipped == EXPECTED_SKIPS
    card = dict(zip(d.features, d.cardinalities))
    # train hours of day: "0" x3, "1" x3, "2" x2 -> 1, 2, 3; C1 1005 -> 1 (row 2's 1002 unseen in train -> 0)
    # site_id: all singletons -> OOV at min_count 2; app_id a x5 -> 1, b x3 -> 2; device_ip ip0 x3, ip1 x3, ip3 x2 (ip2 only in val/test)
    assert (card["hour"], card["C1"], card["site_id"], card["app_id"], card["device_ip"], card["banner_pos"]) == (4, 2, 1, 3, 4, 2)
    t = d.train.ids
    assert t[:, F["hour"]].tolist() == [1, 2, 1, 2, 3, 2, 3, 1]
    assert t[:, F["device_ip"]].tolist() == [1, 2, 3, 1, 2, 3, 1, 2]
    assert t[:, F["app_id"]].tolist() == [1, 1, 1, 1, 1, 2, 2, 2]
    assert t[:, F["site_id"]].tolist() == [0] * 8 and t[:, F["C1"]].tolist() == [1] * 8 and t[:, F["C21"]].tolist() == [1] * 8
    assert d.train.labels.tolist() == [0, 1, 0, 1, 0, 0, 0, 0]
    v, s = d.validation.ids[0], d.test.ids[0]  # rows 6 and 2
    assert (v[F["hour"]], v[F["device_ip"]], v[F["app_id"]], v[F["C1"]]) == (1, 0, 1, 1)
    assert (s[F["hour"]], s[F["device_ip"]], s[F["app_id"]], s[F["C1"]]) == (3, 0, 1, 0)
    assert d.validation.labels.tolist() == [1] and d.test.labels.tolist() == [0]
    assert d.vocabularies[F["device_ip"]] == {"ip0": 1, "ip1": 2, "ip3": 3}
    d1 = load_avazu(write(tmp_path / "a.csv.gz", mixed_lines()), min_count=1)
    assert dict(zip(d1.features, d1.cardinalities))["site_id"] == 9  # s0 s1 s3 s4 s5 s7 s8 s9 -> 1..8
    assert d1.train.ids[:, F["site_id"]].tolist() == list(range(1, 9)) and d1.test.ids[0, F["site_id"]] == 0


def test_hash_mode(tmp_path):
    d = load_avazu(write(tmp_path / "a.csv.gz", mixed_lines()), mode="hash", num_embeddings=97)
    assert d.cardinalities == [97] * 22 and d.vocabularies is None
    assert d.train.ids[1, F["site_id"]] == zlib.crc32(b"s1") % 97 and d.test.ids[0, F["app_id"]] == zlib.crc32(b"a") % 97
    with pytest.raises(ValueError, match="num_embeddings"):
        load_avazu(write(tmp_path / "a.csv.gz", mixed_lines()), mode="hash")


def test_batches(tmp_path):
    d = load_avazu(write(tmp_path / "a.csv.gz", mixed_lines()), min_count=1)
    b = next(d.train.batches(3))
    assert b.sparse_features.keys() == AVAZU_FEATURES and b.sparse_features.stride() == 3
    assert torch.equal(b.dense_features, torch.ones(3, 1)) and b.labels.tolist() == [0, 1, 0]
    assert torch.equal(b.sparse_features["device_ip"].values(), d.train.ids[:3, F["device_ip"]])
    assert [x.labels.numel() for x in d.train.batches(3)] == [3, 3, 2]
    assert [x.labels.numel() for x in d.train.batches(3, drop_last=True)] == [3, 3]
    a1 = [x.sparse_features["site_id"].values().tolist() for x in d.train.batches(3, shuffle_seed=5)]
    a2 = [x.sparse_features["site_id"].values().tolist() for x in d.train.batches(3, shuffle_seed=5)]
    assert a1 == a2 and sorted(sum(a1, [])) == list(range(1, 9))


def test_truncated_gzip_keeps_the_rows_before(tmp_path):
    rng = random.Random(0)
    lines = [row(i, click=rng.randint(0, 1), site_id=f"{rng.getrandbits(32):08x}", device_ip=f"{rng.getrandbits(32):08x}")
             for i in range(400)]
    full = tmp_path / "full.csv.gz"
    write(full, lines)
    data = full.read_bytes()
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(data[: len(data) // 2])
    complete = zlib.decompressobj(31).decompress(cut.read_bytes()).count(b"\n") - 1  # whole lines in the readable part, less the header
    columns, labels, summary = read_avazu_csv(str(cut))
    assert 0 < summary.rows == complete < 400 and labels.numel() == complete and not summary.skipped
    assert len(summary.truncated_files) == 1 and "cut.csv.gz" in summary.truncated_files[0] and "truncated gzip" in str(summary)
    assert len(load_avazu(str(cut)).train) == int(complete * 0.8)


def test_garbage_and_wrong_layouts_raise_naming_the_file(tmp_path):
    lines = [good(i) for i in range(10)] + [f"garbage {i}" for i in range(150)]
    with pytest.raises(ValueError, match=r"junk.csv.gz: \d+ of the first 100 lines are malformed"):
        read_avazu_csv(write(tmp_path / "junk.csv.gz", lines))
    with pytest.raises(ValueError, match=r"small.csv.gz: 3 of the 4 lines are malformed"):  # the share is checked at the end too
        read_avazu_csv(write(tmp_path / "small.csv.gz", [good(0), "a,b", "c", row(1, click="7")]))
    with pytest.raises(ValueError, match=r"empty.csv.gz: no valid rows"):
        read_avazu_csv(write(tmp_path / "empty.csv.gz", []))
    with pytest.raises(ValueError, match=r"test.csv.gz: header 'id,hour,C1"):  # Kaggle's test.csv layout (no click column)
        read_avazu_csv(_write_raw(tmp_path / "test.csv.gz", HEADER.replace("click,", "")))
    (tmp_path / "plain.csv.gz").write_text(HEADER + "\n" + good(0) + "\n")  # not gzip at all
    with pytest.raises(ValueError, match=r"plain.csv.gz: no valid rows"):
        read_avazu_csv(str(tmp_path / "plain.csv.gz"))


def _write_raw(path, first_line: str) -> str:
    with gzip.open(path, "wt") as f:
        f.write(first_line + "\n" + good(0) + "\n")
    return str(path)


# ----------------------------------------------------------------------------- the real sample


@pytest.fixture(scope="module")
def real() -> CtrData:
    if not os.path.exists(AVAZU):
        pytest.skip(f"Avazu sample not found at {AVAZU}")
    return load_avazu(AVAZU)


@pytest.mark.data
def test_real_sample(real):
    assert real.summary.rows == 9999 and not real.summary.skipped and real.summary.header  # PROVENANCE.md: 9,999 rows
    labels = torch.cat([s.labels for s in real.splits])
    assert labels.sum().item() == 1706  # positive rate 0.1706
    assert [len(s) for s in real.splits] == [7999, 999, 1001]
    assert all(isinstance(s, CtrSplit) for s in real.splits)
    card = dict(zip(real.features, real.cardinalities))
    assert card["hour"] == 2  # one hour in the whole sample
    # at most the distinct values PROVENANCE.md counts (over all rows) + the OOV row; device_ip the largest table
    distinct = {"C1": 6, "banner_pos": 4, "site_id": 381, "site_domain": 317, "site_category": 14, "app_id": 313, "app_domain": 31,
                "app_category": 14, "device_id": 1075, "device_ip": 7302, "device_model": 1168, "device_type": 4, "device_conn_type": 4,
                "C14": 271, "C15": 4, "C16": 5, "C17": 111, "C18": 4, "C19": 32, "C20": 108, "C21": 29}
    assert all(2 <= card[f] <= n + 1 for f, n in distinct.items())
    assert max(card, key=card.get) == "device_ip" and 500 < card["device_ip"] < 2000 and sum(real.cardinalities) == 2517  # fixed split, min_count 2
    for s in real.splits:
        assert s.ids.min() >= 0 and (s.ids < torch.tensor(real.cardinalities)).all()
    assert (real.test.ids[:, F["device_ip"]] == 0).float().mean() > 0.5  # most test IPs are unseen in train: OOV


@pytest.mark.data
def test_dlrm_learns_avazu(real):
    from torchrec_compress.testing.runs import train_ctr_dlrm

    val, test = train_ctr_dlrm(real, 512, 4096)
    # measured (seeds 0-2): validation 0.737-0.740, test 0.700-0.704 (1,001 rows: AUC spread ~0.02)
    assert val["auc"] > 0.68 and test["auc"] > 0.65 and test["samples"] == 1001
