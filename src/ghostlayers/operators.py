"""Recovery methods: the maths, as functions of the captured sums. Everything here is float64.

X = h_s enters the removed block, Y = h_e leaves it (dense model, calibration tokens); G = XᵀX, K = XᵀY;
|·| sums are per channel; H is a normalised Hadamard matrix; m is the MLP output of layer s − 1.

  ghost          (G + εI) M* = K − G,  W* = I + M*                     h ← h W*          (Ghosted Layers)
  linearpatch-d  d_c = Σ|Y_c| / Σ|X_c|                                 h ← h diag(d)     (LinearPatch)
  linearpatch-r  d_c = Σ|(YH)_c| / Σ|(XH)_c|                          h ← h H diag(d) Hᵀ
  prunecomp      α = mean_c d_c                                        h ← α h, folded   (Prune&Comp)
  replaceme      T = (mᵀm + εI)⁻¹ mᵀ(Y − X + m)                        m ← m T, folded   (ReplaceMe-LS)
                 into down_proj of layer s − 1, so that Ŷ = X − m + m T
  procrustes     Q = UVᵀ with XᵀY = UΣVᵀ, s = tr Σ / tr G               h ← s h Q, folded (orthogonal Procrustes)

Beyond the paper (issue 6), options of the ghost fit: ε relative to tr(G)/C or chosen automatically (generalised
cross-validation from one eigendecomposition, or k-fold cross-validation over calibration windows); an affine
term (h ← h W + b: the fit on centred X and Δ = Y − X); and a rank-r M (reduced-rank regression:
M_r = M* V_r V_rᵀ with V_r the top eigenvectors of M*ᵀ G M*, the covariance of the fitted change).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .capture import CaptureSpec, Pair, Stats
from .errors import GhostlayersError
from .hadamard import hadamard

if TYPE_CHECKING:
    from .select import Plan

RECOVERY = ("none", "prunecomp", "linearpatch-d", "linearpatch-r", "replaceme", "ghost", "procrustes")
FOLDED = ("none", "prunecomp", "replaceme", "procrustes")  # nothing left at run time: a vanilla checkpoint
DEFAULT_EPS = 1e-6  # the paper's absolute ridge
RIDGE_MODES = ("absolute", "relative", "gcv", "cv")
RIDGE_GRID = tuple(10.0 ** (k / 2) for k in range(-20, 3))  # candidate ε / (tr G / C) for gcv and cv: 1e-10 … 10


@dataclass(frozen=True)
class Ridge:
    """How much ε to add to XᵀX.

    absolute: ε itself (the paper's 1e-6); relative: ε · tr(XᵀX)/C, the same strength whatever the activations'
    scale; gcv / cv: chosen per boundary from RIDGE_GRID (relative values) by generalised cross-validation on the
    calibration tokens, or by k-fold cross-validation over calibration windows (needs the sums of each fold).
    """

    mode: str = "absolute"
    value: float = DEFAULT_EPS

    def __str__(self) -> str:
        return {"absolute": f"{self.value:g}", "relative": f"rel:{self.value:g}"}.get(self.mode, self.mode)

    def fixed(self, gram: Tensor) -> float:
        """ε for the absolute and relative modes."""
        if self.mode == "absolute":
            return self.value
        if self.mode == "relative":
            return self.value * float(torch.trace(gram)) / gram.shape[0]
        raise GhostlayersError(f"ε {self} is chosen by the ghost fit only: give replaceme a number or rel:VALUE")


def parse_ridge(text: str | float | Ridge | None) -> Ridge:
    """'1e-6' (absolute), 'rel:1e-4' (× tr(XᵀX)/C), 'gcv' or 'cv' (chosen automatically)."""
    if text is None:
        return Ridge()
    if isinstance(text, Ridge):
        return text
    if isinstance(text, (int, float)):
        value, mode = float(text), "absolute"
    elif text in ("gcv", "cv"):
        return Ridge(text, 0.0)
    else:
        mode = "relative" if text.startswith("rel:") else "absolute"
        try:
            value = float(text.removeprefix("rel:"))
        except ValueError:
            raise GhostlayersError(f"cannot read --eps {text!r}: write e.g. 1e-6, rel:1e-4, gcv or cv") from None
    if not value >= 0:
        raise GhostlayersError("--eps must be zero or positive")
    return Ridge(mode, value)


@dataclass(frozen=True)
class GhostOptions:
    """How the ghost is fitted beyond the paper: ridge, an affine term, a rank limit on M."""

    ridge: Ridge = Ridge()
    affine: bool = False
    rank: int | None = None


def fit_ghost(gram: Tensor, cross: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """W* = I + M*, (G + εI) M* = K − G: the least-squares C×C operator mapping X onto Y."""
    eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    return eye + _ridge_solve(gram, cross - gram, eps, "ghost")


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
        if stats.weighting == "uniform":
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
        out = torch.trace(m.T @ self.gram @ m) - 2 * torch.trace(m.T @ self.rhs) + self.dd
        if bias is not None:
            out = out + 2 * bias @ (m.T @ self.sx) - 2 * bias @ self.sd + self.tokens * (bias @ bias)
        return float(out.clamp_min(0))


@dataclass
class GhostFit:
    """h ← h (I + M) + b, M full (`m`) or of rank r (`factors` = (down C×r, up r×C), m = down·up)."""

    m: Tensor
    factors: tuple[Tensor, Tensor] | None
    bias: Tensor | None
    eps: float


def solve_ghost(mo: Moments, options: GhostOptions = GhostOptions(), folds: list[Moments] | None = None) -> GhostFit:
    """The ghost with the options beyond the paper; GhostOptions() gives the paper's fit_ghost."""
    eps = choose_eps(mo, options, folds)
    return _solve(mo, options, eps)


def _solve(mo: Moments, options: GhostOptions, eps: float) -> GhostFit:
    part = mo.centred() if options.affine else mo
    m = _ridge_solve(part.gram, part.rhs, eps, "ghost")
    factors = None
    if options.rank is not None and options.rank < len(m):
        factors = reduced_rank(part.gram, m, options.rank)
        m = factors[0] @ factors[1]
    bias = (mo.sd - mo.sx @ m) / mo.tokens if options.affine else None
    return GhostFit(m, factors, bias, eps)


def reduced_rank(gram: Tensor, m: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The rank-r M closest to the least-squares M* in fitted values: ‖X M_r − X M*‖ is minimal for
    M_r = M* V_r V_rᵀ, V_r the top r eigenvectors of M*ᵀ G M* (reduced-rank regression)."""
    if not 1 <= rank <= len(m):
        raise GhostlayersError(f"--rank must be between 1 and the hidden size {len(m)}")
    _, vectors = torch.linalg.eigh(m.T @ gram @ m)  # ascending
    top = vectors[:, -rank:].flip(1)  # (C, r)
    return m @ top, top.T.contiguous()


def choose_eps(mo: Moments, options: GhostOptions, folds: list[Moments] | None = None) -> float:
    """ε for one boundary: fixed, or the value of RIDGE_GRID (× tr G / C) that cross-validates best."""
    ridge = options.ridge
    part = mo.centred() if options.affine else mo
    if ridge.mode in ("absolute", "relative"):
        return ridge.fixed(part.gram)
    unit = float(torch.trace(part.gram)) / len(part.gram)
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
    values, vectors = torch.linalg.eigh(mo.gram)
    lam, r2 = values.clamp_min(0), (vectors.T @ mo.rhs).square().sum(1)
    out = []
    for eps in grid:
        rss = mo.dd - (r2 * (lam + 2 * eps) / (lam + eps) ** 2).sum()
        df = (lam / (lam + eps)).sum() + (1.0 if intercept else 0.0)
        out.append(float(rss.clamp_min(0) / (1 - df / mo.tokens) ** 2))
    return out


def fit_procrustes(gram: Tensor, cross: Tensor) -> tuple[float, Tensor]:
    """The scaled orthogonal map s·Q closest to the data: Q = UVᵀ for XᵀY = UΣVᵀ, s = tr Σ / tr XᵀX."""
    u, sigma, vh = torch.linalg.svd(cross)
    return float(sigma.sum() / torch.trace(gram)), u @ vh


def fit_linearpatch_d(abs_x: Tensor, abs_y: Tensor) -> Tensor:
    """d_c = E|Y_c| / E|X_c|: per-channel magnitude ratio (token counts cancel)."""
    return abs_y / abs_x.clamp_min(torch.finfo(torch.float64).tiny)


def fit_prunecomp(abs_x: Tensor, abs_y: Tensor) -> float:
    """α = mean over channels of the per-channel magnitude ratio (as the Prune&Comp code averages)."""
    return float(fit_linearpatch_d(abs_x, abs_y).mean())


def fit_linearpatch_r(rot_abs_x: Tensor, rot_abs_y: Tensor, rotation: Tensor) -> Tensor:
    """H diag(d) Hᵀ with d measured on the rotated activations XH, YH."""
    d = fit_linearpatch_d(rot_abs_x, rot_abs_y)
    return (rotation * d) @ rotation.T


def fit_replaceme(mlp_gram: Tensor, mlp_x: Tensor, mlp_y: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """T = (mᵀm + εI)⁻¹ mᵀ(Y − X + m): the map of the last kept MLP's output that best replaces the block."""
    return _ridge_solve(mlp_gram, mlp_y - mlp_x + mlp_gram, eps, "replaceme")


def _ridge_solve(gram: Tensor, rhs: Tensor, eps: float, what: str) -> Tensor:
    eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    chol, info = torch.linalg.cholesky_ex(gram + eps * eye)
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
    fit = torch.trace(weight.T @ gram @ weight) - 2 * torch.trace(weight.T @ cross) + sumsq_y
    return float((fit.clamp_min(0) / _no_recovery_error(gram, cross, sumsq_y)).sqrt())


def replaceme_relative_error(stats: Stats, block: Pair, transform: Tensor) -> float:
    """‖X − m + mT − Y‖ / ‖X − Y‖ from the sums: R = (X − Y) + m(T − I)."""
    s, e = block
    a = stats.mlp_gram[s - 1]
    t = transform - torch.eye(a.shape[0], dtype=torch.float64, device=a.device)
    m_xy = stats.mlp_cross[(s - 1, s)] - stats.mlp_cross[(s - 1, e)]  # mᵀ(X − Y)
    base = _no_recovery_error(stats.gram[s], stats.cross[block], stats.sumsq[e])
    fit = base + 2 * torch.trace(t.T @ m_xy) + torch.trace(t.T @ a @ t)
    return float((fit.clamp_min(0) / base).sqrt())


def _no_recovery_error(gram: Tensor, cross: Tensor, sumsq_y: Tensor) -> Tensor:
    return torch.trace(gram) - 2 * torch.trace(cross) + sumsq_y  # ‖X − Y‖²


@dataclass
class Operator:
    """What one method fitted for one removed block [s, e) (dense numbering).

    One of `matrix` (h ← h W, or h ← h W + `bias`), `factors` (h ← h + (h·down)·up [+ bias], a rank-r ghost),
    `diag` (h ← h · d), `scale` (h ← α h, folded), `scale` and `rotation` (h ← α h Q, folded) or `transform`
    (ReplaceMe's T, folded into layer s − 1's down_proj) is set. Per-layer fits are composed into one operator per
    block (a composed low-rank ghost is stored as its full matrix).
    """

    method: str
    block: Pair
    pairs: list[Pair]
    hidden: int = 0
    matrix: Tensor | None = None
    factors: tuple[Tensor, Tensor] | None = None
    bias: Tensor | None = None
    diag: Tensor | None = None
    scale: float | None = None
    rotation: Tensor | None = None
    transform: Tensor | None = None
    errors: list[float] = field(default_factory=list)  # calibration fit error per pair, where the sums allow it
    eps: list[float] = field(default_factory=list)  # the ridge ε each pair's fit used (ghost)

    @property
    def boundary(self) -> int:
        return self.block[1]

    def linear_map(self) -> Tensor | None:
        """The C×C map h ← h W this operator applies at the boundary, bias aside (None for ReplaceMe)."""
        if self.factors is not None:
            down, up = self.factors
            return torch.eye(self.hidden, dtype=down.dtype, device=down.device) + down @ up
        if self.rotation is not None:
            return (self.scale if self.scale is not None else 1.0) * self.rotation
        part = next((p for p in (self.matrix, self.diag, self.scale) if p is not None), None)
        return None if part is None else _as_matrix(part, self.hidden)

    def runtime_parts(self) -> dict[str, Tensor] | None:
        """The tensors of the module installed at the boundary (see `runtime.GhostOperator`); None when folded."""
        if self.factors is not None:
            parts = {"down": self.factors[0], "up": self.factors[1]}
        elif self.matrix is not None or self.diag is not None:
            parts = {"weight": self.matrix if self.matrix is not None else self.diag}
        else:
            return None
        return parts | ({"bias": self.bias} if self.bias is not None else {})


def needs(method: str, plan_pairs: list[Pair], blocks: list[Pair]) -> CaptureSpec:
    """The sums `method` needs for the given fit pairs and blocks (beyond Σ|h| and Σ‖h‖², always captured)."""
    if method in ("ghost", "procrustes"):
        return CaptureSpec(grams=frozenset(i for i, _ in plan_pairs), cross=frozenset(plan_pairs))
    if method == "linearpatch-r":
        return CaptureSpec(rotated=frozenset(i for p in plan_pairs for i in p))
    if method == "replaceme":
        return CaptureSpec(mlp=frozenset((s - 1, j) for s, e in blocks if s > 0 for j in (s, e)))
    return CaptureSpec()


def check_method(method: str, mlp_adds_to_residual: bool = True, model_type: str = "") -> None:
    if method not in RECOVERY:
        raise GhostlayersError(f"unknown recovery {method!r}: use one of {', '.join(RECOVERY)}")
    if method == "replaceme" and not mlp_adds_to_residual:
        raise GhostlayersError(
            f"replaceme folds into the MLP output, which {model_type} normalises before adding it to the residual "
            "stream: use another recovery on this architecture"
        )


def fit(
    method: str,
    stats: Stats,
    plan: Plan,
    eps: float | str | Ridge = DEFAULT_EPS,
    options: GhostOptions | None = None,
    folds: list[Stats] | None = None,
) -> list[Operator]:
    """Fit `method` for every removed block of `plan` from one set of captured sums.

    `options` (ghost only) adds what goes beyond the paper; its ridge replaces `eps`. `folds`: the sums of disjoint
    parts of the calibration windows (adding up to `stats`), for `--eps cv`.
    """
    check_method(method)
    if method == "none":
        return []
    options = options or GhostOptions(ridge=parse_ridge(eps))
    if method != "ghost" and (options.affine or options.rank is not None):
        raise GhostlayersError("--affine and --rank shape the ghost: use them with --recover ghost")
    if stats.weighting != "uniform" and method not in ("ghost", "procrustes"):
        raise GhostlayersError(f"--token-weights {stats.weighting} changes the ghost and procrustes fits only, "
                               f"not {method}: drop it or use one of those")
    out = []
    for block in plan.blocks():
        if method == "replaceme":
            out.append(_fit_replaceme_block(stats, block, options.ridge))
            continue
        op = Operator(method, block, plan.fit_pairs(block), hidden=stats.abs_sum[0].numel())
        for i, j in op.pairs:  # per-layer operators compose: h ← (h W_1 + b_1) W_2 + b_2 …
            if method == "ghost":
                _add_ghost(op, stats, i, j, options, folds)
            elif method == "procrustes":
                _require(stats, CaptureSpec(grams=frozenset({i}), cross=frozenset({(i, j)})))
                scale, rotation = fit_procrustes(stats.gram[i], stats.cross[(i, j)])
                op.scale = scale * (op.scale if op.scale is not None else 1.0)
                op.rotation = rotation if op.rotation is None else op.rotation @ rotation
                if stats.weighting == "uniform":
                    op.errors.append(relative_error(stats.gram[i], stats.cross[(i, j)], stats.sumsq[j], scale * rotation))
            else:
                part = _fit_pair(method, stats, i, j)
                if isinstance(part, float):
                    op.scale = part * (op.scale if op.scale is not None else 1.0)
                elif part.dim() == 1:
                    op.diag = part if op.diag is None else op.diag * part
                else:
                    op.matrix = part if op.matrix is None else op.matrix @ part
                if i in stats.gram and (i, j) in stats.cross and stats.weighting == "uniform":
                    single = _as_matrix(part, op.hidden, stats.gram[i].device)
                    op.errors.append(relative_error(stats.gram[i], stats.cross[(i, j)], stats.sumsq[j], single))
        out.append(op)
    return out


def _add_ghost(op: Operator, stats: Stats, i: int, j: int, options: GhostOptions, folds: list[Stats] | None) -> None:
    """Fit the ghost for the pair (i, j) and compose it after what `op` already applies."""
    _require(stats, CaptureSpec(grams=frozenset({i}), cross=frozenset({(i, j)})))
    check_enough_tokens(stats.tokens, stats.gram[i].shape[0])
    mo = Moments.of(stats, i, j)
    fitted = solve_ghost(mo, options, [Moments.of(f, i, j) for f in folds] if folds else None)
    weight = torch.eye(op.hidden, dtype=fitted.m.dtype, device=fitted.m.device) + fitted.m
    if op.matrix is None and op.factors is None:
        op.matrix, op.factors, op.bias = (None, fitted.factors, fitted.bias) if fitted.factors else (weight, None, fitted.bias)
    else:  # a second pair of the same block: compose as full matrices
        previous = op.linear_map()
        assert previous is not None
        op.matrix, op.factors = previous @ weight, None
        bias = op.bias @ weight if op.bias is not None else None
        op.bias = bias if fitted.bias is None else (fitted.bias if bias is None else bias + fitted.bias)
    op.eps.append(fitted.eps)
    if stats.weighting == "uniform":  # weighted sums measure a weighted error: left out
        op.errors.append(math.sqrt(mo.error(fitted.m, fitted.bias) / max(float(mo.dd), 1e-300)))


def _fit_pair(method: str, stats: Stats, i: int, j: int) -> Tensor | float:
    """One constrained operator mapping h_i onto h_j: a C×C symmetric matrix, a C vector (diagonal) or a scalar."""
    if method == "linearpatch-r":
        _require(stats, CaptureSpec(rotated=frozenset({i, j})))
        rotation = hadamard(stats.rot_abs[i].numel()).to(stats.rot_abs[i].device)
        return fit_linearpatch_r(stats.rot_abs[i], stats.rot_abs[j], rotation)
    if method == "linearpatch-d":
        return fit_linearpatch_d(stats.abs_sum[i], stats.abs_sum[j])
    return fit_prunecomp(stats.abs_sum[i], stats.abs_sum[j])


def _as_matrix(part: Tensor | float, hidden: int, device: torch.device | None = None) -> Tensor:
    """A scalar, a C vector (diagonal) or a C×C matrix as the C×C map it applies."""
    if isinstance(part, float):
        return part * torch.eye(hidden, dtype=torch.float64, device=device)
    return torch.diag(part) if part.dim() == 1 else part


def _fit_replaceme_block(stats: Stats, block: Pair, ridge: Ridge) -> Operator:
    s, e = block
    if s == 0:
        raise GhostlayersError(
            "replaceme needs a kept layer before the removed block, whose MLP it rescales; the block starts at "
            "layer 0: choose other layers or another recovery"
        )
    _require(stats, CaptureSpec(mlp=frozenset({(s - 1, s), (s - 1, e)})))
    check_enough_tokens(stats.tokens, stats.abs_sum[0].numel())
    eps = ridge.fixed(stats.mlp_gram[s - 1])
    t = fit_replaceme(stats.mlp_gram[s - 1], stats.mlp_cross[(s - 1, s)], stats.mlp_cross[(s - 1, e)], eps)
    op = Operator("replaceme", block, [block], hidden=t.shape[0], transform=t, eps=[eps])
    if s in stats.gram and block in stats.cross and stats.weighting == "uniform":
        op.errors.append(replaceme_relative_error(stats, block, t))
    return op


def _require(stats: Stats, spec: CaptureSpec) -> None:
    if not spec.covered_by(stats):
        raise GhostlayersError(f"internal: sums {spec} were not captured")


def alignment_errors(stats: Stats, operators: list[Operator], blocks: list[Pair]) -> list[float]:
    """Relative alignment error ‖ĥ − Y‖/‖X − Y‖ of each block's recovery on the sums of (held-out) windows;
    blocks without an operator (no recovery) score 1.0 by definition."""
    by_block = {op.block: op for op in operators}
    out = []
    for block in blocks:
        s, e = block
        op = by_block.get(block)
        if op is None:
            out.append(1.0)
        elif op.transform is not None:
            out.append(replaceme_relative_error(stats, block, op.transform))
        else:
            out.append(map_error(Moments.of(stats, s, e), op))
    return out


def map_error(mo: Moments, op: Operator | None) -> float:
    """‖X W + b − Y‖ / ‖X − Y‖ on the sums `mo` of the map op applies at its boundary (the identity for none, or for
    a transform folded before the boundary, whose effect is already in X)."""
    eye = torch.eye(len(mo.gram), dtype=mo.gram.dtype, device=mo.gram.device)
    w = None if op is None else op.linear_map()
    m = torch.zeros_like(eye) if w is None else w.to(mo.gram.device, mo.gram.dtype) - eye
    bias = None if op is None or op.bias is None else op.bias.to(mo.gram.device, mo.gram.dtype)
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
