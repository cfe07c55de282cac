"""A synthetic Criteo-like click data set with a hidden model to learn.

Each sample has 13 dense count features and 26 one-hot categorical features with the
Criteo Kaggle vocabulary sizes. Categorical ids follow a truncated power law (Zipf), then
go through a fixed per-feature bijection ``(a * rank + b) mod v`` so that the frequent
ids are scattered over the table instead of being 0, 1, 2, ... The label is a Bernoulli
draw from a hidden logistic model: every (feature, id) of the *informative* features has
a deterministic pseudo-random score computed by hashing (no per-id tables: vocabularies
reach 10M), plus a linear term on the dense features. Nothing is stored per id, so the
full Kaggle cardinalities cost nothing.

Everything is vectorised in torch and a batch is a pure function of
``(seed, split, global batch index)``, so runs, ranks and restarts see the same data.
"""
from __future__ import annotations

import math
from typing import Iterator, List, Optional, Sequence

import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ..ops import MERSENNE_P, _splitmix64

# Criteo Kaggle (Display Advertising Challenge) vocabulary sizes of cat_0 .. cat_25.
CRITEO_KAGGLE_CARDINALITIES: List[int] = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]
NUM_DENSE = 13
SPLITS = ("train", "eval", "test")


def cat_names(n: int) -> List[str]:
    """``cat_0 .. cat_{n-1}``, the names of ``torchrec.datasets.criteo.DEFAULT_CAT_NAMES``."""
    return [f"cat_{i}" for i in range(n)]


def _mix(*xs: int) -> int:
    """A 64-bit hash of a tuple of non-negative ints (seeds generators and constants)."""
    h = 0x243F6A8885A308D3
    for x in xs:
        h = _splitmix64(h ^ (x & 0xFFFFFFFFFFFFFFFF))
    return h


def _coprime_multiplier(v: int, start: int) -> int:
    """Smallest ``a >= start mod v`` with ``gcd(a, v) == 1``, so ``x -> a x mod v`` is a bijection."""
    if v == 1:
        return 1
    a = max(1, start % v)
    while math.gcd(a, v) != 1:
        a = a % (v - 1) + 1
    return a


class SyntheticCriteo:
    """Iterable of ``torchrec.datasets.utils.Batch`` drawn from a hidden click model.

    Args:
        cardinalities: vocabulary size per categorical feature (``cat_i``), each < 2^31.
        batch_size: B, samples per batch.
        num_batches: batches this rank yields per pass.
        seed: picks the hidden model (id scores, feature weights, id permutations) and
            the sample streams; the same seed gives the same data everywhere.
        split: ``train`` | ``eval`` | ``test``: disjoint sample streams of the same hidden model.
        rank, world_size: rank r yields global batches ``r, r + W, r + 2W, ...``, so ranks
            see different data and together see the single-process stream.
        zipf_exponent: s of the power law P(rank k) ~ k^-s over the vocabulary.
        positive_rate: the bias of the hidden model is calibrated to this mean label.
        informative: indices of features whose ids carry signal (default: every other one,
            which mixes tiny, mid-size and 10M-row tables).
        signal: scale of the per-feature score weights (logit units).
        multi_hot: ids per sample for each feature (e.g. ``data.mlperf.DLRMV2_MULTI_HOT``),
            default one. As in MLPerf DLRMv2's materialized multi-hot data set, the bag of
            feature f is the one-hot id followed by ``multi_hot[f] - 1`` ids that are a fixed
            function of it (a hash, uniform over the table): labels and one-hot ids are those
            of the one-hot stream, only the bags grow.
        start: index of the first batch yielded (e.g. ``epoch * num_batches``: every epoch
            fresh samples of the same hidden model).

    Each batch: ``dense_features [B, 13] float32`` (log1p of counts, as DLRM expects),
    ``sparse_features`` KJT with keys ``cat_0..cat_{F-1}``, lengths all 1, int64 values
    feature-major (``[F * B]``), ``labels [B] float32`` in {0, 1}.
    """

    def __init__(
        self,
        cardinalities: Sequence[int] = CRITEO_KAGGLE_CARDINALITIES,
        batch_size: int = 4096,
        num_batches: int = 100,
        seed: int = 0,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        zipf_exponent: float = 1.1,
        positive_rate: float = 0.25,
        informative: Optional[Sequence[int]] = None,
        signal: float = 0.6,
        multi_hot: Optional[Sequence[int]] = None,
        start: int = 0,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if any(not 1 <= v < 2**31 for v in cardinalities):
            raise ValueError(f"cardinalities must be in [1, 2^31), got {list(cardinalities)}")
        if zipf_exponent <= 1.0:
            raise ValueError(f"zipf_exponent must be > 1, got {zipf_exponent}")
        self.cardinalities = [int(v) for v in cardinalities]
        self.multi_hot = [1] * len(self.cardinalities) if multi_hot is None else [int(h) for h in multi_hot]
        if len(self.multi_hot) != len(self.cardinalities) or min(self.multi_hot, default=1) < 1:
            raise ValueError(f"multi_hot must give one size >= 1 per feature ({len(self.cardinalities)}), got {list(multi_hot or [])}")
        self.keys = cat_names(len(self.cardinalities))
        self.batch_size, self.num_batches = batch_size, num_batches
        self.seed, self.split, self.rank, self.world_size = seed, split, rank, world_size
        self.start = start
        self.zipf_exponent = zipf_exponent
        nf = len(self.cardinalities)
        self.informative = sorted(range(0, nf, 2) if informative is None else informative)

        # --- the hidden world: everything below depends on `seed` only (not split / rank)
        g = torch.Generator().manual_seed(_mix(seed, 1) % 2**63)
        self._v = torch.tensor(self.cardinalities, dtype=torch.int64)  # [F]
        perm_a = [_coprime_multiplier(v, _mix(seed, 2, f)) for f, v in enumerate(self.cardinalities)]
        self._perm_a = torch.tensor(perm_a, dtype=torch.int64)  # [F], coprime to v
        self._perm_b = torch.tensor([_mix(seed, 3, f) % v for f, v in enumerate(self.cardinalities)], dtype=torch.int64)
        # score hash constants in [1, P): two affine rounds mod the Mersenne prime P
        self._k = torch.tensor([[1 + _mix(seed, 4, f, j) % (MERSENNE_P - 1) for j in range(4)] for f in range(nf)], dtype=torch.int64)
        w = torch.zeros(nf)
        w[self.informative] = signal * (0.5 + torch.rand(len(self.informative), generator=g))
        self.feature_weights = w  # [F]
        # dense counts: log-normal with per-feature location and spread; a linear term on them
        self._dense_mu = 4.0 * torch.rand(NUM_DENSE, generator=g)
        self._dense_sigma = 0.5 + torch.rand(NUM_DENSE, generator=g)
        self.dense_weights = 0.3 * torch.randn(NUM_DENSE, generator=g)  # [13]
        self.bias = 0.0
        self.bias = self._calibrate_bias(positive_rate)
        # multi-hot expansion: id k >= 1 of a bag is ((a_fk x + b_fk) mod P) mod v_f
        self._hot_k = {f: torch.tensor([[1 + _mix(seed, 7, f, k, j) % (MERSENNE_P - 1) for j in range(2)] for k in range(1, h)],
                                       dtype=torch.int64) for f, h in enumerate(self.multi_hot) if h > 1}

    # ------------------------------------------------------------------ hidden model
    def hidden_scores(self, ids: torch.Tensor) -> torch.Tensor:
        """Per-(feature, id) score of the hidden model, mean 0, variance 1, unweighted.

        ``ids [B, F]`` int64 -> ``[B, F]`` float32; deterministic in (seed, feature, id).
        """
        k = self._k
        x = torch.remainder(ids, MERSENNE_P)
        # every product is < 2^31 * 2^31 = 2^62: no int64 overflow
        x = torch.remainder(x * k[:, 0] + k[:, 1], MERSENNE_P)
        x = x ^ (x >> 13)  # break the affine structure between the two rounds
        x = torch.remainder(x * k[:, 2] + k[:, 3], MERSENNE_P)
        u = x.to(torch.float64) / MERSENNE_P
        return ((u - 0.5) * math.sqrt(12.0)).to(torch.float32)

    def logits(self, dense_z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Hidden logit: ``dense_z [B, 13]`` standardised dense latents, ``ids [B, F]`` -> ``[B]``."""
        return self.bias + self.hidden_scores(ids) @ self.feature_weights + dense_z @ self.dense_weights

    def _calibrate_bias(self, rate: float) -> float:
        """Bias b with mean(sigmoid(logit + b)) = rate on a fixed calibration sample (bisection)."""
        g = torch.Generator().manual_seed(_mix(self.seed, 5) % 2**63)
        z, ids = self._draw(g, 1 << 15)
        base = self.logits(z, ids).double()
        lo, hi = -20.0, 20.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if torch.sigmoid(base + mid).mean().item() < rate else (lo, mid)
        return (lo + hi) / 2

    # ------------------------------------------------------------------ sampling
    def _draw(self, g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` samples of (dense latents ``[n, 13]`` ~ N(0, 1), ids ``[n, F]`` int64)."""
        z = torch.randn(n, NUM_DENSE, generator=g)
        # Inverse CDF of the continuous power law x^-s on [1, v + 1): x = (1 - u c)^(1 / (1 - s)),
        # c = 1 - (v + 1)^(1 - s); rank = floor(x) - 1 in [0, v). float64 keeps 10M-row tails exact enough.
        s = self.zipf_exponent
        v = self._v.to(torch.float64)
        c = 1.0 - torch.pow(v + 1.0, 1.0 - s)  # [F]
        u = torch.rand(n, len(self.cardinalities), generator=g, dtype=torch.float64)
        x = torch.pow(1.0 - u * c, 1.0 / (1.0 - s))
        rank = torch.minimum(x.floor().to(torch.int64) - 1, self._v - 1).clamp_(min=0)
        ids = torch.remainder(rank * self._perm_a + self._perm_b, self._v)  # a*rank < 2^62
        return z, ids

    def batch(self, index: int) -> Batch:
        """This rank's ``index``-th batch (global batch ``index * world_size + rank``)."""
        stream = SPLITS.index(self.split)
        g = torch.Generator().manual_seed(_mix(self.seed, 6, stream, index * self.world_size + self.rank) % 2**63)
        z, ids = self._draw(g, self.batch_size)
        labels = torch.bernoulli(torch.sigmoid(self.logits(z, ids)), generator=g)
        counts = torch.floor(torch.exp(self._dense_mu + self._dense_sigma * z))  # non-negative "counts"
        return Batch(dense_features=torch.log1p(counts), sparse_features=self.features(ids), labels=labels)

    def features(self, ids: torch.Tensor) -> KeyedJaggedTensor:
        """The KJT of one-hot ``ids [B, F]``: feature-major values, each expanded to its bag."""
        b, nf = ids.shape
        if not self._hot_k:
            values, lengths = ids.t().reshape(-1), torch.ones(nf * b, dtype=torch.int64)  # feature-major, as a KJT stores them
        else:
            values = torch.cat([self.bag(f, ids[:, f]).reshape(-1) for f in range(nf)])
            lengths = torch.tensor(self.multi_hot, dtype=torch.int64).repeat_interleave(b)
        return KeyedJaggedTensor(keys=self.keys, values=values, lengths=lengths, stride=b)

    def bag(self, feature: int, ids: torch.Tensor) -> torch.Tensor:
        """The multi-hot bags ``[B, multi_hot[feature]]`` of one-hot ``ids [B]``; column 0 is ``ids``."""
        if feature not in self._hot_k:
            return ids.unsqueeze(1)
        k = self._hot_k[feature]  # [h - 1, 2]
        x = torch.remainder(ids.unsqueeze(1) * k[:, 0] + k[:, 1], MERSENNE_P)  # ids, a < 2^31: no int64 overflow
        return torch.cat([ids.unsqueeze(1), torch.remainder(x, self.cardinalities[feature])], dim=1)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        for i in range(self.start, self.start + self.num_batches):
            yield self.batch(i)


def ids_of(batch: Batch) -> torch.Tensor:
    """The one-hot ids of a batch as ``[B, F]`` (inverse of the feature-major KJT layout)."""
    kjt = batch.sparse_features
    return kjt.values().view(len(kjt.keys()), -1).t()
