"""Drop-in behaviour: the issue's snippet, exact equality with torchrec's EBC, compress_ on DLRM."""
import copy

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from torchrec.models.dlrm import DLRM

from torchrec_compress import QR, CompressedEmbeddingBagCollection, Hashing, MEmCom, compress_
from torchrec_compress.testing.data import random_bags


def _tables():
    return [
        EmbeddingBagConfig(name="t_user", embedding_dim=32, num_embeddings=20_000, feature_names=["user"]),
        EmbeddingBagConfig(name="t_ad", embedding_dim=32, num_embeddings=5_000, feature_names=["ad", "ad_hist"], pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="t_small", embedding_dim=32, num_embeddings=30, feature_names=["small"]),
    ]


def test_issue_snippet():
    cebc = CompressedEmbeddingBagCollection(
        tables=_tables(), schemes={"t_user": MEmCom(ratio=16), "t_ad": QR(ratio=8)}, device=torch.device("cpu")
    )
    kjt = random_bags(_tables(), batch=5, seed=0).kjt()
    kt = cebc(kjt)
    stock = EmbeddingBagCollection(_tables())(kjt)
    assert kt.keys() == stock.keys() and kt.length_per_key() == stock.length_per_key()
    assert kt.values().shape == stock.values().shape
    rep = cebc.memory_report()
    assert rep.tables["t_user"].ratio >= 16 and rep.tables["t_ad"].ratio >= 8 and rep.tables["t_small"].ratio == 1.0
    assert rep.total.uncompressed_bytes == (20_000 + 5_000 + 30) * 32 * 4
    assert rep.total.compressed_bytes == sum(t.compressed_bytes for t in rep.tables.values())
    assert "t_user" in str(rep) and "TOTAL" in str(rep)


@pytest.mark.parametrize("weighted", [False, True])
def test_uncompressed_is_bit_identical_to_torchrec_ebc(weighted):
    tables = _tables()
    if weighted:
        for t in tables:
            t.pooling = PoolingType.SUM
    torch.manual_seed(0)
    stock = EmbeddingBagCollection(copy.deepcopy(tables), is_weighted=weighted)
    ours = CompressedEmbeddingBagCollection(copy.deepcopy(tables), {"t_user": Hashing(ratio=4)}, is_weighted=weighted)
    for t in tables[1:]:
        ours.pooled.embedding_bags[t.name].weight.data.copy_(stock.embedding_bags[t.name].weight)
    kjt = random_bags(tables, batch=7, seed=2, weighted=weighted).kjt()
    a, b = stock(kjt), ours(kjt)
    assert a.keys() == b.keys()
    for k in ("ad", "ad_hist", "small"):
        assert torch.equal(a[k], b[k])


def _dlrm(device=None):
    ebc = EmbeddingBagCollection(_tables(), device=device)
    return DLRM(embedding_bag_collection=ebc, dense_in_features=4, dense_arch_layer_sizes=[8, 32], over_arch_layer_sizes=[8, 1], dense_device=device)


def test_compress_swaps_ebc_inside_dlrm_and_keeps_uncompressed_weights():
    torch.manual_seed(0)
    model = _dlrm()
    old = model.sparse_arch.embedding_bag_collection
    before = {t: old.embedding_bags[t].weight.detach().clone() for t in ("t_ad", "t_small")}
    assert compress_(model, {"t_user": MEmCom(ratio=16)}) is model
    new = model.sparse_arch.embedding_bag_collection
    assert isinstance(new, CompressedEmbeddingBagCollection)
    for t, w in before.items():
        assert torch.equal(new.pooled.embedding_bags[t].weight, w)
    kjt = random_bags(_tables(), batch=3, seed=0).kjt()
    logits = model(torch.randn(3, 4), kjt)
    assert logits.shape == (3, 1)
    logits.sum().backward()
    assert new.per_id.embedding_bags["t_user__w"].weight.grad.abs().sum() > 0


def test_compress_errors():
    with pytest.raises(ValueError, match=r"no EmbeddingBagCollection in the model holds tables \['nope'\]"):
        compress_(_dlrm(), {"nope": Hashing(ratio=2)})
    with pytest.raises(ValueError, match="bare EBC"):
        compress_(EmbeddingBagCollection(_tables()), {"t_user": Hashing(ratio=2)})


def test_compress_on_meta_device():
    model = _dlrm(device=torch.device("meta"))
    compress_(model, {"t_user": Hashing(ratio=8)})
    assert model.sparse_arch.embedding_bag_collection.device.type == "meta"


def test_state_dict_round_trip_is_exact():
    torch.manual_seed(0)
    a = CompressedEmbeddingBagCollection(_tables(), {"t_user": MEmCom(ratio=16), "t_ad": QR(ratio=8, combiner="add")})
    torch.manual_seed(1)
    b = CompressedEmbeddingBagCollection(_tables(), {"t_user": MEmCom(ratio=16), "t_ad": QR(ratio=8, combiner="add")})
    kjt = random_bags(_tables(), batch=4, seed=0).kjt()
    assert not torch.equal(a(kjt).values(), b(kjt).values())
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(kjt).values(), b(kjt).values())


def test_hashing_accepts_ids_beyond_num_embeddings_by_design():
    t = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=100, feature_names=["f"])
    m = CompressedEmbeddingBagCollection([t], {"t": Hashing(ratio=4)})
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=torch.tensor([5, 10**12]), lengths=torch.tensor([1, 1]))
    assert m(kjt).values().shape == (2, 8)
