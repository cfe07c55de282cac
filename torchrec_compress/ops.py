"""Small tensor ops shared by the schemes: a seedable universal hash (per-id constants allowed)."""
from __future__ import annotations

from typing import Dict, Mapping, Union

import torch

# Carter-Wegman universal hashing modulo the Mersenne prime 2^31 - 1: every product
# a * (x mod P) stays below 2^62, so int64 arithmetic never overflows (on CPU or CUDA).
MERSENNE_P = (1 << 31) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def hash_params(seed: int) -> tuple[int, int]:
    """The (a, b) pair of the hash function chosen by ``seed`` (1 <= a < P, 0 <= b < P)."""
    a = 1 + _splitmix64(2 * seed) % (MERSENNE_P - 1)
    b = _splitmix64(2 * seed + 1) % MERSENNE_P
    return a, b


def universal_hash(ids: torch.Tensor, buckets: int, seed: int) -> torch.Tensor:
    """h(x) = ((a * (x mod P) + b) mod P) mod buckets, with (a, b) drawn from ``seed``.

    Args:
        ids: ``[N]`` int64 non-negative ids.
        buckets: number of output buckets m.
        seed: selects the member of the hash family.
    Returns:
        ``[N]`` int64 in ``[0, buckets)``.
    """
    return hash_ab(ids, buckets, *hash_params(seed))


Int = Union[int, torch.Tensor]


def hash_ab(ids: torch.Tensor, buckets: Int, a: Int, b: Int) -> torch.Tensor:
    """:func:`universal_hash` from its (a, b) pair: ints, or ``[N]`` int64 tensors giving every
    id its own function and bucket count (several tables hashed in one pass)."""
    x = torch.remainder(ids if ids.dtype == torch.int64 else ids.to(torch.int64), MERSENNE_P)
    return torch.remainder(torch.remainder(x * a + b, MERSENNE_P), buckets)


def hash_constants(name: str, buckets: int, seed: int) -> Dict[str, int]:
    """``{name: m, name_a: a, name_b: b}`` of one hash function, for a scheme's :meth:`constants`."""
    a, b = hash_params(seed)
    return {name: buckets, f"{name}_a": a, f"{name}_b": b}


def hash_with(ids: torch.Tensor, c: Mapping[str, Int], name: str) -> torch.Tensor:
    """The hash :func:`hash_constants` named ``name``, with its constants taken from ``c``."""
    return hash_ab(ids, c[name], c[f"{name}_a"], c[f"{name}_b"])


def py_hash(x: int, buckets: int, seed: int) -> int:
    """:func:`universal_hash` of one id in Python integers (for the plain-torch references)."""
    a, b = hash_params(seed)
    return ((a * (x % MERSENNE_P) + b) % MERSENNE_P) % buckets
