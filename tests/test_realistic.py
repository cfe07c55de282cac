"""RealisticSynthetic: a SyntheticCriteo drop-in whose hidden model has clustered k-dim id latents and
pairwise interactions, calibrated to a positive rate of 0.25 and a Bayes-optimal AUC of 0.80."""
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from torchrec_compress.config import presets
from torchrec_compress.data.realistic import RealisticSynthetic, expected_auc
from torchrec_compress.data.synthetic import CRITEO_KAGGLE_CARDINALITIES, SyntheticCriteo, cat_names, ids_of
from torchrec_compress.models import build_dlrm, logical_tables
from torchrec_compress.schemes.saec import kmeans
from torchrec_compress.testing.cluster import adjusted_rand_index
from torchrec_compress.train.loop import local_process_group, predictions, shard_for_training, train_steps
from torchrec_compress.train.metrics import binary_metrics

SMALL = [1000, 2000, 5000, 10000, 20000, 20000, 10000, 5000, 2000, 1000]


def _same(a, b):
    return (torch.equal(a.dense_features, b.dense_features) and torch.equal(a.labels, b.labels)
            and torch.equal(a.sparse_features.values(), b.sparse_features.values())
            and torch.equal(a.sparse_features.lengths(), b.sparse_features.lengths()))


def _only(field: int, ids: torch.Tensor, nf: int) -> torch.Tensor:
    """``[N, nf]`` ids: ``ids [N]`` in column ``field``, 0 elsewhere (to query one field's latents)."""
    out = torch.zeros(ids.numel(), nf, dtype=torch.int64)
    out[:, field] = ids
    return out


def test_deterministic_and_streams_differ():
    a, b = RealisticSynthetic(SMALL, batch_size=256, num_batches=3, seed=7), RealisticSynthetic(SMALL, batch_size=256, num_batches=3, seed=7)
    assert all(_same(x, y) for x, y in zip(a, b))
    assert _same(a.batch(2), list(b)[2])  # random access == iteration
    assert not _same(a.batch(0), a.batch(1))
    assert not _same(a.batch(0), RealisticSynthetic(SMALL, batch_size=256, seed=8).batch(0))
    assert not _same(a.batch(0), RealisticSynthetic(SMALL, batch_size=256, seed=7, split="eval").batch(0))
    assert not _same(RealisticSynthetic(SMALL, batch_size=256, split="eval").batch(0), RealisticSynthetic(SMALL, batch_size=256, split="test").batch(0))
    # the hidden model depends on the seed only: another split sees the same latents and logits
    ev = RealisticSynthetic(SMALL, batch_size=256, seed=7, split="eval")
    x, ids, logit, _ = a.sample(0)
    assert torch.equal(ev.latents(ids), a.latents(ids)) and torch.equal(ev.logits(x, ids), logit)
    assert torch.equal(a.probabilities(1), torch.sigmoid(a.sample(1)[2]))
    starts = RealisticSynthetic(SMALL, batch_size=256, num_batches=2, seed=7, start=2)
    assert len(starts) == 2 and all(_same(x, a.batch(i)) for x, i in zip(starts, (2, 3)))


def test_samples_and_latents_match_the_batches():
    """(The Batch layout, shared with SyntheticCriteo, is tested in test_synthetic.py.)"""
    ds = RealisticSynthetic(batch_size=300, num_batches=2)
    b = ds.batch(0)
    x, ids, logit, labels = ds.sample(0)
    assert x.shape == (300, 13) and ids.shape == (300, 26) and logit.shape == (300,) and torch.equal(labels, b.labels)
    assert torch.equal(ids, ids_of(b))
    z = ds.latents(ids)
    assert z.shape == (300, 26, 16) and z.dtype == torch.float32 and torch.isfinite(z).all()


def test_ids_in_range_at_extreme_cardinalities_without_per_id_storage():
    cards = [1, 2, 7, 40_000_000, 2**31 - 1]
    ds = RealisticSynthetic(cards, batch_size=4096, num_batches=3)
    ids = torch.cat([ids_of(b) for b in ds])
    assert (ids >= 0).all() and (ids < torch.tensor(cards)).all()
    assert ids[:, 0].eq(0).all() and set(ids[:, 1].tolist()) == {0, 1}
    assert ids[:, 3].unique().numel() > 1000 and ids[:, 4].unique().numel() > 1000  # the long tails are reached
    z = ds.latents(ids)
    assert torch.isfinite(z).all() and torch.isfinite(ds.logits(torch.zeros(ids.shape[0], 13), ids)).all()
    # the largest ids have latents too, and nothing the generator keeps grows with the vocabularies
    top = torch.tensor([[0, 1, 6, 40_000_000 - 1, 2**31 - 2]])
    assert torch.isfinite(ds.latents(top)).all()
    kept = sum(t.numel() for t in vars(ds).values() if isinstance(t, torch.Tensor))
    assert kept < 100_000, kept


def test_zipf_skew_varies_per_field_with_scrambled_ids():
    ds = RealisticSynthetic(batch_size=4096)
    s = ds.zipf_exponents
    assert s.shape == (26,) and (s >= 1.05).all() and (s <= 1.4).all() and s.std() > 0.05  # drawn per field
    ids = torch.cat([ids_of(ds.batch(i)) for i in range(10)])  # 40960 samples
    for f in (0, 9, 2):  # 1460, 93k and 10M rows
        v = ds.cardinalities[f]
        counts = torch.bincount(ids[:, f], minlength=v).sort(descending=True).values
        top_share = counts[: max(1, v // 100)].sum().item() / ids.shape[0]
        assert top_share > 0.4, (f, top_share)  # uniform ids would give ~0.01
        assert torch.bincount(ids[:, f]).argmax().item() > 2  # the most frequent id is scattered, not id 0
    # a steeper exponent concentrates more mass on the head
    steep = RealisticSynthetic(SMALL, batch_size=4096, zipf_exponent=2.0)
    flat = RealisticSynthetic(SMALL, batch_size=4096, zipf_exponent=1.05)
    head = lambda d: torch.bincount(ids_of(d.batch(0))[:, 4]).sort(descending=True).values[:20].sum().item()
    assert head(steep) > 1.5 * head(flat)


def test_latents_are_standard_normal_noise_around_cluster_centres():
    ds = RealisticSynthetic(batch_size=16)
    ids = torch.arange(50_000) * 199 + 11  # distinct ids of the 10M-row field cat_2
    full = _only(2, ids, 26)
    eps = ds.noise(full)[:, 2]  # [N, 16]
    assert eps.mean().abs() < 0.02 and (eps.std(0) - 1).abs().max() < 0.03
    assert ((eps ** 4).mean() / (eps ** 2).mean() ** 2 - 3).abs() < 0.15  # Gaussian kurtosis
    corr = torch.corrcoef(eps.t()).fill_diagonal_(0)
    assert corr.abs().max() < 0.03  # dims independent
    assert torch.corrcoef(torch.stack([eps[:-1, 0], eps[1:, 0]]))[0, 1].abs() < 0.03  # neighbouring ids too
    c = ds.clusters(full)[:, 2]
    counts = torch.bincount(c, minlength=ds.num_clusters)
    assert counts.min() > 0.8 * 50_000 / 32 and counts.max() < 1.2 * 50_000 / 32
    z = ds.latents(full)[:, 2]
    assert torch.allclose(z, ds.centres[2, c] + ds.within_spread * eps)


def test_positive_rate_and_bayes_auc_at_criteo_kaggle_cardinalities():
    ds = RealisticSynthetic(batch_size=4096, split="test")  # defaults: Criteo Kaggle cardinalities
    assert ds.cardinalities == CRITEO_KAGGLE_CARDINALITIES
    parts = [ds.sample(i) for i in range(16)]  # 65536 samples
    logits, labels = torch.cat([p[2] for p in parts]), torch.cat([p[3] for p in parts])
    rate = labels.mean().item()
    bayes = ds.bayes_auc(num_samples=16 * 4096)
    print(f"\nCriteo Kaggle cardinalities: positive rate {rate:.4f}, Bayes AUC {bayes:.4f} (S={ds.scale:.3f}, bias={ds.bias:.3f}, "
          f"{len(ds.pairs)} pairs)")
    assert 0.23 < rate < 0.27
    assert 0.76 < bayes < 0.84
    assert bayes == pytest.approx(binary_auroc(torch.sigmoid(logits), labels.long()).item())
    assert abs(expected_auc(logits) - bayes) < 0.01  # the label-free expectation the calibration uses
    # most of the signal is in the pairwise interactions of the k-dim latents, not one scalar per id
    t = (ds.terms(*ds.sample(0)[:2]) - ds._term_mean) * ds._term_coef
    share = t.var(0) / t.var(0).sum()
    assert share[1] > 0.7 and share[0] < 0.2 and share[2] < 0.2, share
    # the calibration follows its targets
    assert 0.09 < torch.cat([b.labels for b in RealisticSynthetic(SMALL, 4096, 4, positive_rate=0.1)]).mean() < 0.11
    assert RealisticSynthetic(SMALL, 4096, positive_rate=0.1, target_auc=0.7, split="test").bayes_auc(4 * 4096) < 0.72


def test_clusters_are_recoverable_from_the_latents():
    """Saec's premise: ids of a field form clusters, which k-means on the frequent ids' latents finds."""
    ds = RealisticSynthetic(batch_size=4096)
    ids = torch.cat([ds.sample(i)[1] for i in range(4)])
    for f in (2, 9):  # 10M and 93k rows
        u, cnt = torch.unique(ids[:, f], return_counts=True)
        top = _only(f, u[cnt.argsort(descending=True)[:2000]], 26)
        z, c = ds.latents(top)[:, f], ds.clusters(top)[:, f]
        d = torch.cdist(z, z)
        same = c.unsqueeze(0) == c.unsqueeze(1)
        off = ~torch.eye(len(c), dtype=torch.bool)
        within, across = d[same & off].mean().item(), d[~same].mean().item()
        assert within < 0.5 * across, (within, across)
        best = min((kmeans(z, ds.num_clusters, torch.ones(len(z)), iters=50, seed=s) for s in range(5)),
                   key=lambda ca: ((z - ca[0][ca[1]]) ** 2).sum().item())
        ari = adjusted_rand_index(best[1], c)
        assert ari > 0.8, (f, ari)
        # hashed ids are not clustered: the recovered clusters are not an artefact of k-means
        shuffled = c[torch.randperm(len(c), generator=torch.Generator().manual_seed(0))]
        assert adjusted_rand_index(best[1], shuffled) < 0.05


def test_multi_hot_bags_match_synthetic_criteo():
    mh = [1, 3, 1, 5, 2, 1, 1, 4, 1, 1]
    ds = RealisticSynthetic(SMALL, batch_size=64, multi_hot=mh, seed=3)
    one = RealisticSynthetic(SMALL, batch_size=64, seed=3)
    b, b1 = ds.batch(0), one.batch(0)
    assert torch.equal(b.labels, b1.labels) and torch.equal(b.dense_features, b1.dense_features)
    kjt = b.sparse_features
    assert torch.equal(kjt.lengths(), torch.tensor(mh).repeat_interleave(64))
    ref = SyntheticCriteo(SMALL, batch_size=64, multi_hot=mh, seed=3)
    ids = ids_of(b1)
    for f, h in enumerate(mh):
        bags = kjt[f"cat_{f}"].values().view(64, h)
        assert torch.equal(bags[:, 0], ids[:, f]) and torch.equal(bags, ref.bag(f, ids[:, f]))
        assert (bags < SMALL[f]).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(split="val"), "split"),
    (dict(rank=2, world_size=2), "rank"),
    (dict(cardinalities=[10, 0]), "cardinalities"),
    (dict(cardinalities=[2**31]), "cardinalities"),
    (dict(cardinalities=[]), "cardinalities"),
    (dict(zipf_exponent=1.0), "zipf_exponent"),
    (dict(zipf_exponent=[1.2, 1.3]), "zipf_exponent"),
    (dict(zipf_range=(0.9, 1.2)), "zipf_range"),
    (dict(positive_rate=1.0), "positive_rate"),
    (dict(target_auc=0.5), "target_auc"),
    (dict(cluster_spread=0.5, within_spread=0.5), "cluster_spread"),
    (dict(latent_dim=0), "latent_dim"),
    (dict(pairs=[(0, 0)]), "pairs"),
    (dict(pairs=[(0, 10)]), "pairs"),
    (dict(shares=(0.0, 0.0, 0.0)), "shares"),
    (dict(pair_fraction=0.0), "pair_fraction"),
    (dict(multi_hot=[1, 2]), "multi_hot"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_arguments_raise_value_errors(kwargs, match):
    kwargs = {"cardinalities": SMALL, **kwargs}
    with pytest.raises(ValueError, match=match):
        RealisticSynthetic(**kwargs)


# ---------------------------------------------------------------------------------------- models
# Small tables with steep popularity (s = 1.8) so that ~1M samples see most ids often enough to learn
# their latents (at the default s in [1.05, 1.4] far more samples are needed, as on Criteo).
MODEL_DATA = dict(cardinalities=SMALL, batch_size=2048, seed=0, zipf_exponent=1.8)
STEPS, MORE_STEPS, TEST_BATCHES = 200, 400, 15  # 0.4M, then 1.2M training samples; 30k test samples


def _train(dim: int, scheme=None, ratio: float = 1.0):
    feats = cat_names(len(SMALL))
    schemes = {f"t_{f}": presets()[scheme](ratio, dim) for f in feats} if scheme else None
    model = build_dlrm(logical_tables(feats, SMALL, dim), 13, [32], [64, 32, 1], schemes, seed=0)
    dmp, opt = shard_for_training(model, model.sparse_arch, lr_sparse=0.1, lr_dense=0.05, sparse_optimizer="adagrad")
    train_steps(dmp, opt, RealisticSynthetic(num_batches=STEPS, split="train", **MODEL_DATA), progress=False)
    return dmp, opt


def _more(dmp, opt) -> None:
    train_steps(dmp, opt, RealisticSynthetic(num_batches=MORE_STEPS, split="train", start=STEPS, **MODEL_DATA), progress=False)


def _auc(dmp) -> float:
    return binary_metrics(*predictions(dmp, RealisticSynthetic(num_batches=TEST_BATCHES, split="test", **MODEL_DATA)))["auc"]


@pytest.mark.slow
def test_dlrm_approaches_bayes_and_needs_dimension_and_capacity():
    test = RealisticSynthetic(num_batches=TEST_BATCHES, split="test", **MODEL_DATA)
    bayes = test.bayes_auc(TEST_BATCHES * 2048)  # on the very samples the models are tested on
    auc = {}
    with local_process_group():
        auc["hash10x"] = _auc(_train(32, "hashing", 10)[0])
        auc["hash100x"] = _auc(_train(32, "hashing", 100)[0])
        dmp, opt = _train(32)
        auc["dim32"] = _auc(dmp)
        _more(dmp, opt)
        auc["dim32_long"] = _auc(dmp)
        dmp4, opt4 = _train(4)
        _more(dmp4, opt4)
        auc["dim4_long"] = _auc(dmp4)
    print(f"\nBayes AUC {bayes:.4f}; after {STEPS} steps: " + ", ".join(f"{k} {auc[k]:.4f}" for k in ("dim32", "hash10x", "hash100x"))
          + f"; after {STEPS + MORE_STEPS} steps: dim32 {auc['dim32_long']:.4f}, dim4 {auc['dim4_long']:.4f}")
    assert bayes - 0.02 < auc["dim32_long"] < bayes + 0.005  # the truth is learnable, and not beatable
    assert auc["dim4_long"] < auc["dim32_long"] - 0.01  # dimension matters
    assert auc["hash100x"] < auc["hash10x"] - 0.01 and auc["hash100x"] < auc["dim32"] - 0.02  # capacity matters
