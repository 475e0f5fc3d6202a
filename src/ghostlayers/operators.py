"""Recovery methods: the maths, as functions of the captured sums. Everything here is float64.

With X = h_i, Y = h_j over calibration tokens, G = XᵀX, K = XᵀY:
  ghost:  (G + εI) M* = Xᵀ(Y − X) = K − G,   W* = I + M*
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .capture import Pair, Stats
from .errors import GhostlayersError
from .select import Plan

RECOVERY = ("none", "ghost")
DEFAULT_EPS = 1e-6  # the paper's absolute ridge


def fit_ghost(gram: Tensor, cross: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """W* = I + M*, (G + εI) M* = K − G: the least-squares C×C operator mapping X onto Y."""
    c = gram.shape[0]
    eye = torch.eye(c, dtype=torch.float64, device=gram.device)
    chol, info = torch.linalg.cholesky_ex(gram + eps * eye)
    if int(info) != 0:
        raise GhostlayersError(
            f"singular system (XᵀX + εI not positive definite, ε={eps:g}): use more calibration windows or a larger --eps"
        )
    m = torch.cholesky_solve(cross - gram, chol)
    if not torch.isfinite(m).all():
        raise GhostlayersError(f"the ghost fit produced non-finite weights (ε={eps:g}): use a larger --eps")
    return eye + m


def check_enough_tokens(tokens: int, hidden: int) -> None:
    """Fewer tokens than channels leave XᵀX singular: the C×C fit would memorise them and generalise badly."""
    if tokens < hidden:
        raise GhostlayersError(
            f"calibration has {tokens} tokens, fewer than the hidden size {hidden}: the operator cannot be "
            "determined; use more --calib-samples or a longer --seq-len"
        )


def relative_error(gram: Tensor, cross: Tensor, sumsq_y: Tensor, weight: Tensor) -> float:
    """‖XW − Y‖ / ‖X − Y‖ from the sums alone: 0 is perfect, 1 is no better than doing nothing."""
    fit = torch.trace(weight.T @ gram @ weight) - 2 * torch.trace(weight.T @ cross) + sumsq_y
    base = torch.trace(gram) - 2 * torch.trace(cross) + sumsq_y
    return float((fit.clamp_min(0) / base).sqrt())


@dataclass
class Operator:
    """One fitted operator at one boundary of the pruned model (dense numbering)."""

    boundary: int  # dense index of the module whose input it transforms (num_layers: the final norm)
    weight: Tensor  # (C, C) float64, the product of the per-pair operators in order
    pairs: list[Pair]  # the (X, Y) boundaries it was fitted on
    errors: list[float]  # relative fit error of each pair's operator on the calibration tokens


def fit(method: str, stats: Stats, plan: Plan, eps: float = DEFAULT_EPS) -> list[Operator]:
    """Fit `method` for every removed block of `plan` from one set of captured sums."""
    if method == "none":
        return []
    if method != "ghost":
        raise GhostlayersError(f"unknown recovery {method!r}: use one of {', '.join(RECOVERY)}")
    out = []
    for block in plan.blocks():
        weight, pairs, errors = None, plan.fit_pairs(block), []
        for i, j in pairs:
            if i not in stats.gram or (i, j) not in stats.cross:
                raise GhostlayersError(f"internal: boundary ({i}, {j}) was not captured")
            check_enough_tokens(stats.tokens, stats.gram[i].shape[0])
            w = fit_ghost(stats.gram[i], stats.cross[(i, j)], eps)
            errors.append(relative_error(stats.gram[i], stats.cross[(i, j)], stats.sumsq[j], w))
            weight = w if weight is None else weight @ w  # h ← h W_1 W_2 …
        assert weight is not None
        out.append(Operator(block[1], weight, pairs, errors))
    return out
