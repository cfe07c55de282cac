"""SyntheticCriteo: deterministic, Criteo-shaped, Zipf-skewed, and labels that depend on the ids."""
import time

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES

from torchrec_compress.data import CRITEO_KAGGLE_CARDINALITIES, SyntheticCriteo, ids_of
from torchrec_compress.data.realistic import RealisticSynthetic


def _same(a, b):
    return (torch.equal(a.dense_features, b.dense_features) and torch.equal(a.labels, b.labels)
            and torch.equal(a.sparse_features.values(), b.sparse_features.values()))


def test_deterministic_and_streams_differ():
    a, b = SyntheticCriteo(batch_size=512, num_batches=3, seed=7), SyntheticCriteo(batch_size=512, num_batches=3, seed=7)
    assert all(_same(x, y) for x, y in zip(a, b))
    assert _same(a.batch(2), list(b)[2])  # random access == iteration
    assert not _same(a.batch(0), a.batch(1))
    assert not _same(a.batch(0), SyntheticCriteo(batch_size=512, seed=8).batch(0))
    assert not _same(a.batch(0), SyntheticCriteo(batch_size=512, seed=7, split="eval").batch(0))


@pytest.mark.parametrize("gen", [SyntheticCriteo, RealisticSynthetic])
def test_ranks_partition_the_single_process_stream(gen):
    single = gen(batch_size=64, num_batches=6, seed=1)
    r0 = gen(batch_size=64, num_batches=3, seed=1, rank=0, world_size=2)
    r1 = gen(batch_size=64, num_batches=3, seed=1, rank=1, world_size=2)
    for i in range(3):
        assert _same(r0.batch(i), single.batch(2 * i)) and _same(r1.batch(i), single.batch(2 * i + 1))
    assert not _same(r0.batch(0), r1.batch(0))


@pytest.mark.parametrize("gen", [SyntheticCriteo, RealisticSynthetic])
def test_shapes_keys_and_dtypes(gen):
    """Both generators: the same Batch layout (RealisticSynthetic is a drop-in)."""
    ds = gen(batch_size=300, num_batches=2)
    assert len(ds) == 2 and len(list(ds)) == 2
    b = ds.batch(0)
    assert b.dense_features.shape == (300, 13) and b.dense_features.dtype == torch.float32
    assert (b.dense_features >= 0).all() and torch.isfinite(b.dense_features).all()
    kjt = b.sparse_features
    assert kjt.keys() == DEFAULT_CAT_NAMES and kjt.stride() == 300
    assert kjt.values().dtype == torch.int64 and kjt.values().numel() == 26 * 300
    assert torch.equal(kjt.lengths(), torch.ones(26 * 300, dtype=kjt.lengths().dtype))
    assert b.labels.shape == (300,) and b.labels.dtype == torch.float32
    assert set(b.labels.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(kjt["cat_3"].values(), ids_of(b)[:, 3])  # ids_of undoes the feature-major layout


def test_ids_in_range_including_extreme_cardinalities():
    cards = CRITEO_KAGGLE_CARDINALITIES + [1, 2, 2**31 - 1]
    ds = SyntheticCriteo(cardinalities=cards, batch_size=4096)
    ids = torch.cat([ids_of(ds.batch(i)) for i in range(3)])
    v = torch.tensor(cards)
    assert (ids >= 0).all() and (ids < v).all()
    assert ids[:, 26].eq(0).all() and set(ids[:, 27].tolist()) == {0, 1}
    assert ids[:, 2].unique().numel() > 1000  # the 10M table's long tail is reached


def test_zipf_skew_with_scrambled_ids():
    ds = SyntheticCriteo(batch_size=4096)
    ids = torch.cat([ids_of(ds.batch(i)) for i in range(10)])  # 40960 samples
    for f in (0, 9, 2):  # 1460, 93k and 10M rows
        v = ds.cardinalities[f]
        counts = torch.bincount(ids[:, f], minlength=v).sort(descending=True).values
        top_share = counts[: max(1, v // 100)].sum().item() / ids.shape[0]
        assert top_share > 0.4, (f, top_share)  # uniform ids would give ~0.01
        # the most frequent id is scattered by the permutation, not id 0
        assert torch.bincount(ids[:, f]).argmax().item() > 2
    # frequent ids of different features are not the same rank order: permutations differ per feature
    assert torch.bincount(ids[:, 0]).argmax() != torch.bincount(ids[:, 1]).argmax()


def test_label_rate():
    ds = SyntheticCriteo(batch_size=4096, positive_rate=0.25)
    rate = torch.cat([ds.batch(i).labels for i in range(10)]).mean().item()
    assert 0.23 < rate < 0.27
    low = SyntheticCriteo(batch_size=4096, positive_rate=0.05)
    assert torch.cat([low.batch(i).labels for i in range(5)]).mean().item() < 0.07


def test_hidden_scores_are_deterministic_hashes_with_unit_variance():
    ds = SyntheticCriteo()
    ids = ids_of(ds.batch(0))
    s = ds.hidden_scores(ids)
    assert torch.equal(s, SyntheticCriteo().hidden_scores(ids))
    assert abs(s.mean().item()) < 0.05 and abs(s.var().item() - 1.0) < 0.05
    # scores do not follow id order: neighbouring ids are uncorrelated
    big = torch.arange(100_000).unsqueeze(1).expand(-1, 26)
    sb = ds.hidden_scores(big)[:, 2]
    assert abs(torch.corrcoef(torch.stack([sb[:-1], sb[1:]]))[0, 1].item()) < 0.02


def test_logistic_model_on_hidden_scores_beats_chance():
    train = SyntheticCriteo(batch_size=8192, seed=3)
    held = SyntheticCriteo(batch_size=8192, seed=3, split="eval")
    b, t = train.batch(0), held.batch(0)
    x = train.hidden_scores(ids_of(b))  # [B, 26]: ids only, no dense features
    w = torch.zeros(x.shape[1], requires_grad=True)
    c = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, c], max_iter=100)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + c, b.labels)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        auc = binary_auroc(torch.sigmoid(held.hidden_scores(ids_of(t)) @ w + c), t.labels.long()).item()
    assert auc > 0.75
    # it found the informative features: their weights dominate the others
    inf = torch.zeros(26, dtype=torch.bool)
    inf[train.informative] = True
    assert w[inf].abs().min() > w[~inf].abs().max()
    # and shuffling the ids across samples destroys the signal
    shuffled = ids_of(t)[torch.randperm(8192, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        auc_shuffled = binary_auroc(torch.sigmoid(held.hidden_scores(shuffled) @ w + c), t.labels.long()).item()
    assert abs(auc_shuffled - 0.5) < 0.05


def test_batch_of_4096_is_fast():
    ds = SyntheticCriteo(batch_size=4096)
    ds.batch(0)  # warm-up (lazy torch / torchrec initialisation)
    times = []
    for i in range(5):
        t = time.perf_counter()
        ds.batch(i)
        times.append(time.perf_counter() - t)
    assert sorted(times)[2] < 0.05


@pytest.mark.parametrize("kwargs", [dict(split="dev"), dict(rank=2, world_size=2), dict(cardinalities=[0, 5]),
                                    dict(cardinalities=[2**31]), dict(zipf_exponent=1.0)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        SyntheticCriteo(**kwargs)
