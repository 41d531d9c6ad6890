"""Orthogonal Hadamard matrices of the sizes LLM layers have, and their fast application.

A Hadamard matrix H (entries +-1, H H^T = n I) scaled by 1/sqrt(n) is orthogonal and spreads
every input channel evenly over all outputs, so a rotated tensor has no outlier channels
(incoherence, as QuIP and QuaRot use it). Sizes built here: n = 2^k (Sylvester), q + 1 for a
prime q = 3 mod 4 (Paley I: 12, 20, 24, 44, 48, 60, ...), and Kronecker products of those (576 =
12 x 48, 1536 = 12 x 128, 4608 = 12 x 384 ...). A Kronecker product is applied factor by factor,
so rotating a row of 1536 values costs 1536 x (12 + 128) multiply-adds instead of 1536^2.
"""
from __future__ import annotations

import functools
import math

import torch

MAX_FACTOR = 256  # largest dense factor kept (Sylvester factors are split below this)


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, math.isqrt(q) + 1))


@functools.lru_cache(maxsize=None)
def _paley(n: int) -> torch.Tensor:
    """Paley I construction of order n = q + 1, q prime and q = 3 (mod 4); entries +-1."""
    q = n - 1
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jacobsthal = chi[(idx.unsqueeze(0) - idx.unsqueeze(1)) % q]  # Q[i, j] = chi(j - i)
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jacobsthal
    return torch.eye(n, dtype=torch.float64) + s


@functools.lru_cache(maxsize=None)
def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _is_paley_order(m: int) -> bool:
    return m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3


def hadamard_factors(n: int) -> list | None:
    """Orders of the +-1 Hadamard factors whose Kronecker product has order n, or None if this
    module cannot build one (e.g. 11008 = 2^8 x 43 needs an order-172 matrix)."""
    if n < 1:
        return None
    power = n & -n  # the largest power of two dividing n
    odd_part = n // power
    if odd_part == 1:
        return _split_power(n)
    # Find Paley orders (q + 1) whose product times a power of two is n; at most two of them.
    for a in _paley_orders_dividing(n):
        rest = n // a
        if rest & (rest - 1) == 0:
            return [a] + _split_power(rest)
        for b in _paley_orders_dividing(rest):
            rest2 = rest // b
            if rest2 & (rest2 - 1) == 0:
                return [a, b] + _split_power(rest2)
    return None


def _paley_orders_dividing(n: int) -> list:
    return [m for m in range(12, min(n, 4096) + 1, 4) if n % m == 0 and _is_paley_order(m) and m & (m - 1)]


def _split_power(n: int) -> list:
    out = []
    while n > MAX_FACTOR:
        out.append(MAX_FACTOR)
        n //= MAX_FACTOR
    return out + ([n] if n > 1 else [])


def _factor_matrix(m: int) -> torch.Tensor:
    return _sylvester(m) if m & (m - 1) == 0 else _paley(m)


def hadamard_matrix(n: int) -> torch.Tensor:
    """The orthogonal n x n matrix H / sqrt(n) (float64); ValueError for sizes without a construction."""
    factors = hadamard_factors(n)
    if factors is None:
        raise ValueError(f"no Hadamard matrix of order {n} is built here (orders 2^k, 12 x 2^k, 20 x 2^k, "
                         f"q+1 for primes q = 3 mod 4, and their products are)")
    h = torch.ones(1, 1, dtype=torch.float64)
    for m in factors:
        h = torch.kron(h, _factor_matrix(m))
    return h / math.sqrt(n)


def has_hadamard(n: int) -> bool:
    return hadamard_factors(n) is not None


def hadamard_factor_matrices(n: int) -> list:
    """The +-1 Kronecker factors of hadamard_matrix(n) * sqrt(n), float32 (exact in any float dtype)."""
    factors = hadamard_factors(n)
    if factors is None:
        raise ValueError(f"hadamard_transform: no Hadamard matrix of order {n}")
    return [_factor_matrix(m).to(torch.float32) for m in factors]


def hadamard_transform(x: torch.Tensor, factor_matrices: list | None = None) -> torch.Tensor:
    """x @ hadamard_matrix(n) over the last dimension (n = x.shape[-1]), one Kronecker factor at a
    time; same dtype as x (computed in float32 for 16-bit inputs). ``factor_matrices`` (from
    hadamard_factor_matrices, e.g. kept as a layer's buffers) saves building them per call."""
    n = x.shape[-1]
    mats = factor_matrices if factor_matrices is not None else hadamard_factor_matrices(n)
    dtype = x.dtype
    y = x.to(torch.float32) if dtype in (torch.float16, torch.bfloat16) else x
    lead = y.shape[:-1]
    y = y.reshape(-1, *[m.shape[0] for m in mats])
    for axis, mat in enumerate(mats, start=1):
        y = torch.movedim(torch.tensordot(y, mat.to(device=y.device, dtype=y.dtype), dims=([axis], [0])), -1, axis)
    return (y.reshape(*lead, n) * (1.0 / math.sqrt(n))).to(dtype)


def random_signed_hadamard(n: int, seed: int) -> torch.Tensor:
    """diag(random +-1) @ hadamard_matrix(n): an orthogonal matrix that is a different rotation for
    each seed (float64)."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    return signs.unsqueeze(1) * hadamard_matrix(n)
