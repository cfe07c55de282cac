from collections import Counter

import pytest
import torch

from torchrec_compress.stats import CountMinSketch, FrequencyStats
from torchrec_compress.testing.multiprocess import run_on_ranks
from torchrec_compress.testing.stats import VOCAB, stats_all_reduce_worker, zipf_kjts


def _counter(kjts, feature):
    c = Counter()
    for k in kjts:
        c.update(k[feature].values().tolist())
    return c


def _stats():
    return FrequencyStats(VOCAB, exact_limit=10_000, sketch_width=1 << 14, top_k=64)


def test_exact_counts_match_counter_and_sketch_bounds_hold():
    kjts = zipf_kjts(seed=0)
    s = _stats().update_from(kjts, progress=False)
    assert "small" in s.exact and "big" in s.sketch
    c = _counter(kjts, "small")
    ids = torch.arange(1000)
    assert s.count("small", ids).tolist() == [c[i] for i in range(1000)]
    cb = _counter(kjts, "big")
    seen = torch.tensor(sorted(cb))
    est = s.count("big", seen)
    truth = torch.tensor([cb[i] for i in seen.tolist()])
    assert (est >= truth).all()  # count-min never underestimates
    n = s.total("big")
    assert n == sum(cb.values()) == 2560
    # e * N / width bound with probability 1 - e^-4 per id; allow a few exceptions
    assert ((est - truth) > 2.72 * n / (1 << 14)).float().mean() < 0.05


def test_top_k_recovers_heavy_hitters():
    kjts = zipf_kjts(seed=1)
    s = _stats().update_from(kjts, progress=False)
    for f in VOCAB:
        c = _counter(kjts, f)
        true_top = {i for i, _ in c.most_common(10)}
        ids, counts = s.top_k(f, 10)
        assert (counts[:-1] >= counts[1:]).all()
        # ties at the 10th count make the exact top-10 set ambiguous
        assert len(set(ids.tolist()) & true_top) >= 8


def test_merge_equals_counting_everything_and_save_load(tmp_path):
    a = _stats().update_from(zipf_kjts(seed=0), progress=False)
    b = _stats().update_from(zipf_kjts(seed=1), progress=False)
    both = _stats().update_from(zipf_kjts(seed=0) + zipf_kjts(seed=1), progress=False)
    a.merge_(b)
    assert torch.equal(a.exact["small"], both.exact["small"])
    assert torch.equal(a.sketch["big"].table, both.sketch["big"].table)
    assert a.totals == both.totals
    a.save(str(tmp_path / "s.pt"))
    c = FrequencyStats.load(str(tmp_path / "s.pt"))
    ids = torch.arange(0, 5_000_000, 997)
    assert torch.equal(c.count("big", ids), a.count("big", ids))
    assert torch.equal(c.top_k("small", 5)[0], a.top_k("small", 5)[0])


def test_bad_input():
    with pytest.raises(ValueError, match=r"feature 'small': id 1000 outside \[0, 1000\)"):
        _stats().update(zipf_kjts(seed=0)[0].__class__(keys=["small"], values=torch.tensor([1000]), lengths=torch.tensor([1])))
    with pytest.raises(ValueError, match="num_embeddings=0"):
        FrequencyStats({"x": 0})
    with pytest.raises(ValueError, match="width and depth"):
        CountMinSketch(width=0)


@pytest.mark.slow
def test_all_reduce_2ranks_equals_single_process():
    per_rank = run_on_ranks(stats_all_reduce_worker)
    single = _stats().update_from(zipf_kjts(seed=0) + zipf_kjts(seed=1), progress=False)
    for sd in per_rank:
        assert torch.equal(sd["exact"]["small"], single.exact["small"])
        assert torch.equal(sd["sketch"]["big"][3], single.sketch["big"].table)
        assert sd["totals"] == single.totals
        assert set(sd["heavy"]["big"][0][:10].tolist()) == set(single.top_k("big", 10)[0].tolist())
