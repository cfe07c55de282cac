"""The mch baseline: TorchRec's MCH (LFU) tables, sized to equal bytes, evicted rows reset."""
import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from torchrec_compress.modules.mch import SLOT_BUFFER_BYTES, ManagedCollisionTables, mch_bytes, zch_size_for


def _tables():
    return [EmbeddingBagConfig(name="t_a", embedding_dim=4, num_embeddings=100, feature_names=["a"]),
            EmbeddingBagConfig(name="t_b", embedding_dim=4, num_embeddings=3, feature_names=["b"])]


def _kjt(a, b):
    n = len(a)
    return KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor(a + b), lengths=torch.ones(2 * n, dtype=torch.int64), stride=n)


def test_sizing_counts_the_id_buffers():
    t = EmbeddingBagConfig(name="t_u", embedding_dim=16, num_embeddings=1000, feature_names=["u"])
    zch = zch_size_for(t, 4.0, ids_per_step=512)
    # budget 1000 x 64 / 4 = 16000 B, history 8 x 640 = 5120 B, 88 B per slot (64 B row + 24 B ids)
    assert SLOT_BUFFER_BYTES == 24 and zch == (16000 - 5120) // 88 == 123
    assert mch_bytes(zch, 16, 512) <= 16000 < mch_bytes(zch + 1, 16, 512)
    with pytest.raises(ValueError, match="t_u.*cannot reach 1000x"):
        zch_size_for(t, 1000.0, ids_per_step=512)


def test_frequent_ids_get_own_rows_misses_share_the_last_and_evictions_reset():
    torch.manual_seed(0)
    m = ManagedCollisionTables(_tables(), {"t_a": 3})  # 2 own slots + the shared miss slot
    w = m.mc._embedding_module.embedding_bags["t_a"].weight
    with torch.no_grad():
        w.copy_(torch.arange(12, dtype=torch.float32).view(3, 4) + 1)
    exact = m.exact.embedding_bags["t_b"].weight
    m.train()
    # LFU ranks 7 (seen twice), then 5 and 9 (once; stable order of the sorted unique ids): 7 and 5 take
    # the two slots, into rows reset to zero; 9 is a miss and reads the shared last row, untouched
    out = m(_kjt([7, 7, 9, 5], [0, 1, 2, 0]))
    assert out.keys() == ["a", "b"] and out.values().shape == (4, 8)
    a = out["a"]
    assert torch.equal(a[0], a[1]) and a[0].abs().sum() == 0 and a[3].abs().sum() == 0
    assert torch.equal(a[2], w[2])
    assert torch.equal(out["b"], exact[torch.tensor([0, 1, 2, 0])])  # small table exact
    with torch.no_grad():
        w[:2] = torch.tensor([[1.0] * 4, [2.0] * 4])
    m.eval()
    a = m(_kjt([7, 5, 9, 42], [0, 0, 0, 0]))["a"]  # eval: no admission, no eviction
    assert {a[0, 0].item(), a[1, 0].item()} == {1.0, 2.0} and torch.equal(a[2], a[3]) and torch.equal(a[2], w[2])
    m.train()
    for _ in range(3):  # 9 is now the most frequent: LFU evicts 5 (count 1) and 9 starts from a zeroed row
        a = m(_kjt([9, 9, 9, 7], [0, 0, 0, 0]))["a"]
    assert a[0].abs().sum() == 0 and a[3, 0].item() in (1.0, 2.0)


def test_bench_row_is_equal_bytes(tmp_path):
    import json

    from torchrec_compress.cli import main

    out = tmp_path / "q.json"
    main(["bench", "quality", "--data", "synthetic", "--schemes", "mch", "--ratios", "4", "--seeds", "0", "--epochs", "1",
          "--batches", "4", "--out", str(out)])
    row = {r["scheme"]: r for r in json.loads(out.read_text())["rows"]}["mch"]
    assert 4.0 <= row["achieved_ratio"] < 4.1 and 0.5 < row["auc"] < 1 and "LFU" in row["runs"][0]["config"]
