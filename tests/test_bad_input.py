"""Bad input gives a ValueError naming table, feature and value, never an FBGEMM crash."""
import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from torchrec_compress import QR, CompressedEmbeddingBagCollection, Hashing, MEmCom
from torchrec_compress.testing.data import random_bags


def _m(weighted=False):
    tables = [
        EmbeddingBagConfig(name="t_u", embedding_dim=8, num_embeddings=100, feature_names=["u"]),
        EmbeddingBagConfig(name="t_q", embedding_dim=8, num_embeddings=100, feature_names=["q"]),
        EmbeddingBagConfig(name="t_h", embedding_dim=8, num_embeddings=100, feature_names=["h"]),
        EmbeddingBagConfig(name="t_p", embedding_dim=8, num_embeddings=100, feature_names=["p"]),
    ]
    return CompressedEmbeddingBagCollection(
        tables, {"t_u": MEmCom(rows=10), "t_q": QR(num_buckets=10), "t_h": Hashing(rows=10)}, is_weighted=weighted
    )


def _kjt(u=(1,), q=(2,), h=(3,), p=(4,), weights=None, keys=("u", "q", "h", "p")):
    vals = {"u": u, "q": q, "h": h, "p": p}
    values = torch.tensor([x for k in keys for x in vals[k]], dtype=torch.int64)
    lengths = torch.tensor([len(vals[k]) for k in keys])
    return KeyedJaggedTensor(keys=list(keys), values=values, lengths=lengths, weights=weights)


@pytest.mark.parametrize("feature,table", [("u", "t_u"), ("q", "t_q"), ("h", "t_h"), ("p", "t_p")])
def test_negative_ids(feature, table):
    with pytest.raises(ValueError, match=rf"table '{table}', feature '{feature}': negative id -7"):
        _m()(_kjt(**{feature: (-7,)}))


@pytest.mark.parametrize("feature,table,scheme", [("u", "t_u", "MEmCom"), ("q", "t_q", "QR"), ("p", "t_p", "none")])
def test_ids_out_of_range(feature, table, scheme):
    with pytest.raises(ValueError, match=rf"table '{table}', feature '{feature}': id 100 >= num_embeddings=100 \(scheme {scheme}\)"):
        _m()(_kjt(**{feature: (100,)}))


def test_mismatched_keys():
    with pytest.raises(ValueError, match=r"missing features \['p'\], unknown features \[\]"):
        _m()(_kjt(keys=("u", "q", "h")))
    kjt = KeyedJaggedTensor(keys=["u", "q", "h", "p", "zz"], values=torch.arange(5), lengths=torch.ones(5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"unknown features \['zz'\]"):
        _m()(kjt)


def test_lengths_values_mismatch():
    kjt = KeyedJaggedTensor(keys=["u", "q", "h", "p"], values=torch.arange(3), lengths=torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="lengths sum to 4 but there are 3 values"):
        _m()(kjt)
    kjt = KeyedJaggedTensor(keys=["u", "q", "h", "p"], values=torch.arange(3), lengths=torch.tensor([2, -1, 1, 1]))
    with pytest.raises(ValueError, match="negative lengths"):
        _m()(kjt)


def test_float_ids_and_missing_weights():
    kjt = KeyedJaggedTensor(keys=["u", "q", "h", "p"], values=torch.ones(4), lengths=torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="int32 or int64 ids"):
        _m()(kjt)
    with pytest.raises(ValueError, match="is_weighted=True"):
        _m(weighted=True)(_kjt())
    with pytest.raises(ValueError, match="3 weights for 4 values"):
        _m(weighted=True)(_kjt(weights=torch.ones(3)))


def test_wrong_device():
    # no second real device on a CPU machine: a meta-device KJT stands in for a CUDA one
    kjt = KeyedJaggedTensor(keys=["u", "q", "h", "p"], values=torch.arange(4, device="meta"), lengths=torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="KJT values are on meta, but the embedding tables are on cpu"):
        _m()(kjt)
    assert _m().to("meta").device.type == "meta"  # the probe follows .to()


def test_lengths_not_batch_times_features():
    # torchrec's to_dict cannot split these (it failed with "shape '[4, 1]' is invalid for input of size 5")
    kjt = KeyedJaggedTensor(keys=["u", "q", "h", "p"], values=torch.arange(5), lengths=torch.ones(5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"KJT has 5 lengths for 4 features x batch size 1"):
        _m()(kjt)
    kjt = KeyedJaggedTensor(keys=["u", "q", "h", "p"], values=torch.arange(4), lengths=torch.ones(4, dtype=torch.int64), stride=2)
    with pytest.raises(ValueError, match=r"KJT has 4 lengths for 4 features x batch size 2"):
        _m()(kjt)


def test_empty_batch():
    # a KJT with no bags at all (stride 0) failed with an IndexError inside torchrec's to_dict
    kjt = KeyedJaggedTensor(keys=["u", "q", "h", "p"], values=torch.zeros(0, dtype=torch.int64), lengths=torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"KJT has batch size 0"):
        _m()(kjt)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int64])
def test_weights_not_float32(dtype):
    # pooled tables failed inside embedding_bag ("... to have the same type as ... per_sample_weights"),
    # per-id tables (MEmCom) took them: one clear error for every scheme now
    with pytest.raises(ValueError, match=rf"KJT weights must be float32, got {dtype}"):
        _m(weighted=True)(_kjt(weights=torch.ones(4, dtype=dtype)))
    _m()(_kjt(weights=torch.ones(4, dtype=dtype)))  # an unweighted collection ignores weights


def _profile(fn):
    from torchrec_compress.benchmarks.speed import step_counts

    c = step_counts(lambda _: fn(), None)
    return c["syncs"], c["ops"]


@pytest.mark.parametrize("scheme", ["none", "hashing"])
def test_validation_reads_the_host_once_whatever_the_number_of_features(scheme):
    """Issue 18's GPU-shaped forward for the checks: no host read of their own (split reads
    their verdict with the id counts: one sync in all) and the same ops for 13 and 26 features;
    the per-feature path runs only to explain an error."""
    from torchrec_compress import Hashing

    counts = {}
    for n in (13, 26):
        tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=100, feature_names=[f"f{i}"]) for i in range(n)]
        m = CompressedEmbeddingBagCollection(tables, {} if scheme == "none" else {t.name: Hashing(ratio=4) for t in tables})
        kjt = random_bags(tables, 8, seed=0).kjt()
        counts[n] = _profile(lambda: m._check_values(kjt)), _profile(lambda: m.split(kjt))
    assert counts[13][0][0] == counts[26][0][0] == 0
    assert counts[13][0][1] == counts[26][0][1]
    assert counts[13][1][0] == counts[26][1][0] == 1  # validation, transform and the inner KJT: one host read
    assert counts[13][1][1] == counts[26][1][1]
