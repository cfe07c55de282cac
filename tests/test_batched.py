"""Issue 18: the vectorized forward. Features whose schemes share a batch key are transformed
and combined together (modules/batched.py): the same numbers as one by one, a fixed number
of ops whatever the number of features, host syncs within one of stock TorchRec's."""
import copy

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from torchrec_compress import FIITED, QR, CompressedEmbeddingBagCollection, FreqThreshold, Hashing, MEmCom, MemRec, MixedDim, MPE, Saec, fit_
from torchrec_compress.modules.batched import Plan
from torchrec_compress.testing.data import random_bags


def _tables():
    return [
        EmbeddingBagConfig(name="t_plain", embedding_dim=8, num_embeddings=50, feature_names=["plain"]),
        EmbeddingBagConfig(name="t_h1", embedding_dim=8, num_embeddings=300, feature_names=["h1a", "h1b"]),
        EmbeddingBagConfig(name="t_qr", embedding_dim=8, num_embeddings=400, feature_names=["qr"], pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="t_h2", embedding_dim=8, num_embeddings=500, feature_names=["h2"]),
        EmbeddingBagConfig(name="t_mc1", embedding_dim=8, num_embeddings=200, feature_names=["mc1"]),
        EmbeddingBagConfig(name="t_plain16", embedding_dim=16, num_embeddings=60, feature_names=["plain16"]),
        EmbeddingBagConfig(name="t_mc2", embedding_dim=8, num_embeddings=300, feature_names=["mc2"], pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="t_mc3", embedding_dim=8, num_embeddings=100, feature_names=["mc3"]),
        EmbeddingBagConfig(name="t_mr1", embedding_dim=8, num_embeddings=900, feature_names=["mr1"]),
        EmbeddingBagConfig(name="t_mr2", embedding_dim=8, num_embeddings=700, feature_names=["mr2"]),
        EmbeddingBagConfig(name="t_qra", embedding_dim=8, num_embeddings=400, feature_names=["qra"]),
        EmbeddingBagConfig(name="t_qrb", embedding_dim=8, num_embeddings=250, feature_names=["qrb"]),
        EmbeddingBagConfig(name="t_freq", embedding_dim=8, num_embeddings=100, feature_names=["freq"]),
        EmbeddingBagConfig(name="t_freq2", embedding_dim=8, num_embeddings=5000, feature_names=["freq2a", "freq2b"]),
        EmbeddingBagConfig(name="t_md", embedding_dim=8, num_embeddings=100, feature_names=["md"]),
        EmbeddingBagConfig(name="t_md2", embedding_dim=8, num_embeddings=80, feature_names=["md2a", "md2b"]),
        EmbeddingBagConfig(name="t_mpe", embedding_dim=8, num_embeddings=60, feature_names=["mpe"]),
        EmbeddingBagConfig(name="t_mpe2", embedding_dim=8, num_embeddings=90, feature_names=["mpe2a", "mpe2b"], pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="t_mpe3", embedding_dim=8, num_embeddings=70, feature_names=["mpe3"], pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="t_fi", embedding_dim=8, num_embeddings=80, feature_names=["fi"]),
        EmbeddingBagConfig(name="t_saec1", embedding_dim=8, num_embeddings=120, feature_names=["saec1"], pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="t_saec2", embedding_dim=8, num_embeddings=90, feature_names=["saec2a", "saec2b"], pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="t_saec3", embedding_dim=8, num_embeddings=70, feature_names=["saec3"]),
    ]


SCHEMES = {
    "t_h1": Hashing(rows=30, seed=1), "t_h2": Hashing(rows=17, seed=2), "t_qr": QR(num_buckets=20),
    "t_mc1": MEmCom(rows=11, seed=3), "t_mc2": MEmCom(rows=7), "t_mc3": MEmCom(rows=13, seed=5),
    "t_mr1": MemRec(rows=40, hashes=3, seed=1), "t_mr2": MemRec(rows=30, hashes=3, seed=2),
    "t_qra": QR(num_buckets=25, combiner="add"), "t_qrb": QR(num_buckets=10, combiner="add"),
    "t_freq": FreqThreshold(capacity=10, shared_rows=3, fit_steps=0), "t_md": MixedDim(dim=4),
    "t_md2": MixedDim(dim=4, seed=1), "t_mpe": MPE(ratio=4, fit_steps=1, search_steps=2),
    # MPE: every stage (count, search with its penalty, retrain) batched; FIITED a routed batch (id by id)
    "t_mpe2": MPE(ratio=4, groups=5, fit_steps=1, search_steps=2, seed=1), "t_mpe3": MPE(ratio=4, groups=5, fit_steps=1, search_steps=2),
    "t_fi": FIITED(pool=40, chunks=2),
    "t_freq2": FreqThreshold(capacity=12, shared_rows=5, fit_steps=0, seed=4),
    # warm-up table, then centroids: ragged, routed by the (shared) stage; MEAN pooled after the lookups
    "t_saec1": Saec(clusters=9, warm_steps=2), "t_saec2": Saec(clusters=7, warm_steps=2, seed=1), "t_saec3": Saec(clusters=5, warm_steps=2),
}


def _one_by_one(m: CompressedEmbeddingBagCollection, keys) -> None:
    """Make ``m`` transform and combine every feature alone (the per-feature path)."""
    m.__dict__.setdefault("_plans", {})[tuple(keys)] = Plan(keys, m._feature_table, m._schemes, m._embedding_names, batch=False)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("stage", ["counting", "fitted"])
def test_batched_equals_one_by_one_in_any_key_order(weighted, stage):
    tables = _tables()
    if weighted:
        tables = [EmbeddingBagConfig(**{**t.__dict__, "pooling": PoolingType.SUM}) for t in tables]
    torch.manual_seed(0)
    m = CompressedEmbeddingBagCollection(copy.deepcopy(tables), SCHEMES, is_weighted=weighted)
    if stage == "fitted":  # FreqThreshold's frequent ids (a few), Saec's clusters: both past their procedure
        fit_(m, [random_bags(tables, 16, seed=7, weighted=weighted).kjt()])
        assert 0 < m.scheme("t_freq").kept() <= 10 and 0 < m.scheme("t_freq2").kept() <= 12 and m.scheme("t_saec2").fitted()
    ref = copy.deepcopy(m)
    m.eval(), ref.eval()  # no procedure steps while the paths are compared (Saec warms up on its warm-up table)
    bags = random_bags(tables, 6, seed=1, weighted=weighted)
    kjt = bags.kjt()
    keys = list(kjt.keys())
    plan = m._plan(tuple(keys))
    memcom = ("mc1", "mc2", "mc3") if weighted else ("mc1", "mc3")  # per-id pooling is part of the key (mc2 is MEAN)
    saec = [("saec1", "saec2a", "saec2b", "saec3")] if weighted else [("saec1", "saec2a", "saec2b"), ("saec3",)]
    assert {tuple(g.features) for g in plan.groups} >= {("h1a", "h1b", "h2"), memcom, ("mr1", "mr2"), ("qra", "qrb"),
                                                        ("freq", "freq2a", "freq2b"), ("md", "md2a", "md2b"),
                                                        ("mpe",), ("mpe2a", "mpe2b", "mpe3"), ("fi",), *saec}
    assert plan.singles == [] and not plan.identity  # groups gathered: the input is permuted
    shuffled = kjt.permute([keys.index(k) for k in reversed(keys)])  # another input order: the same inner KJTs
    assert m._plan(tuple(shuffled.keys())).features == plan.features
    assert m.split(shuffled)[1].keys() == m.split(kjt)[1].keys() and m.split(shuffled)[2].keys() == m.split(kjt)[2].keys()
    _one_by_one(ref, keys)
    want = ref(kjt)
    for got in (m(kjt), m(shuffled)):
        assert got.keys() == want.keys() == m._embedding_names
        torch.testing.assert_close(got.values(), want.values(), rtol=1e-6, atol=1e-7)
    # gradients reach the same rows with the same values
    g = torch.randn_like(want.values())
    (m(kjt).values() * g).sum().backward()
    (want.values() * g).sum().backward()
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        # MPE's logits' gradient is scaled by 1 / temperature (333): its sums in another order differ by 1e-7 relative
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)
    # training, in lockstep through the procedures (FreqThreshold and Saec count; Saec clusters before step 2)
    m.train(), ref.train()
    for step in range(4):
        k = random_bags(tables, 6, seed=20 + step, weighted=weighted).kjt()
        _one_by_one(ref, list(k.keys()))
        torch.testing.assert_close(m(k).values(), ref(k).values(), rtol=1e-6, atol=1e-7)
    assert m.scheme("t_saec1").fitted() and ref.scheme("t_saec1").fitted()


def test_empty_features_and_bags():
    tables = _tables()
    m = CompressedEmbeddingBagCollection(copy.deepcopy(tables), SCHEMES)
    ref = copy.deepcopy(m)
    keys = [f for t in tables for f in t.feature_names]
    lengths = torch.zeros(len(keys) * 3, dtype=torch.int64)
    lengths[keys.index("h2") * 3 + 1] = 2  # one bag of one feature holds ids; everything else is empty
    lengths[keys.index("mc3") * 3 + 2] = 1
    kjt = KeyedJaggedTensor(keys=keys, values=torch.tensor([5, 7, 9]), lengths=lengths)
    _one_by_one(ref, keys)
    torch.testing.assert_close(m(kjt).values(), ref(kjt).values())


@pytest.mark.slow
def test_ops_per_step_do_not_grow_with_the_features():
    """One training step under a 1-process DMP (fused row-wise Adagrad), every table compressed:
    ops (aten/fbgemm, a profiler trace) the same for 26 and 52 features; host syncs at most
    stock's + 1 (a second FBGEMM TBE's bounds check where a scheme has an element-wise
    optimizer table); the pooled schemes within 3x stock's ops (batch 8: see scaling_counts)."""
    from torchrec_compress.benchmarks.speed import scaling_counts
    from torchrec_compress.train.loop import local_process_group

    with local_process_group():
        stock = scaling_counts("stock", 26)
        for name in ("hashing", "qr_add", "qr", "memcom", "memrec"):
            c26, c52 = scaling_counts(name, 26), scaling_counts(name, 52)
            assert c26["ops"] == c52["ops"], (name, c26, c52)
            assert c26["syncs"] == c52["syncs"] <= stock["syncs"] + 1, (name, c26, stock)
            if name in ("hashing", "qr_add"):
                assert c26["ops"] <= 3 * stock["ops"], (name, c26, stock)


@pytest.mark.parametrize("weighted", [False, True])
def test_direct_plan_returns_the_inner_output_itself(weighted):
    """Every feature one identity lookup (uncompressed, Hashing, FreqThreshold): the inner KJT is
    permuted into the module's order and the inner EBC's output is the module's output, no copy."""
    tables = [t for t in _tables() if t.name in ("t_plain", "t_h1", "t_plain16", "t_h2", "t_freq", "t_freq2")]
    if weighted:
        tables = [EmbeddingBagConfig(**{**t.__dict__, "pooling": PoolingType.SUM}) for t in tables]
    schemes = {k: v for k, v in SCHEMES.items() if k in {t.name for t in tables}}
    m = CompressedEmbeddingBagCollection(copy.deepcopy(tables), schemes, is_weighted=weighted)
    fit_(m, [random_bags(tables, 16, seed=7, weighted=weighted).kjt()])
    ref = copy.deepcopy(m)
    kjt = random_bags(tables, 6, seed=1, weighted=weighted).kjt()
    keys = list(kjt.keys())
    shuffled = kjt.permute([keys.index(k) for k in reversed(keys)])
    assert m._plan(tuple(keys)).direct and m._plan(tuple(shuffled.keys())).direct
    _one_by_one(ref, keys)
    want = ref(kjt)
    for k in (kjt, shuffled):
        state, pooled_kjt, per_id_kjt, weighted_kjt = m.split(k)
        assert per_id_kjt is None and weighted_kjt is None and pooled_kjt.keys() == [c for cfg in m._pooled_cfgs for c in cfg.feature_names]
        inner = m.pooled(pooled_kjt)
        got = m.combine(state, inner, None)
        assert got.values() is inner.values() and got.keys() == want.keys()
        torch.testing.assert_close(got.values(), want.values())
    g = torch.randn_like(want.values())
    (m(shuffled).values() * g).sum().backward()
    (want.values() * g).sum().backward()
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_mpe_tables_in_different_stages_share_a_batch():
    """Two MPE tables of one batch key, one retraining (its widths chosen), one still searching
    (and one still counting): each id is quantized by its own table's stage, as one by one."""
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=70 + 10 * i, feature_names=[f"f{i}"]) for i in range(3)]
    schemes = {t.name: MPE(ratio=4, groups=5, fit_steps=3, search_steps=50, seed=i) for i, t in enumerate(tables)}
    torch.manual_seed(0)
    m = CompressedEmbeddingBagCollection(copy.deepcopy(tables), schemes)
    kjt = random_bags(tables, 8, seed=2).kjt()
    for name in ("t0", "t1"):  # t2 keeps counting
        m.scheme(name).group_(torch.arange(m.scheme(name).table.num_embeddings).flip(0))
    with torch.no_grad():
        m.scheme_states()["t1"].logits.copy_(torch.randn(5, 7, generator=torch.Generator().manual_seed(1)) * 3e-3)
    m.scheme("t0").choose_()
    assert [m.scheme(t.name).stage for t in tables] == [2, 1, 0]
    plan = m._plan(tuple(kjt.keys()))
    assert [g.features for g in plan.groups] == [["f0", "f1", "f2"]]
    ref = copy.deepcopy(m)
    _one_by_one(ref, list(kjt.keys()))
    m.train(), ref.train()
    got, want = m(kjt).values(), ref(kjt).values()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    g = torch.randn_like(want)
    (got * g).sum().backward()
    (want * g).sum().backward()  # the searching table's penalty added once in each
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)
