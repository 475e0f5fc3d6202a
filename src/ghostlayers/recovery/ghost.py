"""Ghosted Layers (Yun et al., 2026): the unconstrained least-squares C×C operator, W* = I + M* with
(G + εI) M* = K − G, and what goes beyond the paper as fit options: ε relative to tr(G)/C or chosen automatically
(generalised cross-validation from one eigendecomposition, or k-fold cross-validation over calibration windows), an
affine term (h ← h W + b: the fit on centred X and Δ = Y − X), a rank-r M (reduced-rank regression:
M_r = M* V_r V_rᵀ with V_r the top eigenvectors of M*ᵀ G M*, the covariance of the fitted change), and shrinkage
toward the best diagonal or scalar map, M = (1 − α) M* + α M_c (α fixed or cross-validated: `constrained`,
`choose_shrink`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import GhostlayersError
from ..options import DEFAULT_EPS, DEFAULT_SHRINK, RANK_GRID, RIDGE_GRID, SHRINK_GRID, FitOptions
from ..plan import Pair
from ..spec import CaptureSpec
from .base import Fitted, Recovery, register

if TYPE_CHECKING:
    from torch import Tensor

    from ..capture import Stats
    from ..operators import Moments


@register
class Ghost(Recovery):
    name = "ghost"
    help = "the unconstrained least-squares C×C operator W* = I + M* (Ghosted Layers), a C×C module " \
           "(see --eps, --affine, --rank)"
    uses = frozenset({"eps", "shape", "token_weights"})

    def needs(self, pairs: list[Pair], blocks: list[Pair]) -> CaptureSpec:
        return CaptureSpec(grams=frozenset(i for i, _ in pairs), cross=frozenset(pairs))

    def default_fit(self, options: FitOptions) -> FitOptions:
        """M* shrunk toward the best diagonal map by a cross-validated α (DEFAULT_SHRINK), unless --shrink or
        --rank says otherwise: it kept the ghost best in and out of the calibration domain (docs/transfer)."""
        if options.shrink is None and options.rank is None:
            return replace(options, shrink=DEFAULT_SHRINK)
        return options

    def fit_pair(self, stats: Stats, pair: Pair, options: FitOptions, folds: list[Stats] | None) -> Fitted:
        import torch

        from ..maps import LowRank, Matrix
        from ..operators import Moments, check_enough_tokens

        i, j = pair
        check_enough_tokens(stats.tokens, stats.gram[i].shape[0])
        fitted = solve_ghost(Moments.of(stats, i, j), options, [Moments.of(f, i, j) for f in folds] if folds else None)
        if fitted.factors is not None:
            return Fitted(LowRank(*fitted.factors, fitted.bias), fitted.eps)
        eye = torch.eye(len(fitted.m), dtype=fitted.m.dtype, device=fitted.m.device)
        return Fitted(Matrix(eye + fitted.m, fitted.bias), fitted.eps)


def fit_ghost(gram: Tensor, cross: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """W* = I + M*, (G + εI) M* = K − G: the least-squares C×C operator mapping X onto Y (the paper's fit)."""
    import torch

    from ..operators import ridge_solve

    eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    return eye + ridge_solve(gram, cross - gram, eps, "ghost")


@dataclass
class GhostFit:
    """h ← h (I + M) + b, M full (`m`) or of rank r (`factors` = (down C×r, up r×C), m = down·up); `alpha` the
    shrinkage toward a constrained map (--shrink), None without."""

    m: Tensor
    factors: tuple[Tensor, Tensor] | None
    bias: Tensor | None
    eps: float
    alpha: float | None = None


def solve_ghost(mo: Moments, options: FitOptions = FitOptions(), folds: list[Moments] | None = None) -> GhostFit:
    """The ghost with the options beyond the paper; FitOptions() gives the paper's fit_ghost. With --shrink, ε is
    chosen first (as without it), then α."""
    plain = replace(options, shrink=None, rank=None if options.rank == "cv" else options.rank)
    eps = choose_eps(mo, plain, folds)
    if options.rank == "cv":
        return _solve(mo, replace(plain, rank=choose_rank(mo, plain, eps, folds)), eps)
    if options.shrink is None:
        return _solve(mo, plain, eps)
    alpha = options.shrink.amount
    if alpha is None:
        alpha = choose_shrink(mo, options, eps, folds)
    return _solve(mo, options, eps, alpha)


def constrained(part: Moments, target: str, eps: float) -> Tensor:
    """The least-squares M of the constrained shape `target` for X → Δ (ridge ε like the ghost's): diagonal,
    (G_kk + ε) m_k = R_kk; scalar, (tr G + Cε) m = tr R; as a C×C matrix."""
    import torch

    if target == "diagonal":
        return torch.diag(part.rhs.diagonal() / (part.gram.diagonal() + eps))
    c = len(part.gram)
    m = torch.trace(part.rhs) / (torch.trace(part.gram) + c * eps)
    return m * torch.eye(c, dtype=part.gram.dtype, device=part.gram.device)


def shrink_errors(mo: Moments, options: FitOptions, eps: float, folds: list[Moments] | None,
                  grid: tuple[float, ...] = SHRINK_GRID) -> list[float]:
    """Σ over folds of ‖X_k M_{−k}(α) − Δ_k‖² for each α of `grid`: M(α) = (1 − α) M* + α M_c, both fitted on the
    other folds (M_c the best map of the shape --shrink names)."""
    assert options.shrink is not None
    target = options.shrink.target

    def errors(fold: Moments, error: Callable[[Tensor], float], part: Moments, full: Tensor) -> list[float]:
        # M(α) = M* + α (M_c − M*) is linear in α, so a fold's error is a quadratic in α: exact from three
        # evaluations (0, ½, 1), then read at every α of the grid (a C³ matmul each saved: minutes at C = 4096)
        m_c = constrained(part, target, eps)
        e0, e_half, e1 = (error((1 - a) * full + a * m_c) for a in (0.0, 0.5, 1.0))
        return [e0 * (1 - a) * (1 - 2 * a) + e_half * 4 * a * (1 - a) + e1 * a * (2 * a - 1) for a in grid]

    return _held_out_errors(mo, options, eps, folds, errors, "--shrink TARGET:cv")


def choose_shrink(mo: Moments, options: FitOptions, eps: float, folds: list[Moments] | None) -> float:
    """α of SHRINK_GRID with the least held-out error, each fold's M* and M_c fitted on the other folds."""
    totals = shrink_errors(mo, options, eps, folds)
    return SHRINK_GRID[totals.index(min(totals))]


def held_out_error(mo: Moments, options: FitOptions, folds: list[Moments] | None) -> float:
    """Σ over folds of ‖X_k M_{−k} − Δ_k‖²: how well the fit `options` describes, made on all folds but one,
    predicts the one left out (its ε chosen as `solve_ghost` chooses it). With --shrink the α is the one
    `choose_shrink` would pick from the same folds (the least of the grid's held-out errors), or the fixed one; a
    rank limit is not applied (the unconstrained M*)."""
    plain = replace(options, shrink=None, rank=None)
    eps = choose_eps(mo, plain, folds)
    if options.shrink is None:
        return _held_out_errors(mo, plain, eps, folds, lambda fold, error, part, full: [error(full)],
                                "a cross-validated residual")[0]
    amount = options.shrink.amount
    return min(shrink_errors(mo, replace(options, rank=None), eps, folds,
                             SHRINK_GRID if amount is None else (amount,)))


def choose_rank(mo: Moments, options: FitOptions, eps: float, folds: list[Moments] | None) -> int:
    """The rank of RANK_GRID (those below C, and C itself: no limit) whose reduced-rank ghost, fitted on all folds
    but one, best predicts the one left out (summed over folds)."""
    c = len(mo.gram)
    ranks = [r for r in RANK_GRID if r < c] + [c]

    def errors(fold: Moments, error: Callable[[Tensor], float], part: Moments, full: Tensor) -> list[float]:
        return [error(full if r == c else (lambda f: f[0] @ f[1])(reduced_rank(part.gram, full, r))) for r in ranks]

    totals = _held_out_errors(mo, options, eps, folds, errors, "--rank cv")
    return ranks[totals.index(min(totals))]


def _held_out_errors(mo: Moments, options: FitOptions, eps: float, folds: list[Moments] | None,
                     errors: Callable[[Moments, Callable[[Tensor], float], Moments, Tensor], list[float]],
                     what: str) -> list[float]:
    """Σ over folds of each candidate M's error on the fold, the candidates made from the ghost M* (and the sums)
    fitted on the other folds; a fold too small to fit scores nothing. `errors(fold, error, part, M*)`: the
    candidates' errors, `error(M)` being M's on the fold (with the affine term where there is one)."""
    from ..operators import ridge_solve

    if not folds or len(folds) < 2:
        raise GhostlayersError(f"{what} needs the sums of at least two calibration folds (--folds)")
    totals: list[float] | None = None
    for fold in folds:
        train = mo - fold
        part = train.centred() if options.affine else train
        try:
            full = ridge_solve(part.gram, part.rhs, eps, "ghost")
        except GhostlayersError:
            continue
        def error(m: Tensor, fold: Moments = fold, train: Moments = train) -> float:
            return fold.error(m, (train.sd - train.sx @ m) / train.tokens if options.affine else None)

        scored = errors(fold, error, part, full)
        totals = scored if totals is None else [a + b for a, b in zip(totals, scored)]
    if totals is None:
        raise GhostlayersError(f"{what}: every calibration fold is too small to fit on the others")
    return totals


def _solve(mo: Moments, options: FitOptions, eps: float, alpha: float | None = None) -> GhostFit:
    from ..operators import ridge_solve

    part = mo.centred() if options.affine else mo
    m = ridge_solve(part.gram, part.rhs, eps, "ghost")
    if options.shrink is not None and alpha:
        m = (1 - alpha) * m + alpha * constrained(part, options.shrink.target, eps)
    factors = None
    if options.rank is not None and options.rank < len(m):
        factors = reduced_rank(part.gram, m, options.rank)
        m = factors[0] @ factors[1]
    bias = (mo.sd - mo.sx @ m) / mo.tokens if options.affine else None
    return GhostFit(m, factors, bias, eps, alpha if options.shrink is not None else None)


def reduced_rank(gram: Tensor, m: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The rank-r M closest to the least-squares M* in fitted values: ‖X M_r − X M*‖ is minimal for
    M_r = M* V_r V_rᵀ, V_r the top r eigenvectors of M*ᵀ G M* (reduced-rank regression)."""
    import torch

    if not 1 <= rank <= len(m):
        raise GhostlayersError(f"--rank must be between 1 and the hidden size {len(m)}")
    _, vectors = torch.linalg.eigh(m.T @ gram @ m)  # ascending
    top = vectors[:, -rank:].flip(1)  # (C, r)
    return m @ top, top.T.contiguous()


def choose_eps(mo: Moments, options: FitOptions, folds: list[Moments] | None = None) -> float:
    """ε for one boundary: fixed, or the value of RIDGE_GRID (× tr G / C) that cross-validates best."""
    ridge = options.ridge
    part = mo.centred() if options.affine else mo
    if ridge.mode in ("absolute", "relative"):
        return ridge.fixed(part.gram)
    unit = float(part.gram.trace()) / len(part.gram)
    grid = [unit * r for r in RIDGE_GRID]
    if ridge.mode == "gcv":
        scores = gcv_scores(part, grid, intercept=options.affine)
        return grid[scores.index(min(scores))]
    if not folds or len(folds) < 2:
        raise GhostlayersError("--eps cv needs the sums of at least two calibration folds")

    def held_out_error(eps: float) -> float:
        total = 0.0
        for fold in folds:
            try:
                fit = _solve(mo - fold, options, eps)
            except GhostlayersError:  # a fold too small for this ε: this ε loses
                return math.inf
            total += fold.error(fit.m, fit.bias)
        return total

    return min(grid, key=held_out_error)


def gcv_scores(mo: Moments, grid: list[float], intercept: bool = False) -> list[float]:
    """Generalised cross-validation score of the ridge fit for each ε of `grid`, from one eigendecomposition of G:
    RSS(ε) / (1 − df(ε)/N)², RSS = ‖Δ‖² − Σ_i ‖r_i‖² (λ_i + 2ε)/(λ_i + ε)², df = Σ_i λ_i/(λ_i + ε), r = Vᵀ XᵀΔ.
    With `intercept` (an affine fit; `mo` holds the centred sums) the unpenalised bias adds one to df."""
    import torch

    values, vectors = torch.linalg.eigh(mo.gram)
    lam, r2 = values.clamp_min(0), (vectors.T @ mo.rhs).square().sum(1)
    out = []
    for eps in grid:
        rss = mo.dd - (r2 * (lam + 2 * eps) / (lam + eps) ** 2).sum()
        df = (lam / (lam + eps)).sum() + (1.0 if intercept else 0.0)
        out.append(float(rss.clamp_min(0) / (1 - df / mo.tokens) ** 2))
    return out
