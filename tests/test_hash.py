import torch

from torchrec_compress.ops import universal_hash
from torchrec_compress.testing.reference import py_hash


def test_hash_matches_python_integers_including_huge_ids():
    ids = torch.tensor([0, 1, 2, 7, 10**6, 2**31 - 2, 2**31 - 1, 2**31, 2**40 + 12345, 2**62 + 3])
    for seed in (0, 1, 17):
        got = universal_hash(ids, 977, seed).tolist()
        assert got == [py_hash(int(x), 977, seed) for x in ids]


def test_hash_spreads_consecutive_ids_and_depends_on_seed():
    ids = torch.arange(100_000)
    h0, h1 = universal_hash(ids, 1000, 0), universal_hash(ids, 1000, 1)
    counts = torch.bincount(h0, minlength=1000).float()
    # 100 per bucket expected; a universal hash keeps every bucket within a few sigma
    assert counts.min() > 50 and counts.max() < 150
    assert (h0 != ids % 1000).float().mean() > 0.9  # not raw-id modulo
    assert (h0 != h1).float().mean() > 0.9
