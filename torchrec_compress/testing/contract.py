"""The contract every registered scheme is held to, whatever it is (the registry's presets and
a toy scheme registered inside a test alike): forward and gradients equal its declared
plain-torch reference, fitted or not; bad ids raise a ValueError naming table and feature."""
from __future__ import annotations

import copy
import warnings
from typing import List

import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from ..config import SchemeConfig
from ..modules import CompressedEmbeddingBagCollection
from ..modules.compress import fit_
from .data import random_bags
from .reference import physical_weights, reference_forward, reference_leaves


def contract_tables(dim: int = 16) -> List[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name="t0", embedding_dim=dim, num_embeddings=997, feature_names=["a", "b"]),
            EmbeddingBagConfig(name="t1", embedding_dim=dim, num_embeddings=301, feature_names=["c"], pooling=PoolingType.MEAN)]


def check_against_reference(config: SchemeConfig, seed: int = 0, fit: bool = True, dim: int = 16) -> None:
    """``config`` on both contract tables: output and every physical table's gradient equal the
    reference (``reference_forward``), after ``fit_`` from random statistics (``fit``) or not."""
    torch.manual_seed(seed)
    tables = contract_tables(dim)
    schemes = {t.name: config for t in tables}
    m = CompressedEmbeddingBagCollection(copy.deepcopy(tables), schemes)
    with torch.no_grad():  # off the init values (e.g. MEmCom's w = 1), so products are tested
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. Saec: fewer seen ids than clusters
        if fit:
            fit_(m, [random_bags(tables, 40, seed=seed + 7, max_len=5).kjt()],
                 embeddings={t.name: torch.randn(t.num_embeddings, t.embedding_dim) for t in tables})
        m.eval()  # the lookup equations (the procedures' own steps: test_lifecycle)
        bags = random_bags(tables, 6, seed=seed + 1, max_len=5)
        out = m(bags.kjt())
    assert out.keys() == ["a", "b", "c"] and out.length_per_key() == [dim] * 3
    ref_w, maps = reference_leaves(m)
    ref = reference_forward(tables, schemes, ref_w, bags, maps)
    torch.testing.assert_close(out.values(), ref, rtol=1e-4, atol=1e-5)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed))
    (out.values() * g).sum().backward()
    if ref.requires_grad:
        (ref * g).sum().backward()
    for n, p in physical_weights(m).items():
        mine = torch.zeros_like(p) if p.grad is None else p.grad
        theirs = torch.zeros_like(p) if ref_w[n].grad is None else ref_w[n].grad
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4, msg=lambda s: f"grad of {n}: {s}")
    bad = KeyedJaggedTensor(keys=["a", "b", "c"], values=torch.tensor([1, -3, 2]), lengths=torch.ones(3, dtype=torch.int64))
    try:
        m(bad)
    except ValueError as e:
        assert "table 't0', feature 'b': negative id -3" in str(e), str(e)
    else:
        raise AssertionError(f"{config!r}: a negative id did not raise")
