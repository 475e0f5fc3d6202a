"""Orthogonal Procrustes (beyond the paper): the best scaled rotation s·Q mapping X onto Y, Q = UVᵀ for
XᵀY = UΣVᵀ and s = tr Σ / tr XᵀX, folded exactly into every layer after the boundary (RMSNorm's rotation
invariance), so the pruned model is a plain checkpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..plan import Pair
from ..spec import CaptureSpec
from .base import Fitted, Recovery, register

if TYPE_CHECKING:
    from torch import Tensor

    from ..capture import Stats
    from ..models import Adapter
    from ..options import FitOptions


def fit_procrustes(gram: Tensor, cross: Tensor) -> tuple[float, Tensor]:
    """The scaled orthogonal map s·Q closest to the data: Q = UVᵀ for XᵀY = UΣVᵀ, s = tr Σ / tr XᵀX."""
    import torch

    u, sigma, vh = torch.linalg.svd(cross)
    return float(sigma.sum() / gram.trace()), u @ vh


@register
class Procrustes(Recovery):
    name = "procrustes"
    help = ("the best scaled rotation s·Q (orthogonal Procrustes), folded into the weights after the boundary: "
            "a vanilla checkpoint with no run-time cost (unties a tied LM head; not for Gemma 3)")
    placement = "folded"
    uses = frozenset({"token_weights"})

    def needs(self, pairs: list[Pair], blocks: list[Pair]) -> CaptureSpec:
        return CaptureSpec(grams=frozenset(i for i, _ in pairs), cross=frozenset(pairs))

    def check(self, ad: Adapter) -> None:
        ad.check_can_fold_rotations()

    def fit_pair(self, stats: Stats, pair: Pair, options: FitOptions, folds: list[Stats] | None) -> Fitted:
        from ..maps import ScaledRotation

        return Fitted(ScaledRotation(*fit_procrustes(stats.gram[pair[0]], stats.cross[pair])))
