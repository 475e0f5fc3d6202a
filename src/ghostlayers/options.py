"""Fit options, validated once, as frozen dataclasses: no torch here, so the command line can check them before
anything heavy is imported."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import GhostlayersError

if TYPE_CHECKING:
    from torch import Tensor

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

    @property
    def recorded(self) -> float | str:
        """How manifests and result rows record it: the paper's absolute ε as a number (as they always had it),
        any other choice as written on the command line."""
        return self.value if self.mode == "absolute" else str(self)

    def fixed(self, gram: Tensor) -> float:
        """ε for the absolute and relative modes."""
        if self.mode == "absolute":
            return self.value
        if self.mode == "relative":
            return self.value * float(gram.trace()) / gram.shape[0]
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


SHRINK_TARGETS = ("diagonal", "scalar")
SHRINK_GRID = tuple(k / 20 for k in range(21))  # candidate α for --shrink TARGET:cv: 0, 0.05, …, 1


@dataclass(frozen=True)
class Shrink:
    """Shrinkage of the ghost's M* toward the best constrained map of the same sums, M = (1 − α) M* + α M_c, with
    M_c the least-squares diagonal (`diagonal`: (G_kk + ε) m_k = R_kk) or scalar (`scalar`: (tr G + Cε) m = tr R)
    of X → Δ = Y − X. `amount` α in [0, 1], or None: chosen per boundary from SHRINK_GRID by k-fold
    cross-validation over calibration windows (as --eps cv)."""

    target: str = "diagonal"
    amount: float | None = None

    def __post_init__(self) -> None:
        if self.target not in SHRINK_TARGETS:
            raise GhostlayersError(f"unknown --shrink target {self.target!r}: use {' or '.join(SHRINK_TARGETS)}")
        if self.amount is not None and not 0 <= self.amount <= 1:
            raise GhostlayersError("--shrink amount must be between 0 and 1 (or cv)")

    def __str__(self) -> str:
        return f"{self.target}:{'cv' if self.amount is None else f'{self.amount:g}'}"


DEFAULT_SHRINK = Shrink("diagonal")  # what `prune` fits the ghost with unless told otherwise (docs/transfer)


def parse_shrink(text: str | Shrink | None) -> Shrink | None:
    """'none' (or None), 'diagonal' / 'scalar' (α by cross-validation), 'diagonal:cv', 'scalar:0.3'."""
    if text is None or isinstance(text, Shrink):
        return text
    if text == "none":
        return None
    target, _, amount = text.partition(":")
    if amount in ("", "cv"):
        return Shrink(target, None)
    try:
        value = float(amount)
    except ValueError:
        raise GhostlayersError(f"cannot read --shrink {text!r}: write e.g. diagonal:cv, scalar:0.3 or none") from None
    return Shrink(target, value)


@dataclass(frozen=True)
class FitOptions:
    """How an operator is fitted, validated once: the ridge (ghost, replaceme) and, for the ghost beyond the paper,
    an affine term, a rank limit on M, or shrinkage of M toward a constrained map. FitOptions() is the paper's fit."""

    ridge: Ridge = Ridge()
    affine: bool = False
    rank: int | str | None = None  # a rank, or "cv": chosen per boundary from RANK_GRID by cross-validation
    shrink: Shrink | None = None

    def __post_init__(self) -> None:
        if self.shrink is not None and self.rank is not None:
            raise GhostlayersError("--shrink and --rank both restrain M: use one of them")
        if not (self.rank is None or self.rank == "cv" or (isinstance(self.rank, int) and self.rank >= 1)):
            raise GhostlayersError(f"--rank must be a number of at least 1 or cv, not {self.rank!r}")

    @property
    def needs_folds(self) -> bool:
        """Whether a choice is cross-validated over calibration folds (--eps cv, --shrink TARGET:cv, --rank cv)."""
        return self.ridge.mode == "cv" or (self.shrink is not None and self.shrink.amount is None) or self.rank == "cv"


RANK_GRID = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)  # candidate ranks for --rank cv (those below C), then C


def parse_rank(text: str | int | None) -> int | str | None:
    """--rank: a number, cv, or None."""
    if text is None or text == "cv" or isinstance(text, int):
        return text
    try:
        return int(text)
    except ValueError:
        raise GhostlayersError(f"--rank must be a number of at least 1 or cv, not {text!r}") from None




TOKEN_WEIGHTS = ("uniform", "skip-first", "clip")  # how calibration tokens count in the fit sums (see capture)


@dataclass(frozen=True)
class RunOptions:
    """How the passes over the calibration windows run, validated once: windows per forward, progress bars, how
    tokens count in the fit sums (TOKEN_WEIGHTS), and into how many disjoint parts the windows are split so that
    cross-validated choices (--eps cv, --shrink, --refit-ridge cv) have held-out sums (1: not split): consecutive
    runs of windows, or with `stride` every folds-th window, which for a mixture (`--calib wiki,news --folds
    source`, whose windows alternate between the sources) makes each fold one source, so that every choice is
    scored on text of a source it was not fitted on."""

    batch_size: int = 8
    progress: bool = True
    token_weights: str = "uniform"
    folds: int = 1
    stride: bool = False  # fold k = windows k, k + folds, …: one source per fold of an interleaved mixture
    spill: str | None = None  # a folder: cached calibration states in memory-mapped files there (`spill.Spill`)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise GhostlayersError("--batch-size must be at least 1")
        if self.folds < 1:
            raise GhostlayersError("--folds must be at least 1")
        if self.token_weights not in TOKEN_WEIGHTS:
            raise GhostlayersError(f"unknown token weighting {self.token_weights!r}: use one of {', '.join(TOKEN_WEIGHTS)}")


QUIET = RunOptions(progress=False)


def check_folds(folds: int) -> int:
    """--folds for a cross-validated choice (the ghost's shrink, --eps cv, --rank cv, --refit-ridge cv): a fit on
    all folds but one scored on the one left out needs at least two."""
    if folds < 2:
        raise GhostlayersError("--folds must be at least 2")
    return folds


def as_fit_options(options: FitOptions | Ridge | float | str | None) -> FitOptions:
    """FitOptions as they are; a ridge (a Ridge, a number or its text: see parse_ridge) as the fit with that ε.

    Kept on purpose (issue 22 asked for shims to go or say why): the public fit functions (`recovery.fit`,
    `pipeline.fit_plan` / `refit_plan` / `recover`) take `fit="ghost", options=1e-4` from a notebook as the paper
    states it; every internal caller passes FitOptions, so this is the one place the shorthand is read."""
    return options if isinstance(options, FitOptions) else FitOptions(ridge=parse_ridge(options))


DEFAULT_RHO = 0.1  # λ / (tr(ZᵀZ)/d): best of 0.01, 0.1, 1 and cv on SmolLM2 (docs/refit), as in issue 12's probe
DEFAULT_LAYERS = 2  # what `prune --refit auto` refits: it helped held-out wiki and news in every cell measured
RHO_GRID = (1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)  # candidates of `ridge="cv"`
REFIT_NOT_PER_LAYER = ("--refit fits one operator per removed block, on the refitted model: drop --fit layer "
                       "(use --fit sequential or auto)")


REFIT_TOKEN_WEIGHTS = ("clip", "uniform")


@dataclass(frozen=True)
class RefitOptions:
    """Which kept layers to refit and how strongly to hold them to their weights.

    layers: the K kept layers after each boundary (the boundary layer first); None: every layer to the end.
    ridge:  ρ (λ = ρ · tr(ZᵀZ)/d), or "cv": chosen per matrix from RHO_GRID by cross-validation over the
            calibration folds (the fit's `folds` parts of the windows).
    before: also refit the down_proj of the layer before each removed block so that it delivers the dense model's
            output of the block, as ReplaceMe does with a transform of that MLP's output (its boundary operator is
            then fitted on what the refitted layer delivers).
    token_weights: how tokens count in the refit's sums: "clip" (each token as if the stream its write is added to
            were at most CLIP_FACTOR × its window's median norm, `capture.token_weights`) or "uniform" (every token
            once, as before issue 27). The first token's massive activation is ~160× a typical token's in SmolLM2;
            a map that rescales the stream (Prune&Comp's α) leaves it with an error no write can undo, that is 98.5%
            of the uniform sums, and a refit that chases it overfits those few tokens (held-out wiki 45 → 114). The
            layers after read the stream through a norm, so an error on a token counts as it does relative to that
            token's norm: clipping says so, and leaves ordinary tokens counted once.
    """

    layers: int | None = None
    ridge: float | str = DEFAULT_RHO
    before: bool = False
    token_weights: str = "clip"

    def __post_init__(self) -> None:
        if self.layers is not None and self.layers < 1:
            raise GhostlayersError("--refit needs a number of layers of at least 1, or all")
        if isinstance(self.ridge, str):
            if self.ridge != "cv":
                raise GhostlayersError(f"cannot read --refit-ridge {self.ridge!r}: write e.g. 0.1 or cv")
        elif not (self.ridge >= 0 and math.isfinite(self.ridge)):
            raise GhostlayersError("--refit-ridge must be zero or positive")
        if self.token_weights not in REFIT_TOKEN_WEIGHTS:
            raise GhostlayersError(f"unknown refit token weighting {self.token_weights!r}: use one of "
                                   f"{', '.join(REFIT_TOKEN_WEIGHTS)}")

    def describe(self) -> str:
        what = "all" if self.layers is None else str(self.layers)
        tokens = "" if self.token_weights == "clip" else f", {self.token_weights} tokens"
        return f"refit {what} (ρ {self.ridge}{', before' if self.before else ''}{tokens})"


def parse_refit(layers: str | None, ridge: str | float = DEFAULT_RHO, before: bool = False) -> RefitOptions | None:
    """`--refit none|K|all` (with `--refit-ridge RHO|cv`, `--refit-before`) as options; None for none."""
    if layers is None or str(layers).strip().lower() in ("", "none", "0"):
        if before:
            raise GhostlayersError("--refit-before refits with --refit: give --refit K or all")
        return None
    text = str(layers).strip().lower()
    if text == "all":
        count = None
    else:
        try:
            count = int(text)
        except ValueError:
            raise GhostlayersError(f"cannot read --refit {layers!r}: write a number of layers, all or none") from None
    if isinstance(ridge, str) and ridge != "cv":
        try:
            ridge = float(ridge)
        except ValueError:
            raise GhostlayersError(f"cannot read --refit-ridge {ridge!r}: write e.g. 0.1 or cv") from None
    return RefitOptions(count, ridge, before)


@dataclass(frozen=True)
class HealOptions:
    """How to heal: `steps` optimiser steps of `batch_size` windows; see the module's docstring for the rest."""

    steps: int
    layers: int = 0  # --heal-layers K: whole kept layers after each boundary, trained too
    lr: float = 5e-3  # relative: each parameter's learning rate is lr × its RMS
    warmup: float = 0.1  # share of the steps
    min_lr: float = 0.1  # the cosine's floor, a share of the peak
    batch_size: int = 2
    clip: float = 1.0
    eval_every: int = 10
    patience: int = 3
    checkpoint: bool | None = None  # gradient checkpointing; None: where the memory estimate needs it
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise GhostlayersError("--heal takes a number of steps, 0 or more")
        if self.layers < 0:
            raise GhostlayersError("--heal-layers must be 0 or more")
        if self.batch_size < 1 or self.eval_every < 1 or self.patience < 1:
            raise GhostlayersError("the heal's batch size, evaluation interval and patience must be at least 1")
        if not (self.lr > 0 and 0 <= self.warmup < 1 and 0 <= self.min_lr <= 1 and self.clip > 0):
            raise GhostlayersError("the heal's learning rate and clip must be positive, warm-up and floor in [0, 1)")
