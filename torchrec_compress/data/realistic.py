"""A realistic synthetic CTR data set: clustered multi-dimensional id latents, pairwise
field interactions and a calibrated Bayes-optimal AUC.

Drop-in for :class:`~torchrec_compress.data.synthetic.SyntheticCriteo` (same batches,
streams, ranks and splits) whose hidden model makes embedding *dimension* and *capacity*
matter, and whose ids form per-field clusters (the premise of clustering schemes such as
Saec). Samples have 13 dense count features and F categorical features (Criteo Kaggle
vocabulary sizes by default, any size < 2^31).

The hidden model (everything depends on ``seed`` only; ``f, g`` index fields)::

    ids       rank ~ Zipf(s_f) on [0, v_f),   s_f ~ U[1.05, 1.4] per field (or given)
              id   = (a_f * rank + b_f) mod v_f          (a_f coprime to v_f: frequent ids scattered)
    cluster   c_f(id) = h_f(id) mod C                    (C = 32 clusters per field)
    latent    z_f(id) = mu[f, c_f(id)] + sigma_w * eps_f(id)     in R^k (k = 16, sigma_w = 0.5)
              mu[f, c] ~ N(0, I_k)   (centres, spread 1),   eps_f(id) ~ N(0, I_k) from hash(seed, f, id) via Box-Muller
    dense     x ~ N(0, I_13) (standardised latents),   counts = floor(exp(m + s * x)),   fed as log1p(counts)

    t1 = SUM_f  w_f . z_f                                   w_f ~ N(0, I_k / k)         (first order)
    t2 = SUM_{(f,g) in P}  z_f^T M_fg z_g,   M_fg = alpha_fg U_f^T U_g                  (pairwise)
              U_f ~ N(0, 1/k)^{r x k} (r = k),   alpha_fg = +-U[0.5, 1.5],   P a random quarter of the pairs
    t3 = u . x                                              u ~ N(0, I_13)              (dense)

    logit = bias + S * ( sqrt(0.1) t1 / sd(t1) + sqrt(0.8) (t2 - E t2) / sd(t2) + sqrt(0.1) t3 / sd(t3) )
    label ~ Bernoulli(sigmoid(logit))

``sd`` and ``E`` are measured on a fixed calibration sample (so the three terms carry 10 %,
80 % and 10 % of the logit variance whatever the vocabularies), then the signal scale
``S`` and ``bias`` are set by nested bisection so that on that sample the mean of
``sigmoid(logit)`` is ``positive_rate`` (0.25) and the Bayes-optimal AUC, the AUC of
``sigmoid(logit)`` (the true ``P(label | features)``, no extra logit noise: the only noise is
the Bernoulli draw), is ``target_auc`` (0.80). The factorised ``M_fg`` makes the truth
representable by DLRM's dot-product interaction at embedding dim >= r + 1, while a
full-rank ``r = 16`` needs the dimension; most of the signal is in the k-dimensional
latents' interactions, so hashing ids together (lost capacity) costs AUC. Learning an id's
k-dim latent from clicks takes many of its samples: on 1k-20k-row tables with s = 1.8 an
uncompressed DLRM gets within ~0.01-0.02 of the Bayes AUC after ~1M samples; at the
default s in [1.05, 1.4] the long tail keeps it much further (as on Criteo).

No per-id storage: every id's latent is a hash of (seed, field, id) (two affine rounds mod
the Mersenne prime 2^31 - 1, as :meth:`SyntheticCriteo.hidden_scores`), so 40M-row fields
cost nothing. Everything is vectorised in torch; a batch is a pure function of
``(seed, split, global batch index)``.
"""
from __future__ import annotations

import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torchrec.datasets.utils import Batch

from ..ops import MERSENNE_P
from .synthetic import CRITEO_KAGGLE_CARDINALITIES, NUM_DENSE, SPLITS, SyntheticCriteo, _coprime_multiplier, _mix, cat_names

ZIPF_RANGE = (1.05, 1.4)
SHARES = (0.1, 0.8, 0.1)  # logit variance of (first order, pairwise, dense)
_CALIBRATION_SAMPLES = 1 << 15
# hidden-model key -> (term means [3], term coefficients [3], scale S, bias): constructors are cheap after the first
_CACHE: Dict[tuple, Tuple[torch.Tensor, torch.Tensor, float, float]] = {}


def expected_auc(logits: torch.Tensor) -> float:
    """AUC that labels ``~ Bernoulli(sigmoid(logits))`` give the scores ``logits [N]``, in expectation.

    ``SUM_{i,j} p_i (1 - p_j) [l_i > l_j] / (SUM p SUM (1 - p))``: label-free, smooth in the
    logits' scale (what the calibration bisects on).
    """
    l, _ = torch.sort(logits.double())
    p = torch.sigmoid(l)
    neg_below = torch.cumsum(1.0 - p, 0) - (1.0 - p)  # sum of (1 - p_j) over l_j < l_i
    return (p * neg_below).sum().item() / (p.sum() * (1.0 - p).sum()).item()


class RealisticSynthetic:
    """Iterable of ``torchrec.datasets.utils.Batch`` drawn from the clustered-latent click model
    of the module docstring.

    Args:
        cardinalities: vocabulary size v_f per categorical feature (``cat_f``), each in [1, 2^31).
        batch_size: B, samples per batch.
        num_batches: batches this rank yields per pass.
        seed: picks the hidden model (latents, clusters, weights, permutations, Zipf exponents)
            and the sample streams; the same seed gives the same data everywhere.
        split: ``train`` | ``eval`` | ``test``: disjoint sample streams of the same hidden model.
        rank, world_size: rank r yields global batches ``r, r + W, r + 2W, ...``.
        zipf_exponent: s of P(rank j) ~ j^-s: one float for every field, one per field, or
            None (default) to draw each field's in ``zipf_range`` from the seed.
        zipf_range: (low, high), low > 1, for the drawn exponents.
        positive_rate: the bias is calibrated to this mean of ``sigmoid(logit)``.
        target_auc: the scale S of the logit is calibrated to this Bayes-optimal AUC (in
            (0.5, 1)); None keeps ``S = signal``.
        signal: S when ``target_auc`` is None (logit standard deviation before the bias).
        latent_dim: k, dims of an id's latent.
        interaction_rank: r, rank of the factors U_f (default k).
        num_clusters: C, clusters per field.
        cluster_spread, within_spread: std of the cluster centres and of an id's latent around
            its centre (centres must be the wider for clusters to be recoverable).
        pairs: the interacting field pairs (f, g), f != g; default a random ``pair_fraction``
            of all pairs (at least one when F >= 2).
        shares: logit variance shares of (first order, pairwise, dense), non-negative, not all 0.
        multi_hot: ids per sample for each feature, default one. As in
            :class:`SyntheticCriteo`, the bag of feature f is the one-hot id followed by
            ``multi_hot[f] - 1`` ids that are a fixed hash of it (the same ones as
            SyntheticCriteo's for the same seed); labels depend on the one-hot id only.
        start: index of the first batch yielded (e.g. ``epoch * num_batches``).

    Each batch: ``dense_features [B, 13] float32`` (log1p of counts), ``sparse_features`` KJT
    with keys ``cat_0..cat_{F-1}``, int64 values feature-major, lengths 1 (or ``multi_hot[f]``),
    ``labels [B] float32`` in {0, 1}.
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
        zipf_exponent: Union[None, float, Sequence[float]] = None,
        zipf_range: Tuple[float, float] = ZIPF_RANGE,
        positive_rate: float = 0.25,
        target_auc: Optional[float] = 0.80,
        signal: float = 1.5,
        latent_dim: int = 16,
        interaction_rank: Optional[int] = None,
        num_clusters: int = 32,
        cluster_spread: float = 1.0,
        within_spread: float = 0.5,
        pairs: Optional[Sequence[Tuple[int, int]]] = None,
        pair_fraction: float = 0.25,
        shares: Sequence[float] = SHARES,
        multi_hot: Optional[Sequence[int]] = None,
        start: int = 0,
    ) -> None:
        nf = len(cardinalities)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if nf == 0 or any(not 1 <= int(v) < 2**31 for v in cardinalities):
            raise ValueError(f"cardinalities must be a non-empty list of sizes in [1, 2^31), got {list(cardinalities)}")
        if batch_size < 1 or num_batches < 0 or start < 0:
            raise ValueError(f"batch_size must be >= 1, num_batches and start >= 0; got {batch_size}, {num_batches}, {start}")
        if not 0.0 < positive_rate < 1.0:
            raise ValueError(f"positive_rate must be in (0, 1), got {positive_rate}")
        if target_auc is not None and not 0.5 < target_auc < 1.0:
            raise ValueError(f"target_auc must be in (0.5, 1) or None, got {target_auc}")
        if target_auc is None and signal < 0:
            raise ValueError(f"signal must be >= 0, got {signal}")
        if latent_dim < 1 or num_clusters < 1 or (interaction_rank is not None and interaction_rank < 1):
            raise ValueError(f"latent_dim, interaction_rank and num_clusters must be >= 1; got {latent_dim}, {interaction_rank}, {num_clusters}")
        if not cluster_spread > within_spread >= 0:
            raise ValueError(f"need cluster_spread > within_spread >= 0 (recoverable clusters), got {cluster_spread}, {within_spread}")
        lo, hi = zipf_range
        if not 1.0 < lo <= hi:
            raise ValueError(f"zipf_range must be (low, high) with 1 < low <= high, got {zipf_range}")
        if not 0.0 < pair_fraction <= 1.0:
            raise ValueError(f"pair_fraction must be in (0, 1], got {pair_fraction}")
        if len(shares) != 3 or min(shares) < 0 or sum(shares) <= 0:
            raise ValueError(f"shares must be 3 non-negative variance shares (first order, pairwise, dense), not all 0; got {list(shares)}")
        self.cardinalities = [int(v) for v in cardinalities]
        self.multi_hot = [1] * nf if multi_hot is None else [int(h) for h in multi_hot]
        if len(self.multi_hot) != nf or min(self.multi_hot) < 1:
            raise ValueError(f"multi_hot must give one size >= 1 per feature ({nf}), got {list(multi_hot or [])}")
        if pairs is not None:
            pairs = [(int(f), int(g)) for f, g in pairs]
            bad = [p for p in pairs if not (0 <= p[0] < nf and 0 <= p[1] < nf and p[0] != p[1])]
            if bad:
                raise ValueError(f"pairs must be (f, g) with f != g in [0, {nf}), got {bad}")
        self.keys = cat_names(nf)
        self.batch_size, self.num_batches, self.start = batch_size, num_batches, start
        self.seed, self.split, self.rank, self.world_size = seed, split, rank, world_size
        self.latent_dim, self.num_clusters = latent_dim, num_clusters
        self.interaction_rank = latent_dim if interaction_rank is None else interaction_rank
        self.cluster_spread, self.within_spread = float(cluster_spread), float(within_spread)
        self.positive_rate, self.target_auc = positive_rate, target_auc

        # --- the hidden world: everything below depends on `seed` (and the arguments) only
        g = torch.Generator().manual_seed(_mix(seed, 101) % 2**63)
        if zipf_exponent is None:
            s = lo + (hi - lo) * torch.rand(nf, generator=g, dtype=torch.float64)
        else:
            s = torch.tensor([float(zipf_exponent)] * nf if isinstance(zipf_exponent, (int, float)) else [float(x) for x in zipf_exponent],
                             dtype=torch.float64)
            if s.numel() != nf or (s <= 1.0).any():
                raise ValueError(f"zipf_exponent must be > 1, one value or one per feature ({nf}), got {zipf_exponent}")
        self.zipf_exponents = s  # [F] float64
        self._v = torch.tensor(self.cardinalities, dtype=torch.int64)  # [F]
        self._perm_a = torch.tensor([_coprime_multiplier(v, _mix(seed, 102, f)) for f, v in enumerate(self.cardinalities)], dtype=torch.int64)
        self._perm_b = torch.tensor([_mix(seed, 103, f) % v for f, v in enumerate(self.cardinalities)], dtype=torch.int64)
        # hash constants in [1, P): [F, 1 + 2 ceil(k / 2), 4], row 0 the cluster hash, then the Box-Muller uniforms
        self._hk = torch.tensor([[[1 + _mix(seed, 104, f, j, i) % (MERSENNE_P - 1) for i in range(4)] for j in range(1 + 2 * ((latent_dim + 1) // 2))]
                                 for f in range(nf)], dtype=torch.int64)
        k, r = latent_dim, self.interaction_rank
        self.centres = cluster_spread * torch.randn(nf, num_clusters, k, generator=g)  # [F, C, k]
        self.first_order_weights = torch.randn(nf, k, generator=g) / math.sqrt(k)  # [F, k]
        self.factors = torch.randn(nf, r, k, generator=g) / math.sqrt(k)  # [F, r, k]: U_f
        if pairs is None:
            every = [(f, h) for f in range(nf) for h in range(f + 1, nf)]
            n = max(1, round(len(every) * pair_fraction)) if every else 0
            pairs = [every[i] for i in sorted(torch.randperm(len(every), generator=g)[:n].tolist())]
        self.pairs: List[Tuple[int, int]] = list(pairs)
        sign = torch.where(torch.rand(len(self.pairs), generator=g) < 0.5, -1.0, 1.0)
        alpha = sign * (0.5 + torch.rand(len(self.pairs), generator=g))
        self.pair_weights = torch.zeros(nf, nf)  # [F, F], alpha_fg at (f, g); t2 = SUM_fg A_fg <U_f z_f, U_g z_g>
        for (f, h), a in zip(self.pairs, alpha.tolist()):
            self.pair_weights[f, h] += a
        self._dense_mu = 4.0 * torch.rand(NUM_DENSE, generator=g)
        self._dense_sigma = 0.5 + torch.rand(NUM_DENSE, generator=g)
        self.dense_weights = torch.randn(NUM_DENSE, generator=g)  # [13]
        self._hot_k = {f: torch.tensor([[1 + _mix(seed, 7, f, j, i) % (MERSENNE_P - 1) for i in range(2)] for j in range(1, h)],
                                       dtype=torch.int64) for f, h in enumerate(self.multi_hot) if h > 1}

        # --- calibration on a fixed sample: term scales, then (S, bias) for the rate and the AUC
        key = (seed, tuple(self.cardinalities), tuple(s.tolist()), positive_rate, target_auc, None if target_auc else signal, k, r,
               num_clusters, self.cluster_spread, self.within_spread, tuple(self.pairs), tuple(float(a) for a in shares))
        if key not in _CACHE:
            cg = torch.Generator().manual_seed(_mix(seed, 105) % 2**63)
            t = self.terms(*self._draw(cg, _CALIBRATION_SAMPLES)).double()  # [n, 3]
            mean, sd = t.mean(0), t.std(0)
            coef = torch.tensor([math.sqrt(a / sum(shares)) for a in shares], dtype=torch.float64) / torch.where(sd > 0, sd, 1.0)
            coef[sd == 0] = 0.0
            _CACHE[key] = (mean.float(), coef.float(), *self._calibrate(((t - mean) * coef).sum(1), positive_rate, target_auc, signal))
        self._term_mean, self._term_coef, self.scale, self.bias = _CACHE[key]

    # ------------------------------------------------------------------ hidden model
    def _hash(self, ids: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``ids [...]`` with constants ``k [..., J, 4]`` (broadcast) -> ``[..., J]`` int64 in [0, P)."""
        x = torch.remainder(ids, MERSENNE_P).unsqueeze(-1)  # ids < 2^31: every product < 2^62
        x = torch.remainder(x * k[..., 0] + k[..., 1], MERSENNE_P)
        x = x ^ (x >> 13)
        x = torch.remainder(x * k[..., 2] + k[..., 3], MERSENNE_P)
        return torch.remainder(x ^ (x >> 11), MERSENNE_P)

    def clusters(self, ids: torch.Tensor) -> torch.Tensor:
        """Cluster c_f(id) of every id: ``ids [N, F]`` int64 -> ``[N, F]`` int64 in [0, C)."""
        return torch.remainder(self._hash(ids, self._hk[:, :1]).squeeze(-1), self.num_clusters)

    def _noise(self, ids: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Box-Muller normals of hashed uniforms: ``ids [...]``, constants ``k [..., 2h, 4]`` -> ``[..., latent_dim]``, 2h >= latent_dim."""
        u = (self._hash(ids, k).to(torch.float32) + 0.5).mul_(1.0 / MERSENNE_P).clamp_(max=1.0)  # [..., 2h] uniform in (0, 1]
        h = u.shape[-1] // 2
        u1, u2 = u[..., :h], u[..., h:]
        rad = torch.log(u1).mul_(-2.0).sqrt_()
        ang = u2 * (2.0 * math.pi)
        out = torch.empty(*u.shape[:-1], 2 * h)
        torch.mul(rad, torch.cos(ang), out=out[..., :h])
        torch.mul(rad, torch.sin(ang), out=out[..., h:])
        return out[..., :self.latent_dim]

    def noise(self, ids: torch.Tensor) -> torch.Tensor:
        """eps_f(id) ~ N(0, I_k), a pure function of (seed, f, id): ``ids [N, F]`` -> ``[N, F, k]`` float32."""
        return self._noise(ids, self._hk[:, 1:])

    def latents(self, ids: torch.Tensor) -> torch.Tensor:
        """z_f(id) = mu[f, c_f(id)] + sigma_w eps_f(id): ``ids [N, F]`` int64 -> ``[N, F, k]`` float32.

        Computed once per distinct (f, id) of ``ids`` (Zipf batches repeat their frequent ids)."""
        n, nf = ids.shape
        keys, inverse = torch.unique((torch.arange(nf) << 31) + ids, return_inverse=True)  # (f << 31) | id
        f, x = keys >> 31, keys & (2**31 - 1)
        c = torch.remainder(self._hash(x, self._hk[f, :1]).squeeze(-1), self.num_clusters)
        z = torch.add(self.centres[f, c], self._noise(x, self._hk[f, 1:]), alpha=self.within_spread)
        return z[inverse]  # [N, F, k]

    def terms(self, dense_z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Raw (first order t1, pairwise t2, dense t3): ``dense_z [N, 13]``, ``ids [N, F]`` -> ``[N, 3]`` float32."""
        z = self.latents(ids)  # [N, F, k]
        t1 = torch.einsum("nfk,fk->n", z, self.first_order_weights)
        e = torch.einsum("frk,nfk->nfr", self.factors, z)  # U_f z_f, [N, F, r]
        t2 = torch.einsum("nfr,fg,ngr->n", e, self.pair_weights, e)
        t3 = dense_z @ self.dense_weights
        return torch.stack([t1, t2, t3], dim=1)

    def logits(self, dense_z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Hidden logit: ``dense_z [N, 13]`` standardised dense latents, ``ids [N, F]`` one-hot ids -> ``[N]`` float32."""
        t = (self.terms(dense_z, ids) - self._term_mean) * self._term_coef
        return self.bias + self.scale * t.sum(1)

    @staticmethod
    def _calibrate(base: torch.Tensor, rate: float, target_auc: Optional[float], signal: float) -> Tuple[float, float]:
        """(S, bias): bias by bisection so that mean(sigmoid(S base + bias)) = rate, S by bisection on
        :func:`expected_auc` (increasing in S) when ``target_auc`` is given."""
        def bias_for(scale: float) -> float:
            lo, hi = -30.0, 30.0
            for _ in range(50):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if torch.sigmoid(scale * base + mid).mean().item() < rate else (lo, mid)
            return (lo + hi) / 2

        if target_auc is None:
            return float(signal), bias_for(signal)
        lo, hi = 0.0, 16.0
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if expected_auc(mid * base + bias_for(mid)) < target_auc else (lo, mid)
        scale = (lo + hi) / 2
        return scale, bias_for(scale)

    # ------------------------------------------------------------------ sampling
    def _draw(self, g: torch.Generator, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``n`` samples of (dense latents ``[n, 13]`` ~ N(0, 1), one-hot ids ``[n, F]`` int64)."""
        x = torch.randn(n, NUM_DENSE, generator=g)
        # inverse CDF of the continuous power law on [1, v + 1), as SyntheticCriteo, with a per-field s
        s, v = self.zipf_exponents, self._v.to(torch.float64)
        c = 1.0 - torch.pow(v + 1.0, 1.0 - s)  # [F]
        u = torch.rand(n, len(self.cardinalities), generator=g, dtype=torch.float64)
        rank = torch.pow(1.0 - u * c, 1.0 / (1.0 - s))
        rank = torch.minimum(rank.floor().to(torch.int64) - 1, self._v - 1).clamp_(min=0)
        ids = torch.remainder(rank * self._perm_a + self._perm_b, self._v)  # a * rank < 2^62
        return x, ids

    def sample(self, index: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's ``index``-th batch, raw: (dense latents ``[B, 13]``, one-hot ids ``[B, F]``,
        true logits ``[B]``, labels ``[B]`` float32)."""
        stream = SPLITS.index(self.split)
        g = torch.Generator().manual_seed(_mix(self.seed, 106, stream, index * self.world_size + self.rank) % 2**63)
        x, ids = self._draw(g, self.batch_size)
        logit = self.logits(x, ids)
        labels = torch.bernoulli(torch.sigmoid(logit), generator=g)
        return x, ids, logit, labels

    def probabilities(self, index: int) -> torch.Tensor:
        """True P(label = 1 | features) of the samples of batch ``index``: ``[B]`` float32."""
        return torch.sigmoid(self.sample(index)[2])

    def bayes_auc(self, num_samples: int = 1 << 16) -> float:
        """AUC of the true probabilities against the labels on this split's first
        ``ceil(num_samples / B)`` batches from ``start`` (what no model can beat, in expectation)."""
        from torchmetrics.functional.classification import binary_auroc

        parts = [self.sample(i) for i in range(self.start, self.start + max(1, -(-num_samples // self.batch_size)))]
        p = torch.sigmoid(torch.cat([q[2] for q in parts]))
        y = torch.cat([q[3] for q in parts]).long()
        return binary_auroc(p, y).item()

    def batch(self, index: int) -> Batch:
        """This rank's ``index``-th batch (global batch ``index * world_size + rank``)."""
        x, ids, _, labels = self.sample(index)
        counts = torch.floor(torch.exp(self._dense_mu + self._dense_sigma * x))
        return Batch(dense_features=torch.log1p(counts), sparse_features=self.features(ids), labels=labels)

    # the same KJT layout and multi-hot bags as SyntheticCriteo (they only read keys, multi_hot, _hot_k)
    features = SyntheticCriteo.features
    bag = SyntheticCriteo.bag

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        for i in range(self.start, self.start + self.num_batches):
            yield self.batch(i)
