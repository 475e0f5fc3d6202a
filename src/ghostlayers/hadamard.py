"""Normalised Hadamard matrices (H Hᵀ = I) for the hidden sizes of real models.

A size n = 2^k · m is built as Paley(p) ⊗ Sylvester(n / p), where p = m · 2^a is the order of a Paley matrix:
Paley I for a prime q ≡ 3 (mod 4) gives order q + 1, Paley II for a prime q ≡ 1 (mod 4) gives order 2(q + 1).
That covers 576 (36·16), 640 (20·32), 896 (28·32), 1536, 2048, 3584, 4096, 5120, 14336 and most sizes models use.
"""

from __future__ import annotations

import functools

import torch

from .errors import GhostlayersError


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def _legendre(a: int, q: int) -> int:
    a %= q
    if a == 0:
        return 0
    return 1 if pow(a, (q - 1) // 2, q) == 1 else -1


def _jacobsthal(q: int) -> torch.Tensor:
    return torch.tensor([[_legendre(j - i, q) for j in range(q)] for i in range(q)], dtype=torch.float64)


def _paley(order: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of `order` from a Paley construction with a prime q, or None."""
    q = order - 1
    if q % 4 == 3 and _is_prime(q):  # Paley I
        c = torch.zeros(order, order, dtype=torch.float64)
        c[0, 1:] = 1
        c[1:, 0] = -1
        c[1:, 1:] = _jacobsthal(q)
        return c + torch.eye(order, dtype=torch.float64)
    if order % 2 == 0:
        q = order // 2 - 1
        if q % 4 == 1 and _is_prime(q):  # Paley II
            c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
            c[0, 1:] = 1
            c[1:, 0] = 1
            c[1:, 1:] = _jacobsthal(q)
            zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
            one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
            return torch.kron(c, one) + torch.kron((c == 0).double(), zero)
    return None


def _sylvester(order: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < order:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=8)
def hadamard(n: int) -> torch.Tensor:
    """A normalised n×n Hadamard matrix in float64, or a GhostlayersError when no construction here covers n."""
    if n < 1:
        raise GhostlayersError(f"no Hadamard matrix of size {n}")
    odd, power = n, 1
    while odd % 2 == 0:
        odd, power = odd // 2, power * 2
    if odd == 1:
        return _sylvester(n) / n**0.5
    order = odd
    while order <= n:
        base = _paley(order)
        if base is not None:
            return torch.kron(base, _sylvester(n // order)) / n**0.5
        order *= 2
    raise GhostlayersError(
        f"no Hadamard matrix construction for hidden size {n} (Sylvester x Paley with a prime q): "
        "linearpatch-r cannot run on this model; use linearpatch-d or ghost"
    )
