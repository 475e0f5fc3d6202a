"""The least-squares pieces every recovery shares: the sums of one fit (`Moments`), the Cholesky solve, and the
relative errors computed from sums alone (the ridge and the other fit options are in `options`). Everything here is float64. The methods themselves are in
`ghostlayers.recovery` (one file each); their table:

  ghost          (G + εI) M* = K − G,  W* = I + M*                     h ← h W*          (Ghosted Layers)
  linearpatch-d  d_c = Σ|Y_c| / Σ|X_c|                                 h ← h diag(d)     (LinearPatch)
  linearpatch-r  d_c = Σ|(YH)_c| / Σ|(XH)_c|                          h ← h H diag(d) Hᵀ
  prunecomp      α = mean_c d_c                                        h ← α h, folded   (Prune&Comp)
  replaceme      T = (mᵀm + εI)⁻¹ mᵀ(Y − X + m)                        m ← m T, folded   (ReplaceMe-LS)
  procrustes     Q = UVᵀ with XᵀY = UΣVᵀ, s = tr Σ / tr G               h ← s h Q, folded (orthogonal Procrustes)

X = h_s enters the removed block, Y = h_e leaves it (dense model, calibration tokens); G = XᵀX, K = XᵀY.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .errors import GhostlayersError

if TYPE_CHECKING:
    from .capture import Stats
    from .maps import Map


@dataclass
class Moments:
    """The sums of one fit X → Δ = Y − X: G = XᵀX, R = XᵀΔ, ‖Δ‖², N tokens, and Σx, ΣΔ (for an affine term)."""

    gram: Tensor
    rhs: Tensor
    dd: Tensor
    tokens: float  # N, or Σw under token weights
    sx: Tensor
    sd: Tensor

    yy: Tensor  # ‖Y‖², for residuals relative to the target

    @classmethod
    def of(cls, stats: Stats, i: int, j: int) -> Moments:
        """The sums of the pair (i, j); under token weights, every one of them weighted alike."""
        g, k = stats.gram[i], stats.cross[(i, j)]
        if stats.token_weights == "uniform":
            n, sx, sy, yy = stats.tokens, stats.sum[i], stats.sum[j], stats.sumsq[j]
        else:
            n, sx = float(stats.weight_sum[i]), stats.weighted_sum[i]
            sy, yy = stats.weighted_sum_y[(i, j)], stats.weighted_sumsq_y[(i, j)]
        return cls(g, k - g, torch.trace(g) - 2 * torch.trace(k) + yy, n, sx, sy - sx, yy)

    def __sub__(self, other: Moments) -> Moments:
        return Moments(self.gram - other.gram, self.rhs - other.rhs, self.dd - other.dd, self.tokens - other.tokens,
                       self.sx - other.sx, self.sd - other.sd, self.yy - other.yy)

    def centred(self) -> Moments:
        """The same sums after subtracting the means of X and Δ: what an affine fit's linear part solves."""
        mx, md = self.sx / self.tokens, self.sd / self.tokens
        n = self.tokens
        return Moments(self.gram - n * torch.outer(mx, mx), self.rhs - n * torch.outer(mx, md),
                       self.dd - n * (md @ md), n, torch.zeros_like(mx), torch.zeros_like(md), self.yy)

    def error(self, m: Tensor, bias: Tensor | None = None) -> float:
        """‖X M + 1b − Δ‖²_F from the sums (the residual of h ← h (I + M) + b against Y)."""
        out = ((self.gram @ m) * m).sum() - 2 * (m * self.rhs).sum() + self.dd  # tr(MᵀGM) − 2 tr(MᵀR) + ‖Δ‖²
        if bias is not None:
            out = out + 2 * bias @ (m.T @ self.sx) - 2 * bias @ self.sd + self.tokens * (bias @ bias)
        return float(out.clamp_min(0))


def magnitude_ratio(abs_x: Tensor, abs_y: Tensor) -> Tensor:
    """d_c = Σ|Y_c| / Σ|X_c|: the per-channel magnitude ratio (token counts cancel), of LinearPatch and Prune&Comp."""
    return abs_y / abs_x.clamp_min(torch.finfo(torch.float64).tiny)


def ridge_solve(gram: Tensor, rhs: Tensor, eps: float, what: str) -> Tensor:
    system = gram.clone()
    system.diagonal().add_(eps)  # G + εI without a C × C identity
    chol, info = torch.linalg.cholesky_ex(system)
    del system
    if int(info) != 0:
        raise GhostlayersError(
            f"singular system in the {what} fit (Gram + εI not positive definite, ε={eps:g}): "
            "use more calibration windows or a larger --eps"
        )
    out = torch.cholesky_solve(rhs, chol)
    if not torch.isfinite(out).all():
        raise GhostlayersError(f"the {what} fit produced non-finite weights (ε={eps:g}): use a larger --eps")
    return out


def check_enough_tokens(tokens: int, hidden: int) -> None:
    """Fewer tokens than channels leave XᵀX singular: the C×C fit would memorise them and generalise badly."""
    if tokens < hidden:
        raise GhostlayersError(
            f"calibration has {tokens} tokens, fewer than the hidden size {hidden}: the operator cannot be "
            "determined; use more --calib-samples or a longer --seq-len"
        )


def relative_error(gram: Tensor, cross: Tensor, sumsq_y: Tensor, weight: Tensor) -> float:
    """‖XW − Y‖ / ‖X − Y‖ from the sums alone: 0 is perfect, 1 is no better than doing nothing."""
    fit = ((gram @ weight) * weight).sum() - 2 * (weight * cross).sum() + sumsq_y
    return float((fit.clamp_min(0) / no_recovery_error(gram, cross, sumsq_y)).sqrt())


def no_recovery_error(gram: Tensor, cross: Tensor, sumsq_y: Tensor) -> Tensor:
    return torch.trace(gram) - 2 * torch.trace(cross) + sumsq_y  # ‖X − Y‖²


def map_error(mo: Moments, fitted: Map | None) -> float:
    """‖X W + b − Y‖ / ‖X − Y‖ on the sums `mo` of the map applied at the boundary (the identity for none, or for
    a transform folded before the boundary, whose effect is already in X)."""
    eye = torch.eye(len(mo.gram), dtype=mo.gram.dtype, device=mo.gram.device)
    w = None if fitted is None else fitted.matrix(len(eye))
    m = torch.zeros_like(eye) if w is None else w.to(mo.gram.device, mo.gram.dtype) - eye
    bias = None if fitted is None or fitted.bias is None else fitted.bias.to(mo.gram.device, mo.gram.dtype)
    return math.sqrt(mo.error(m, bias) / max(float(mo.dd), 1e-300))


def shape_of(weight: Tensor, top: int = 5) -> dict[str, Any]:
    """What an operator looks like, for `ghostlayers info`: for W = I + M (or a diagonal d = 1 + m),
    - distance from identity ‖M‖_F / ‖I‖_F;
    - antisymmetric share ‖(M − Mᵀ)/2‖²_F / ‖M‖²_F (the paper reports ~47% for the ghost; every symmetric operator,
      LinearPatch's included, has 0);
    - the `top` largest singular values of M, and its effective rank exp(entropy of σ²/Σσ²)."""
    w = weight.detach().double().cpu()
    if w.dim() == 1:
        m = w - 1.0
        return {"kind": "diagonal", "distance_from_identity": float(m.norm() / len(w) ** 0.5),
                "antisymmetric_share": 0.0, "singular_values": sorted(m.abs().tolist(), reverse=True)[:top]}
    m = w - torch.eye(len(w), dtype=w.dtype)
    total = float((m * m).sum())
    anti = (m - m.T) / 2
    sigma = torch.linalg.svdvals(m)
    p = sigma**2 / max(total, 1e-300)
    return {
        "kind": "matrix",
        "distance_from_identity": float(m.norm() / len(w) ** 0.5),
        "antisymmetric_share": float((anti * anti).sum()) / total if total > 0 else 0.0,
        "singular_values": sigma[:top].tolist(),
        "effective_rank": float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())),
    }
