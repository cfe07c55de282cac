"""MixedDim (md), the equal-bytes baseline: sizing from ratio, a hand-computed case, pooling
through the projection, export. (Reference, sharding parity: test_registry, test_sharded.)"""
import pytest
import torch
from torchrec import EmbeddingBagConfig, PoolingType

from torchrec_compress import CompressedEmbeddingBagCollection, MixedDim
from torchrec_compress.quant import export
from torchrec_compress.testing.data import Bags
from torchrec_compress.testing.reference import physical_weights


def test_ratio_picks_the_largest_dim_that_fits_and_counts_the_projection():
    t = EmbeddingBagConfig(name="t", embedding_dim=64, num_embeddings=100_000, feature_names=["f"])
    m = CompressedEmbeddingBagCollection([t], {"t": MixedDim(ratio=4)}, device=torch.device("meta"))
    assert m.scheme("t").dim == 12  # 16 would need 100k x 16 + 16 x 64 floats > 1/4 of 100k x 64: d' = 15.99 -> 12
    rep = m.memory_report().tables["t"]
    assert rep.compressed_bytes == 100_000 * 12 * 4 + 12 * 64 * 4 and rep.ratio == pytest.approx(64 / 12, rel=1e-3)
    with pytest.raises(ValueError, match=r"table 't' \(300 x 16\).*smallest table FBGEMM trains"):
        CompressedEmbeddingBagCollection([EmbeddingBagConfig(name="t", embedding_dim=16, num_embeddings=300, feature_names=["f"])],
                                         {"t": MixedDim(ratio=4)})
    with pytest.raises(ValueError, match="multiple of 4"):
        MixedDim(dim=6)
    with pytest.raises(ValueError, match="exactly one of ratio= or dim="):
        MixedDim(ratio=2, dim=4)


def test_hand_case_mean_bag_through_the_projection_and_gradient():
    t = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=10, feature_names=["f"], pooling=PoolingType.MEAN)
    m = CompressedEmbeddingBagCollection([t], {"t": MixedDim(dim=4)})
    w, proj = physical_weights(m)["t__md"], m.scheme_states()["t"].proj
    with torch.no_grad():
        w.copy_(torch.arange(40.0).reshape(10, 4))
        proj.copy_(torch.eye(4, 8) * 2)  # e(x) = 2 [E[x], 0, 0, 0, 0]
    out = m(Bags(["f"], {"f": [[1, 3]]}).kjt()).values()
    torch.testing.assert_close(out[0], torch.cat([(torch.arange(4.0, 8.0) + torch.arange(12.0, 16.0)), torch.zeros(4)]))  # 2 x mean
    out.sum().backward()
    torch.testing.assert_close(proj.grad[:, 0], torch.arange(8.0, 12.0))  # d sum / d P[i, j] = mean bag[i]
    torch.testing.assert_close(w.grad[1], torch.full((4,), 1.0))  # (1/2) x row sums of P = 1


def test_export_keeps_the_projection_and_quantizes_the_table():
    t = EmbeddingBagConfig(name="t", embedding_dim=16, num_embeddings=200, feature_names=["f"])
    m = CompressedEmbeddingBagCollection([t], {"t": MixedDim(dim=8)}).eval()
    kjt = Bags(["f"], {"f": [[1, 2], [199], []]}).kjt()
    q = export(m, default="fp32")
    torch.testing.assert_close(q(kjt).values(), m(kjt).values())
    q8 = export(m, default="int8")
    assert (q8(kjt).values() - m(kjt).values()).abs().max() < 0.01
