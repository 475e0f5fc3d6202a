"""Recovery methods: the maths, as functions of the captured sums. Everything here is float64.

X = h_s enters the removed block, Y = h_e leaves it (dense model, calibration tokens); G = XᵀX, K = XᵀY;
|·| sums are per channel; H is a normalised Hadamard matrix; m is the MLP output of layer s − 1.

  ghost          (G + εI) M* = K − G,  W* = I + M*                     h ← h W*          (Ghosted Layers)
  linearpatch-d  d_c = Σ|Y_c| / Σ|X_c|                                 h ← h diag(d)     (LinearPatch)
  linearpatch-r  d_c = Σ|(YH)_c| / Σ|(XH)_c|                          h ← h H diag(d) Hᵀ
  prunecomp      α = mean_c d_c                                        h ← α h, folded   (Prune&Comp)
  replaceme      T = (mᵀm + εI)⁻¹ mᵀ(Y − X + m)                        m ← m T, folded   (ReplaceMe-LS)
                 into down_proj of layer s − 1, so that Ŷ = X − m + m T
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .capture import CaptureSpec, Pair, Stats
from .errors import GhostlayersError
from .hadamard import hadamard
from .select import Plan

RECOVERY = ("none", "prunecomp", "linearpatch-d", "linearpatch-r", "replaceme", "ghost")
DEFAULT_EPS = 1e-6  # the paper's absolute ridge


def fit_ghost(gram: Tensor, cross: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """W* = I + M*, (G + εI) M* = K − G: the least-squares C×C operator mapping X onto Y."""
    eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    return eye + _ridge_solve(gram, cross - gram, eps, "ghost")


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

    Exactly one of `matrix` (h ← h W), `diag` (h ← h · d), `scale` (h ← α h, folded) or `transform` (ReplaceMe's
    T, folded into layer s − 1's down_proj) is set. Per-layer fits are composed into one operator per block.
    """

    method: str
    block: Pair
    pairs: list[Pair]
    hidden: int = 0
    matrix: Tensor | None = None
    diag: Tensor | None = None
    scale: float | None = None
    transform: Tensor | None = None
    errors: list[float] = field(default_factory=list)  # calibration fit error per pair, where the sums allow it

    @property
    def boundary(self) -> int:
        return self.block[1]

    def linear_map(self) -> Tensor | None:
        """The C×C map h ← h W this operator applies at the boundary (None for ReplaceMe)."""
        part = next((p for p in (self.matrix, self.diag, self.scale) if p is not None), None)
        return None if part is None else _as_matrix(part, self.hidden)

    def runtime_weight(self) -> Tensor | None:
        """The weight of the module installed at the boundary (C×C or C); None for folded methods."""
        return self.matrix if self.matrix is not None else self.diag


def needs(method: str, plan_pairs: list[Pair], blocks: list[Pair]) -> CaptureSpec:
    """The sums `method` needs for the given fit pairs and blocks (beyond Σ|h| and Σ‖h‖², always captured)."""
    if method == "ghost":
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


def fit(method: str, stats: Stats, plan: Plan, eps: float = DEFAULT_EPS) -> list[Operator]:
    """Fit `method` for every removed block of `plan` from one set of captured sums."""
    check_method(method)
    if method == "none":
        return []
    out = []
    for block in plan.blocks():
        if method == "replaceme":
            out.append(_fit_replaceme_block(stats, block, eps))
            continue
        op = Operator(method, block, plan.fit_pairs(block), hidden=stats.abs_sum[0].numel())
        for i, j in op.pairs:  # per-layer operators compose: h ← h W_1 W_2 …
            part = _fit_pair(method, stats, i, j, eps)
            if isinstance(part, float):
                op.scale = part * (op.scale if op.scale is not None else 1.0)
            elif part.dim() == 1:
                op.diag = part if op.diag is None else op.diag * part
            else:
                op.matrix = part if op.matrix is None else op.matrix @ part
            if i in stats.gram and (i, j) in stats.cross:
                single = _as_matrix(part, op.hidden, stats.gram[i].device)
                op.errors.append(relative_error(stats.gram[i], stats.cross[(i, j)], stats.sumsq[j], single))
        out.append(op)
    return out


def _fit_pair(method: str, stats: Stats, i: int, j: int, eps: float) -> Tensor | float:
    """One operator mapping h_i onto h_j: a C×C matrix, a C vector (diagonal) or a scalar."""
    if method == "ghost":
        _require(stats, CaptureSpec(grams=frozenset({i}), cross=frozenset({(i, j)})))
        check_enough_tokens(stats.tokens, stats.gram[i].shape[0])
        return fit_ghost(stats.gram[i], stats.cross[(i, j)], eps)
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


def _fit_replaceme_block(stats: Stats, block: Pair, eps: float) -> Operator:
    s, e = block
    if s == 0:
        raise GhostlayersError(
            "replaceme needs a kept layer before the removed block, whose MLP it rescales; the block starts at "
            "layer 0: choose other layers or another recovery"
        )
    _require(stats, CaptureSpec(mlp=frozenset({(s - 1, s), (s - 1, e)})))
    check_enough_tokens(stats.tokens, stats.abs_sum[0].numel())
    t = fit_replaceme(stats.mlp_gram[s - 1], stats.mlp_cross[(s - 1, s)], stats.mlp_cross[(s - 1, e)], eps)
    op = Operator("replaceme", block, [block], hidden=t.shape[0], transform=t)
    if s in stats.gram and block in stats.cross:
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
            w = op.linear_map()
            assert w is not None
            out.append(relative_error(stats.gram[s], stats.cross[block], stats.sumsq[e], w.to(stats.gram[s].device)))
    return out


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
