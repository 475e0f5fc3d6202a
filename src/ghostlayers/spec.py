"""Which sums one calibration pass must produce: pure data (no torch), so methods and criteria can declare what
they need without importing anything heavy. `capture` produces them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .plan import Pair

if TYPE_CHECKING:
    from .capture import Stats


@dataclass(frozen=True)
class CaptureSpec:
    """Which sums one pass must produce: Gram matrices h_iᵀh_i at `grams`, cross sums h_iᵀh_j for each (i, j) in
    `cross`, and per-token cosine / angle sums for each (i, j) in `cosine` (always i < j)."""

    grams: frozenset[int] = frozenset()
    cross: frozenset[Pair] = frozenset()
    cosine: frozenset[Pair] = frozenset()
    rotated: frozenset[int] = frozenset()  # Σ|h_i H| per channel (H: the normalised Hadamard matrix, or the rotation given)
    mlp: frozenset[Pair] = frozenset()  # (l, j): Σ m_lᵀm_l and Σ m_lᵀh_j, m_l the MLP output of layer l
    sequence_cosine: frozenset[Pair] = frozenset()  # cosine over the sequence axis (the reference code's), ⊆ cosine

    _FIELDS = ("grams", "cross", "cosine", "rotated", "mlp", "sequence_cosine")
    _TABLES = {"grams": "gram", "cross": "cross", "cosine": "cos", "rotated": "rot_abs", "mlp": "mlp_cross",
               "sequence_cosine": "cos_seq"}

    def __or__(self, other: CaptureSpec) -> CaptureSpec:
        return CaptureSpec(*(getattr(self, f) | getattr(other, f) for f in self._FIELDS))

    def covered_by(self, stats: Stats) -> bool:
        return all(getattr(self, f) <= getattr(stats, t).keys() for f, t in self._TABLES.items())
