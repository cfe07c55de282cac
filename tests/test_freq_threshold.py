import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from torchrec_compress import CompressedEmbeddingBagCollection, FreqThreshold, Hashing, fit_
from torchrec_compress.stats import FrequencyStats


def _zipf_kjt(v: int, n: int, seed: int, key: str = "f") -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.clamp((v ** torch.rand(n, generator=g)).long() - 1, 0, v - 1)
    return KeyedJaggedTensor(keys=[key], values=ids, lengths=torch.ones(n, dtype=torch.int64))


def test_fit_keeps_the_most_frequent_ids_above_min_count():
    t = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=10_000, feature_names=["f"])
    m = CompressedEmbeddingBagCollection([t], {"t": FreqThreshold(capacity=50, shared_rows=10, min_count=3)})
    stats = FrequencyStats({"f": 10_000})
    kjt = _zipf_kjt(10_000, 5000, seed=0)
    stats.update(kjt)
    assert fit_(m, stats) == {"t": "FreqThreshold"} and m.scheme("t").kept() == 50 and m.scheme("t").fitted()
    counts = torch.bincount(kjt.values(), minlength=10_000)
    kept = m.scheme_states()["t"].frequent_ids
    assert torch.equal(kept, kept.sort().values)
    assert counts[kept.long()].min() >= 3
    assert counts[kept.long()].min() >= counts.topk(51).values[-1]  # nothing rarer kept than left out
    # each kept id reads its own row; a rare id reads one of the 10 shared rows
    rows = m.scheme("t").transform(kept.long())[0]
    assert torch.equal(rows, torch.arange(50))
    rare = (counts == 0).nonzero()[:100].squeeze(1)
    assert ((m.scheme("t").transform(rare)[0] >= 50) & (m.scheme("t").transform(rare)[0] < 60)).all()


def test_min_count_leaves_capacity_unused_and_state_dict_carries_map():
    t = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=1000, feature_names=["f"])
    m = CompressedEmbeddingBagCollection([t], {"t": FreqThreshold(capacity=500, min_count=50)})
    stats = FrequencyStats({"f": 1000})
    stats.update(_zipf_kjt(1000, 2000, seed=1))
    fit_(m, stats)
    n = m.scheme("t").kept()
    assert 0 < n < 500
    m2 = CompressedEmbeddingBagCollection([t], {"t": FreqThreshold(capacity=500, min_count=50)})
    m2.load_state_dict(m.state_dict())
    kjt = _zipf_kjt(1000, 64, seed=2)
    assert torch.equal(m(kjt).values(), m2(kjt).values())


def test_ratio_sizes_and_memory_report_count_the_map():
    t = EmbeddingBagConfig(name="t", embedding_dim=64, num_embeddings=1_000_000, feature_names=["f"])
    m = CompressedEmbeddingBagCollection([t], {"t": FreqThreshold(ratio=27)}, device=torch.device("meta"))
    rep = m.memory_report().tables["t"]
    assert 27 <= rep.ratio < 27.5
    assert rep.parts["t (maps)"] == m.scheme("t").capacity * 4  # int32 ids


def test_sketched_statistics_feed_the_map():
    t = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=50_000_000, feature_names=["f"])
    m = CompressedEmbeddingBagCollection([t], {"t": FreqThreshold(capacity=20, shared_rows=4, fit_steps=0)}, device=torch.device("meta"))
    state = m.scheme_states()["t"]
    for name, b in list(state.named_buffers()):  # materialize only the map (the table would take 1.6 GB)
        setattr(state, name, torch.zeros_like(b, device="cpu"))
    stats = FrequencyStats({"f": 50_000_000}, sketch_width=1 << 12, top_k=100)
    kjt = _zipf_kjt(50_000_000, 4000, seed=3)
    stats.update(kjt)
    assert "f" in stats.sketch
    fit_(m, stats)
    top = set(torch.bincount(kjt.values()).topk(10).indices.tolist())
    assert len(top & set(m.scheme_states()["t"].frequent_ids.tolist())) >= 9


def test_fit_errors():
    t = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=100, feature_names=["f"])
    assert fit_(CompressedEmbeddingBagCollection([t], {"t": Hashing(ratio=2)}), FrequencyStats({"f": 100})) == {}  # nothing to fit
    with pytest.raises(ValueError, match=r"table 't': no statistics for features \['f'\]"):
        fit_(CompressedEmbeddingBagCollection([t], {"t": FreqThreshold(capacity=5)}), FrequencyStats({"g": 100}))


def test_fit_from_batches_equals_fit_from_stats():
    t = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=10_000, feature_names=["f"])
    kjts = [_zipf_kjt(10_000, 1000, seed=s) for s in range(3)]
    a = CompressedEmbeddingBagCollection([t], {"t": FreqThreshold(capacity=30)})
    b = CompressedEmbeddingBagCollection([t], {"t": FreqThreshold(capacity=30)})
    fit_(a, kjts)
    fit_(b, FrequencyStats({"f": 10_000}).update_from(kjts, progress=False))
    assert torch.equal(a.scheme_states()["t"].frequent_ids, b.scheme_states()["t"].frequent_ids)
