"""Prune&Comp: one scalar α per boundary, the mean over channels of Σ|Y_c| / Σ|X_c| (as its code averages),
folded into the weights written to the residual stream after the boundary (RMSNorm makes h ← α h a rescaling of
everything written later by 1/α)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..plan import Pair
from .base import Fitted, Recovery, register

if TYPE_CHECKING:
    from ..capture import Stats
    from ..options import FitOptions


@register
class PruneComp(Recovery):
    name = "prunecomp"
    help = "scale the residual stream by one α (Prune&Comp), folded into the weights"
    placement = "folded"

    def fit_pair(self, stats: Stats, pair: Pair, options: FitOptions, folds: list[Stats] | None) -> Fitted:
        from ..maps import Scale
        from ..operators import magnitude_ratio

        i, j = pair
        return Fitted(Scale(float(magnitude_ratio(stats.abs_sum[i], stats.abs_sum[j]).mean())))
