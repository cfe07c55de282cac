import dataclasses

import torch

import pytest
from torchrec import EmbeddingBagConfig

from torchrec_compress import QR, CompressedEmbeddingBagCollection, FreqThreshold, Hashing, MEmCom, MemRec, SchemeConfig, register_scheme
from torchrec_compress.config import scheme_class_for
from torchrec_compress.schemes.hashing import HashingScheme


def _t(rows=1000, dim=16, name="t"):
    return EmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=rows, feature_names=[f"f_{name}"])


@pytest.mark.parametrize("cls", [Hashing, QR, MEmCom, MemRec, FreqThreshold])
def test_configs_are_frozen_and_reject_bad_ratio(cls):
    cfg = cls(ratio=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.ratio = 2
    for bad in (0.5, 0, -3, "8", True):
        with pytest.raises(ValueError, match="ratio"):
            cls(ratio=bad)
    with pytest.raises(ValueError, match="exactly one"):
        cls()


def test_explicit_sizes_validated():
    with pytest.raises(ValueError, match="rows must be a positive int"):
        Hashing(rows=0)
    with pytest.raises(ValueError, match="exactly one"):
        Hashing(ratio=2, rows=10)
    with pytest.raises(ValueError, match="num_buckets"):
        QR(num_buckets=-1)
    with pytest.raises(ValueError, match="combiner"):
        QR(ratio=2, combiner="max")
    with pytest.raises(ValueError, match="rows"):
        MEmCom(rows=2.5)


def test_sizes_derived_from_ratio():
    assert HashingScheme(_t(1000), Hashing(ratio=10)).rows == 100
    m = CompressedEmbeddingBagCollection([_t(10_000, 64)], {"t": QR(ratio=8)})
    rep = m.memory_report().tables["t"]
    assert rep.ratio >= 8 and rep.ratio < 8.3
    m = CompressedEmbeddingBagCollection([_t(10_000, 64)], {"t": MEmCom(ratio=16)})
    assert 16 <= m.memory_report().tables["t"].ratio < 16.5


def test_unreachable_ratio_is_a_clear_error():
    with pytest.raises(ValueError, match=r"table 't' \(3 x 16\).*at most 3x is reachable"):
        CompressedEmbeddingBagCollection([_t(3, 16)], {"t": Hashing(ratio=16)})
    with pytest.raises(ValueError, match=r"table 't'.*QR needs at least 2\*sqrt\(v\) rows"):
        CompressedEmbeddingBagCollection([_t(100, 16)], {"t": QR(ratio=50)})
    with pytest.raises(ValueError, match=r"MEmCom keeps one fp32 weight per id.*embedding_dim=16"):
        CompressedEmbeddingBagCollection([_t(1000, 16)], {"t": MEmCom(ratio=16)})


def test_bad_tables_and_scheme_maps():
    with pytest.raises(ValueError, match="multiple of 4"):
        CompressedEmbeddingBagCollection([_t(100, 6)], {"t": Hashing(ratio=2)})
    with pytest.raises(ValueError, match="multiple of 4"):
        CompressedEmbeddingBagCollection([_t(100, 6)])
    with pytest.raises(ValueError, match="num_embeddings must be > 0"):
        # torchrec's own config divides by zero rows unless an init range is given
        CompressedEmbeddingBagCollection([EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=0, weight_init_min=-1.0, weight_init_max=1.0)])
    with pytest.raises(ValueError, match=r"unknown tables \['nope'\]"):
        CompressedEmbeddingBagCollection([_t()], {"nope": Hashing(ratio=2)})
    with pytest.raises(ValueError, match="must be a SchemeConfig"):
        CompressedEmbeddingBagCollection([_t()], {"t": "hashing"})
    with pytest.raises(ValueError, match="divisible by 8"):
        CompressedEmbeddingBagCollection([_t(1000, 12)], {"t": QR(ratio=2, combiner="concat")})
    with pytest.raises(ValueError, match="duplicate table names"):
        CompressedEmbeddingBagCollection([_t(), _t()])


def test_registry_rejects_duplicates_and_unknown():
    @dataclasses.dataclass(frozen=True)
    class NotRegistered(SchemeConfig):
        pass

    with pytest.raises(ValueError, match="no scheme registered for config .*NotRegistered.*known schemes: FIITED, FreqThreshold, Hashing, MEmCom, MPE, MemRec, MixedDim, MixedPrecision, QR, Saec"):
        scheme_class_for(NotRegistered(ratio=2))
    with pytest.raises(ValueError, match="already registered"):
        register_scheme(Hashing)(HashingScheme)


def test_memrec_config_and_criteotb_scale_ratio():
    with pytest.raises(ValueError, match="hashes must be a positive int"):
        MemRec(ratio=10, hashes=0)
    with pytest.raises(ValueError, match="weight_dim must be 1"):
        MemRec(ratio=10, weight_dim=3)
    with pytest.raises(ValueError, match="weight_rows= goes with rows="):
        MemRec(ratio=10, weight_rows=8)
    # one 40M-row CriteoTB table at dim 128: memory independent of the vocabulary
    t = EmbeddingBagConfig(name="t", embedding_dim=128, num_embeddings=40_000_000, feature_names=["f"])
    m = CompressedEmbeddingBagCollection([t], {"t": MemRec(ratio=2000)}, device=torch.device("meta"))
    rep = m.memory_report().tables["t"]
    assert rep.ratio >= 2000 and rep.compressed_bytes < 40_000_000 * 128 * 4 / 1999
