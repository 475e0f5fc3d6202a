"""ReplaceMe-LS: the map T of the last kept layer's MLP output m that best replaces the block,
T = (mᵀm + εI)⁻¹ mᵀ(Y − X + m), folded into that layer's down_proj, so that Ŷ = X − m + m T."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import GhostlayersError
from ..options import DEFAULT_EPS
from ..plan import Pair
from ..spec import CaptureSpec
from .base import Fitted, Recovery, register

if TYPE_CHECKING:
    from torch import Tensor

    from ..capture import Stats
    from ..maps import Map
    from ..models import Adapter
    from ..options import FitOptions


def fit_replaceme(mlp_gram: Tensor, mlp_x: Tensor, mlp_y: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """T = (mᵀm + εI)⁻¹ mᵀ(Y − X + m): the map of the last kept MLP's output that best replaces the block."""
    from ..operators import ridge_solve

    return ridge_solve(mlp_gram, mlp_y - mlp_x + mlp_gram, eps, "replaceme")


def replaceme_relative_error(stats: Stats, block: Pair, transform: Tensor) -> float:
    """‖X − m + mT − Y‖ / ‖X − Y‖ from the sums: R = (X − Y) + m(T − I)."""
    import torch

    from ..operators import no_recovery_error

    s, e = block
    a = stats.mlp_gram[s - 1]
    t = transform - torch.eye(a.shape[0], dtype=torch.float64, device=a.device)
    m_xy = stats.mlp_cross[(s - 1, s)] - stats.mlp_cross[(s - 1, e)]  # mᵀ(X − Y)
    base = no_recovery_error(stats.gram[s], stats.cross[block], stats.sumsq[e])
    fit = base + 2 * torch.trace(t.T @ m_xy) + torch.trace(t.T @ a @ t)
    return float((fit.clamp_min(0) / base).sqrt())


@register
class ReplaceMe(Recovery):
    name = "replaceme"
    help = "least-squares transform of the previous layer's MLP output (ReplaceMe-LS), folded into down_proj"
    placement = "folded"
    at_boundary = False  # it acts inside layer s − 1: nothing to fit sequentially at the boundary
    per_layer = False  # one transform per block, whatever --fit says
    uses = frozenset({"eps"})

    def needs(self, pairs: list[Pair], blocks: list[Pair]) -> CaptureSpec:
        return CaptureSpec(mlp=frozenset((s - 1, j) for s, e in blocks if s > 0 for j in (s, e)))

    def check(self, ad: Adapter) -> None:
        if not ad.mlp_adds_to_residual:
            raise GhostlayersError(
                f"replaceme folds into the MLP output, which {ad.model.config.model_type} normalises before adding "
                "it to the residual stream: use another recovery on this architecture"
            )

    def fit_pair(self, stats: Stats, pair: Pair, options: FitOptions, folds: list[Stats] | None) -> Fitted:
        from ..maps import MlpTransform
        from ..operators import check_enough_tokens

        s, e = pair
        if s == 0:
            raise GhostlayersError(
                "replaceme needs a kept layer before the removed block, whose MLP it rescales; the block starts at "
                "layer 0: choose other layers or another recovery"
            )
        check_enough_tokens(stats.tokens, stats.abs_sum[0].numel())
        eps = options.ridge.fixed(stats.mlp_gram[s - 1])
        t = fit_replaceme(stats.mlp_gram[s - 1], stats.mlp_cross[(s - 1, s)], stats.mlp_cross[(s - 1, e)], eps)
        return Fitted(MlpTransform(t), eps)

    def error(self, stats: Stats, pair: Pair, fitted: Map) -> float | None:
        if stats.token_weights != "uniform" or pair[0] not in stats.gram or pair not in stats.cross:
            return None
        return replaceme_relative_error(stats, pair, fitted.t)  # type: ignore[attr-defined]
