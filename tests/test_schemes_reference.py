"""Every scheme, forward and backward, against the plain-torch reference of its equation."""
import copy

import pytest
import torch
from torchrec import EmbeddingBagConfig, PoolingType

from torchrec_compress import QR, CompressedEmbeddingBagCollection, FreqThreshold, Hashing, MEmCom, MemRec, Saec, fit_
from torchrec_compress.stats import FrequencyStats
from torchrec_compress.testing.data import random_bags
from torchrec_compress.testing.reference import physical_weights, reference_forward, scheme_maps

SCHEMES = {
    "hashing": Hashing(ratio=7, seed=5),
    "qr_mult": QR(ratio=4),
    "qr_add": QR(num_buckets=10, combiner="add"),
    "qr_concat": QR(ratio=3, combiner="concat"),
    "memcom": MEmCom(ratio=6, seed=2),
    "memrec": MemRec(ratio=20, hashes=3, seed=4),
    "memrec_explicit": MemRec(rows=13, weight_rows=10, hashes=2),
    "memrec_vector": MemRec(ratio=10, hashes=2, weight_dim="full"),
    "freq_threshold": FreqThreshold(capacity=40, shared_rows=7, min_count=2),
    "saec": Saec(clusters=9, warm_steps=0),  # clusters given by fit_ (the warm-up path: test_lifecycle)
    "uncompressed": None,
}


def _tables(pooling):
    return [
        EmbeddingBagConfig(name="t0", embedding_dim=16, num_embeddings=997, feature_names=["a", "b"], pooling=pooling),
        EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=301, feature_names=["c"], pooling=pooling),
    ]


@pytest.mark.parametrize("pooling,weighted", [(PoolingType.SUM, False), (PoolingType.MEAN, False), (PoolingType.SUM, True)])
@pytest.mark.parametrize("name", list(SCHEMES))
def test_forward_backward_match_reference(name, pooling, weighted):
    torch.manual_seed(0)
    tables = _tables(pooling)
    scheme = SCHEMES[name]
    schemes = {} if scheme is None else {"t0": scheme, "t1": scheme if name != "qr_concat" else QR(ratio=2, combiner="concat")}
    m = CompressedEmbeddingBagCollection(copy.deepcopy(tables), schemes, is_weighted=weighted)
    with torch.no_grad():  # move off the init values (e.g. MEmCom's w = 1) so products are tested
        for w in m.parameters():
            w.add_(torch.randn_like(w) * 0.1)
    bags = random_bags(tables, batch=6, seed=1, max_len=5, weighted=weighted)
    if isinstance(scheme, FreqThreshold):  # frequent ids from another batch: some hit, some miss
        stats = FrequencyStats({f: t.num_embeddings for t in tables for f in t.feature_names})
        stats.update(random_bags(tables, batch=40, seed=7, max_len=5).kjt())
        fit_(m, stats)
        assert min(m.scheme(t.name).kept() for t in tables) > 0
    if isinstance(scheme, Saec):  # clusters fitted from random "warm" embeddings and counts
        stats = FrequencyStats({f: t.num_embeddings for t in tables for f in t.feature_names})
        stats.update(random_bags(tables, batch=40, seed=7, max_len=5).kjt())
        fit_(m, stats, embeddings={t.name: torch.randn(t.num_embeddings, t.embedding_dim) for t in tables})
    out = m(bags.kjt())
    assert out.keys() == ["a", "b", "c"] and out.length_per_key() == [16, 16, 8]

    ref_w = {n: p.detach().clone().requires_grad_(True) for n, p in physical_weights(m).items()}
    ref = reference_forward(tables, schemes, ref_w, bags, scheme_maps(m))
    torch.testing.assert_close(out.values(), ref, rtol=1e-5, atol=1e-6)  # fp32 sums in another order

    g = torch.randn_like(ref)
    (out.values() * g).sum().backward()
    (ref * g).sum().backward()
    for n, p in physical_weights(m).items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {n}"
        torch.testing.assert_close(p.grad, ref_w[n].grad, rtol=1e-5, atol=1e-6, msg=f"grad of {n}")


def test_memcom_gradients_reach_both_tables_with_expected_values():
    """Hand-computed case: one id, e = w * E[h]; dL/dw = <g, E[h]>, dL/dE[h] = w g."""
    t = EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=40, feature_names=["f"])
    m = CompressedEmbeddingBagCollection([t], {"t": MEmCom(rows=3)})
    w = physical_weights(m)
    with torch.no_grad():
        w["t__w"].fill_(2.0)
        w["t__shared"].copy_(torch.arange(12.0).reshape(3, 4))
    from torchrec_compress.testing.data import Bags

    bags = Bags(["f"], {"f": [[9]]})
    out = m(bags.kjt()).values()
    from torchrec_compress.testing.reference import py_hash

    h = py_hash(9, 3, 0)
    torch.testing.assert_close(out[0], 2.0 * torch.arange(12.0).reshape(3, 4)[h])
    g = torch.tensor([[1.0, -1.0, 0.5, 2.0]])
    (out * g).sum().backward()
    assert w["t__w"].grad[9 // 4, 9 % 4].item() == pytest.approx((g[0] * torch.arange(12.0).reshape(3, 4)[h]).sum().item())
    assert w["t__w"].grad.abs().sum().item() == pytest.approx(abs(w["t__w"].grad[2, 1].item()))
    torch.testing.assert_close(w["t__shared"].grad[h], 2.0 * g[0])


@pytest.mark.parametrize("cfg", [MEmCom(rows=11), MemRec(rows=13, hashes=3)], ids=["memcom", "memrec"])
def test_id_weighted_schemes_read_the_big_table_in_weighted_bags(cfg):
    """MEmCom / Mem-Rec (scalar alpha): the big table in the ``weighted`` EBC (real bags: its
    output is [B, d] per lookup, not a row per id), only the 4-wide weight rows per id."""
    tables = _tables(PoolingType.SUM)
    m = CompressedEmbeddingBagCollection(copy.deepcopy(tables), {"t0": cfg, "t1": None})
    big = "__shared" if isinstance(cfg, MEmCom) else "__tok"
    assert m.weighted.is_weighted() and [c.name for c in m.weighted.embedding_bag_configs()] == [f"t0{big}"]
    assert {c.embedding_dim for c in m.per_id.embedding_bag_configs()} == {4} and not m.pooled.is_weighted()
    state, pooled_kjt, per_id_kjt, weighted_kjt = m.split(random_bags(tables, 5, seed=0).kjt())
    assert weighted_kjt.stride() == 5 and weighted_kjt.weights().dtype == torch.float64  # real bags, position codes
    out = m.weighted(weighted_kjt.__class__(keys=weighted_kjt.keys(), values=weighted_kjt.values(), lengths=weighted_kjt.lengths(),
                                            weights=torch.ones(weighted_kjt.values().numel())))
    assert out.values().shape == (5, 2 * 16 * cfg_lookups(cfg))


def test_state_dict_from_before_the_weighted_tables_loads():
    """MEmCom's shared table was a per-id table: a state dict that says so still loads."""
    tables = _tables(PoolingType.SUM)
    m = CompressedEmbeddingBagCollection(copy.deepcopy(tables), {"t0": MEmCom(rows=11)})
    old = {k.replace("weighted.", "per_id."): v + 1 for k, v in m.state_dict().items()}
    assert "per_id.embedding_bags.t0__shared.weight" in old
    fresh = CompressedEmbeddingBagCollection(copy.deepcopy(tables), {"t0": MEmCom(rows=11)})
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh.weighted.embedding_bags["t0__shared"].weight, m.weighted.embedding_bags["t0__shared"].weight + 1)


def cfg_lookups(cfg) -> int:
    return 1 if isinstance(cfg, MEmCom) else cfg.hashes


def test_empty_batch_features_and_feature_order():
    tables = _tables(PoolingType.SUM)
    m = CompressedEmbeddingBagCollection(copy.deepcopy(tables), {"t0": MEmCom(ratio=4), "t1": QR(ratio=2)})
    bags = random_bags(tables, batch=4, seed=3, keys=["c", "b", "a"])  # KJT order != table order
    bags.ids["b"] = [[], [], [], []]  # a feature with no ids at all
    out = m(bags.kjt())
    assert out.keys() == ["a", "b", "c"]
    assert torch.equal(out["b"], torch.zeros(4, 16))
    ref = reference_forward(tables, {"t0": MEmCom(ratio=4), "t1": QR(ratio=2)}, physical_weights(m), bags)
    torch.testing.assert_close(out.values(), ref, rtol=1e-5, atol=1e-6)


def test_weighted_mean_is_rejected_like_torchrec():
    # nn.EmbeddingBag (torchrec's unsharded EBC) supports per-sample weights only with SUM
    with pytest.raises(ValueError, match="table 't0': weighted input needs SUM pooling"):
        CompressedEmbeddingBagCollection(_tables(PoolingType.MEAN), {"t0": Hashing(ratio=2)}, is_weighted=True)
