"""LinearPatch: a per-channel scaling d_c = Σ|Y_c| / Σ|X_c| at the boundary (-d), or the same measured on
Hadamard-rotated activations and applied as H diag(d) Hᵀ (-r, which spreads the massive outlier channels first)."""

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


def fit_linearpatch_r(rot_abs_x: Tensor, rot_abs_y: Tensor, rotation: Tensor) -> Tensor:
    """H diag(d) Hᵀ with d measured on the rotated activations XH, YH."""
    from ..operators import magnitude_ratio

    return (rotation * magnitude_ratio(rot_abs_x, rot_abs_y)) @ rotation.T


@register
class LinearPatchD(Recovery):
    name = "linearpatch-d"
    help = "per-channel scaling (LinearPatch-D), a C-vector module"

    def fit_pair(self, stats: Stats, pair: Pair, options: FitOptions, folds: list[Stats] | None) -> Fitted:
        from ..maps import Diagonal
        from ..operators import magnitude_ratio

        i, j = pair
        return Fitted(Diagonal(magnitude_ratio(stats.abs_sum[i], stats.abs_sum[j])))


@register
class LinearPatchR(Recovery):
    name = "linearpatch-r"
    help = "Hadamard-rotated per-channel scaling H diag(d) Hᵀ (LinearPatch-R), a C×C module"

    def needs(self, pairs: list[Pair], blocks: list[Pair]) -> CaptureSpec:
        return CaptureSpec(rotated=frozenset(i for p in pairs for i in p))

    def check(self, ad: Adapter) -> None:
        from ..hadamard import hadamard

        hadamard(ad.hidden_size)  # refuses a hidden size with no Hadamard matrix

    def fit_pair(self, stats: Stats, pair: Pair, options: FitOptions, folds: list[Stats] | None) -> Fitted:
        from ..hadamard import hadamard
        from ..maps import Matrix

        i, j = pair
        rotation = hadamard(stats.rot_abs[i].numel()).to(stats.rot_abs[i].device)
        return Fitted(Matrix(fit_linearpatch_r(stats.rot_abs[i], stats.rot_abs[j], rotation)))
