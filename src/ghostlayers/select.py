"""Layer selection criteria, as pure functions of captured statistics, and the plan they produce.

Cosines are per token over the hidden axis, averaged over calibration tokens (the criteria's definitions; see
DESIGN.md §3 for how the reference code differs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .capture import CaptureSpec, Pair, Stats
from .errors import GhostlayersError
from .operators import GhostOptions, Moments, solve_ghost

CRITERIA = ("streamline", "angular", "shortgpt", "ghost", "ghost-greedy", "last", "manual")
CONTIGUOUS = ("streamline", "angular", "ghost", "last")
# sequential: one operator per block, fitted in order on what the pruned model (earlier operators installed)
# really delivers at the block, against the dense model's output (pipeline.fit_sequential)
FIT_MODES = ("auto", "block", "layer", "sequential")
SCATTERED_AUTO = "sequential"  # what `auto` means for a scattered removal (docs/beyond-paper: better than "layer")


@dataclass(frozen=True)
class Plan:
    """Which dense layers to remove, and how operators are fitted for them.

    per_layer=False: one operator per contiguous block [s, e), fitted on (h_s, h_e).
    per_layer=True: one operator per removed layer p, fitted on (h_p, h_{p+1}), as the paper does for
    non-contiguous selections; adjacent ones are applied back to back at the block's end.
    sequential=True: one operator per block, fitted in order on the pruned model's own input (`fit_sequential`).
    """

    num_layers: int
    removed: tuple[int, ...]
    per_layer: bool = False
    sequential: bool = False

    def blocks(self) -> list[tuple[int, int]]:
        """Maximal runs [s, e) of removed layers."""
        runs: list[tuple[int, int]] = []
        for i in self.removed:
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
        return runs

    def fit_pairs(self, block: tuple[int, int]) -> list[Pair]:
        """The (X, Y) boundary pairs whose operators, applied in order, replace `block`."""
        s, e = block
        return [(p, p + 1) for p in range(s, e)] if self.per_layer else [(s, e)]


def make_plan(
    num_layers: int, removed: list[int] | tuple[int, ...], fit: str = "auto", scattered: str = SCATTERED_AUTO
) -> Plan:
    """Validate `removed` and choose the fit mode: `auto` fits per block when the removal is one contiguous block
    and as `scattered` says otherwise (sequential; the paper fits per layer); `block`, `layer` and `sequential`
    force one."""
    layers = tuple(removed)
    if len(set(layers)) != len(layers):
        raise GhostlayersError(f"layers {list(layers)} repeat an index: name each layer once")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise GhostlayersError(f"layers {bad} are out of range: this model has layers 0-{num_layers - 1}")
    check_drop(len(layers), num_layers)
    plan = Plan(num_layers, tuple(sorted(layers)))
    if fit not in FIT_MODES:
        raise GhostlayersError(f"unknown fit mode {fit!r}: use one of {', '.join(FIT_MODES)}")
    if fit == "auto":
        fit = scattered if len(plan.blocks()) > 1 else "block"
    return Plan(num_layers, plan.removed, per_layer=fit == "layer", sequential=fit == "sequential")


def check_drop(drop: int, num_layers: int) -> None:
    if not 0 < drop < num_layers:
        raise GhostlayersError(
            f"cannot remove {drop} of {num_layers} layers: --drop must be between 1 and {num_layers - 1}"
        )


def parse_layers(text: str) -> list[int]:
    """'12-17' -> [12..17]; '3,9,14' -> [3, 9, 14]; mixtures like '3,10-12' too (ranges inclusive)."""
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise GhostlayersError(f"cannot read --layers {text!r}: write e.g. 12-17 or 3,9,14") from None
    return out


def selection_spec(criterion: str, drop: int, num_layers: int, paper: bool = False) -> CaptureSpec:
    """The statistics a criterion needs, plus what fitting any of its candidates needs (one pass does both)."""
    check_drop(drop, num_layers)
    if criterion in ("streamline", "angular", "ghost"):
        pairs = [(s, s + drop) for s in range(num_layers - drop + 1)]
    elif criterion == "shortgpt":
        pairs = [(i, i + 1) for i in range(num_layers)]
    else:
        return CaptureSpec()
    candidates = frozenset(pairs)
    if criterion == "ghost":  # the ghost of every candidate block, fitted from the same pass
        return CaptureSpec(grams=frozenset(s for s, _ in pairs), cross=candidates, cosine=candidates)
    return CaptureSpec(cosine=candidates, sequence_cosine=candidates if paper else frozenset())


def _starts(num_layers: int, drop: int, paper: bool) -> range:
    """Candidate block starts. The reference code scores s = 1 … L − n − 1 only (never 0, never the last block)."""
    return range(1, num_layers - drop) if paper else range(num_layers - drop + 1)


def streamline(stats: Stats, drop: int, paper: bool = False) -> list[int]:
    """LLM-Streamline: the block [s, s+n) whose input and output are most alike (highest mean cosine)."""
    start = max(_starts(stats.num_layers, drop, paper), key=lambda s: stats.mean_cos((s, s + drop), paper))
    return list(range(start, start + drop))


def angular(stats: Stats, drop: int, last_token: bool = True, paper: bool = False) -> list[int]:
    """Gromov et al.: the block minimising the angular distance arccos(cos)/π between input and output."""
    start = min(_starts(stats.num_layers, drop, paper), key=lambda s: stats.mean_angle((s, s + drop), last_token))
    return list(range(start, start + drop))


def shortgpt(stats: Stats, drop: int, paper: bool = False) -> list[int]:
    """ShortGPT: the n layers of lowest Block Influence 1 − mean cos(h_i, h_{i+1}). The reference code loops
    `for i in range(num_layers - 1)`: it never scores the last layer (`paper`)."""
    layers = _shortgpt_layers(stats.num_layers, paper)
    if drop > len(layers):
        raise GhostlayersError(f"cannot remove {drop} layers when only {len(layers)} are scored")
    influence = {i: 1.0 - stats.mean_cos((i, i + 1), paper) for i in layers}
    return sorted(sorted(influence, key=influence.__getitem__)[:drop])


def _shortgpt_layers(num_layers: int, paper: bool) -> range:
    """The layers ShortGPT scores: every one, or as the reference code loops, all but the last."""
    return range(num_layers - 1) if paper else range(num_layers)


def ghost_residual(stats: Stats, block: Pair, options: GhostOptions | None = None) -> float:
    """‖X W* − Y‖ / ‖Y‖ for the block's ghost W* on the calibration sums: what the next layer gets wrong, relative
    to what it expects, after the best linear repair (0: removable for free)."""
    mo = Moments.of(stats, *block)
    folds = [Moments.of(f, *block) for f in stats.folds] or None  # for --eps cv
    try:
        fitted = solve_ghost(mo, options or GhostOptions(), folds)
    except GhostlayersError:  # a candidate whose system is singular cannot be repaired: never chosen
        return math.inf
    return (mo.error(fitted.m, fitted.bias) / max(float(mo.yy), 1e-300)) ** 0.5


def ghost(stats: Stats, drop: int, options: GhostOptions | None = None) -> list[int]:
    """Recovery-aware selection: the contiguous block whose removal the ghost (fitted as `options` say: ridge,
    affine, rank) repairs best (smallest residual)."""
    start = min(range(stats.num_layers - drop + 1), key=lambda s: ghost_residual(stats, (s, s + drop), options))
    return list(range(start, start + drop))


def last(num_layers: int, drop: int) -> list[int]:
    """The n layers before the final one."""
    check_drop(drop, num_layers)
    return list(range(num_layers - 1 - drop, num_layers - 1))


def select(
    criterion: str, stats: Stats, drop: int, angular_last_token: bool = True, paper: bool = False,
    options: GhostOptions | None = None,
) -> list[int]:
    if criterion == "streamline":
        return streamline(stats, drop, paper)
    if criterion == "angular":
        return angular(stats, drop, angular_last_token, paper)
    if criterion == "shortgpt":
        return shortgpt(stats, drop, paper)
    if criterion == "ghost":
        return ghost(stats, drop, options)
    if criterion == "last":
        return last(stats.num_layers, drop)
    raise GhostlayersError(f"unknown selection {criterion!r}: use one of {', '.join(CRITERIA)}")


def scores(
    criterion: str, stats: Stats, drop: int, angular_last_token: bool = True, paper: bool = False,
    options: GhostOptions | None = None,
) -> dict[str, float]:
    """The score of each candidate, for the manifest and for people: block start or layer -> score."""
    n = stats.num_layers
    if criterion == "streamline":
        return {str(s): stats.mean_cos((s, s + drop), paper) for s in _starts(n, drop, paper)}
    if criterion == "angular":
        return {str(s): stats.mean_angle((s, s + drop), angular_last_token) for s in _starts(n, drop, paper)}
    if criterion == "shortgpt":
        return {str(i): 1.0 - stats.mean_cos((i, i + 1), paper) for i in _shortgpt_layers(n, paper)}
    if criterion == "ghost":
        return {str(s): ghost_residual(stats, (s, s + drop), options) for s in range(n - drop + 1)}
    return {}
