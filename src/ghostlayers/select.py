"""Layer selection criteria: one object each, in a registry.

A *scored* criterion rates every candidate (a block start, or a single layer) with one `score(stats, candidate)`
from the sums of one calibration pass; `scores` and `select` both read it, so the numbers in the manifest are the
ones the choice was made on. A *given* criterion (last, manual, ghost-greedy) names its layers some other way.

Cosines are per token over the hidden axis, averaged over calibration tokens (the criteria's definitions; see
DESIGN.md §3 for how the reference code differs).

To add a criterion: a subclass of `Scored` (or `Given`) here, decorated with `@register` (see docs/design.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import GhostlayersError
from .options import FitOptions
from .plan import Pair, Plan, check_drop
from .registry import Registry
from .spec import CaptureSpec

if TYPE_CHECKING:  # nothing here imports torch: the command line reads the registry for its choices and help
    from torch import Tensor
    from transformers import PreTrainedModel

    from .capture import Stats


@dataclass(frozen=True)
class SelectOptions:
    """angular_last_token: the angular criterion averages over the last token only (Gromov et al.); paper: score as
    the reference code does (cosine over the sequence axis, its candidate ranges); ghost: how --select ghost fits
    each candidate's ghost (None: the paper's fit); context: what the loss criteria score with (`loss.LossContext`:
    the model, the held-out windows, the recovery), None for the others."""

    angular_last_token: bool = True
    paper: bool = False
    ghost: FitOptions | None = None
    context: Any = None


@dataclass
class Selection:
    """What the user asked to remove: a criterion and how many layers (or the layers, for manual), how the
    operators are to be fitted (plan.FIT_MODES), and the criterion's options; `scores` is filled in by the pass."""

    criterion: str
    drop: int
    layers: list[int] | None = None  # for manual
    fit: str = "auto"  # auto | block | layer | sequential (see plan.make_plan)
    angular_last_token: bool = True
    paper: bool = False  # reproduce the reference code: cosine over the sequence axis, start index 0 never scored
    scores: dict[str, float] = field(default_factory=dict)
    ghost: FitOptions | None = None  # how --select ghost fits each candidate's ghost (None: the paper's fit)
    select_windows: int = 4  # held-out calibration windows the loss criteria score on
    score_with: str | None = None  # the recovery the loss criteria install (None: ghost, or the first method fitted)

    @property
    def options(self) -> SelectOptions:
        return SelectOptions(self.angular_last_token, self.paper, self.ghost)


def candidate_fit(options: SelectOptions) -> FitOptions:
    """The ghost fit every candidate is repaired with while the criteria compare them (--select ghost's residual,
    the loss criteria's repair): the fit asked for, unshrunk (shrinking can only raise the in-sample residual the
    candidates are ranked by, and would need every candidate's fold sums); the paper's when none was asked for.
    The one place this rule lives: `prune` and `compare` pass their fit as it is."""
    return FitOptions() if options.ghost is None else replace(options.ghost, shrink=None)


def shrunk_fit(options: SelectOptions) -> FitOptions:
    """The fit `prune` gives the chosen block: the one asked for, or the ghost's default (shrunk)."""
    from .recovery.ghost import Ghost

    return Ghost().default_fit(options.ghost or FitOptions())


class Criterion:
    name: ClassVar[str]
    help: ClassVar[str]
    contiguous: ClassVar[bool] = True  # picks one block; False: layers anywhere
    scored: ClassVar[bool] = True
    cosines_only: ClassVar[bool] = False  # scores from cosine sums alone (so --two-pass can select first)
    held_out: ClassVar[bool] = False  # scores on held-out windows with the model (`SelectOptions.context`)
    all_cosines: ClassVar[bool] = False  # scores a candidate against every candidate's cosine (each pass has them)

    def needs_folds(self, options: SelectOptions) -> bool:
        """Whether scoring a candidate needs the sums of the calibration folds (a cross-validated fit)."""
        return False

    def ghost_solves(self, folds: int) -> int:
        """How many C×C ghost fits scoring one candidate takes (for the forecast): 0 for the cosine criteria."""
        return 0


class Scored(Criterion):
    """Rates candidates from the sums; `best` is "max" or "min"; candidates are block starts (contiguous) or
    layers."""

    best: ClassVar[str] = "min"

    def candidates(self, num_layers: int, drop: int, options: SelectOptions) -> range:
        return range(num_layers - drop + 1)

    def pairs(self, num_layers: int, drop: int, options: SelectOptions) -> list[Pair]:
        """The (input, output) boundary pair of each candidate."""
        width = drop if self.contiguous else 1
        return [(c, c + width) for c in self.candidates(num_layers, drop, options)]

    def needs(self, num_layers: int, drop: int, options: SelectOptions) -> CaptureSpec:
        return self.needs_for(self.pairs(num_layers, drop, options), options)

    def needs_for(self, pairs: list[Pair], options: SelectOptions) -> CaptureSpec:
        """The sums that score the candidates `pairs` (a pass may score some of them only: `calibrate`'s groups)."""
        pairs = frozenset(pairs)
        return CaptureSpec(cosine=pairs, sequence_cosine=pairs if options.paper else frozenset())

    def score(self, stats: Stats, candidate: int, drop: int, options: SelectOptions) -> float:
        raise NotImplementedError

    def pick(self, scores: dict[int, float], drop: int) -> list[int]:
        """The removed layers the scores choose (the first of equal scores)."""
        if self.contiguous:
            start = (max if self.best == "max" else min)(scores, key=scores.__getitem__)
            return list(range(start, start + drop))
        if drop > len(scores):
            raise GhostlayersError(f"cannot remove {drop} layers when only {len(scores)} are scored")
        ranked = sorted(scores, key=scores.__getitem__, reverse=self.best == "max")
        return sorted(ranked[:drop])


class Given(Criterion):
    """Names its layers without scoring candidates from the pass."""

    scored = False

    def choose(self, model: PreTrainedModel, windows: Tensor, num_layers: int, drop: int, layers: list[int] | None,
               batch_size: int, progress: bool, options: SelectOptions) -> tuple[list[int], dict[str, float]]:
        """(removed layers, scores for the manifest)."""
        raise NotImplementedError


CRITERIA_REGISTRY = Registry("selection")
register = CRITERIA_REGISTRY.add  # class decorator: the criterion is a --select choice under its `name`


def get(name: str) -> Criterion:
    return CRITERIA_REGISTRY.find(name)


def _reference_starts(num_layers: int, drop: int, options: SelectOptions) -> range:
    """Candidate block starts. The reference code scores s = 1 … L − n − 1 only (never 0, never the last block)."""
    return range(1, num_layers - drop) if options.paper else range(num_layers - drop + 1)


@register
class Streamline(Scored):
    name = "streamline"
    help = "contiguous block with the most similar input and output (LLM-Streamline, the paper's)"
    best = "max"
    cosines_only = True
    candidates = staticmethod(_reference_starts)

    def score(self, stats: Stats, candidate: int, drop: int, options: SelectOptions) -> float:
        return stats.mean_cos((candidate, candidate + drop), options.paper)


@register
class Angular(Scored):
    name = "angular"
    help = "contiguous block of least angular distance arccos(cos)/π (Gromov et al.)"
    cosines_only = True
    candidates = staticmethod(_reference_starts)

    def score(self, stats: Stats, candidate: int, drop: int, options: SelectOptions) -> float:
        return stats.mean_angle((candidate, candidate + drop), options.angular_last_token)


@register
class ShortGPT(Scored):
    name = "shortgpt"
    help = "the layers of lowest Block Influence 1 − mean cos(h_i, h_{i+1}), anywhere (ShortGPT)"
    contiguous = False
    cosines_only = True

    def candidates(self, num_layers: int, drop: int, options: SelectOptions) -> range:
        """Every layer, or as the reference code loops (`for i in range(num_layers - 1)`), all but the last."""
        return range(num_layers - 1) if options.paper else range(num_layers)

    def score(self, stats: Stats, candidate: int, drop: int, options: SelectOptions) -> float:
        return 1.0 - stats.mean_cos((candidate, candidate + 1), options.paper)


@register
class GhostSelect(Scored):
    name = "ghost"
    help = ("the contiguous block whose ghost leaves the smallest residual ‖XW* − Y‖/‖Y‖ (recovery-aware, from "
            "the same one pass; on SmolLM2 it picked streamline's block at 4 and 6 layers and a far better one at 8)")

    def needs_for(self, pairs: list[Pair], options: SelectOptions) -> CaptureSpec:
        pairs = frozenset(pairs)  # the ghost of every candidate, from the same pass
        return CaptureSpec(grams=frozenset(s for s, _ in pairs), cross=pairs, cosine=pairs)

    def needs_folds(self, options: SelectOptions) -> bool:
        return candidate_fit(options).needs_folds

    def score(self, stats: Stats, candidate: int, drop: int, options: SelectOptions) -> float:
        return ghost_residual(stats, (candidate, candidate + drop), candidate_fit(options))

    def ghost_solves(self, folds: int) -> int:
        return 1


@register
class GhostCV(GhostSelect):
    name = "ghost-cv"
    help = ("the contiguous block whose ghost best predicts calibration text it was not fitted on: ‖X_k W*_{−k} − "
            "Y_k‖/‖Y‖ summed over --folds folds, each fold's W* fitted on the others (a block whose map only fits "
            "the calibration scores worse); the same one pass, holding 1 + --folds sets of every candidate's sums "
            "(5× ghost's memory with --folds 4) and fitting each candidate --folds times")

    def needs_folds(self, options: SelectOptions) -> bool:
        return True

    def ghost_solves(self, folds: int) -> int:
        return folds

    def score(self, stats: Stats, candidate: int, drop: int, options: SelectOptions) -> float:
        return held_out_residual(stats, (candidate, candidate + drop), candidate_fit(options))


@register
class GhostShrunk(GhostCV):
    name = "ghost-shrunk"
    help = ("like ghost-cv, with each block repaired as prune repairs it (the shrunk ghost, its α chosen on the "
            "same folds): the held-out error of the operator the block will get")

    def score(self, stats: Stats, candidate: int, drop: int, options: SelectOptions) -> float:
        return held_out_residual(stats, (candidate, candidate + drop), shrunk_fit(options))


@register
class GhostBlend(GhostSelect):
    name = "ghost-blend"
    help = ("the contiguous block of smallest √(r·d): the ghost's residual r (as --select ghost) times the "
            "cosine distance d = √(2(1 − mean cos(X, Y))) (streamline's measure, as a residual of unit vectors): "
            "a block the ghost repairs far better wins, near-ties go to the block that changes the stream least; "
            "the same pass, sums and cost as ghost; the default: the smallest worst case of the rules measured in "
            "docs/selection/transfer")

    def score(self, stats: Stats, candidate: int, drop: int, options: SelectOptions) -> float:
        pair = (candidate, candidate + drop)
        return math.sqrt(ghost_residual(stats, pair, candidate_fit(options)) * cosine_distance(stats, pair))


STREAMLINE_TIE = 0.05  # --select streamline-ghost: blocks within 5% of streamline's best cosine distance tie


@register
class StreamlineGhost(GhostSelect):
    name = "streamline-ghost"
    help = (f"streamline's block, unless blocks within {100 * STREAMLINE_TIE:.0f}%% of its cosine distance tie with it: "
            "then the one of those whose ghost leaves the smallest residual (ghost's score; the rest score inf); "
            "the same one pass as ghost")
    all_cosines = True  # (one ghost fit per candidate at most: only the blocks that tie with streamline's)

    def score(self, stats: Stats, candidate: int, drop: int, options: SelectOptions) -> float:
        distance = {s: 1.0 - stats.mean_cos((s, e)) for s, e in stats.cos if e - s == drop}
        if distance[candidate] > (1 + STREAMLINE_TIE) * min(distance.values()):
            return math.inf
        return ghost_residual(stats, (candidate, candidate + drop), candidate_fit(options))


@register
class LossSelect(Scored):
    name = "loss"
    help = ("the contiguous block whose removal, repaired by --recover (fitted from the one pass, like every "
            "candidate's), gives the lowest next-token loss on --select-windows calibration windows held out of the "
            "fit; costs one pass over them plus, per candidate, the layers after its start and the LM head (about "
            "(L − n)²/2 layer passes in all)")
    held_out = True

    def needs_for(self, pairs: list[Pair], options: SelectOptions) -> CaptureSpec:
        return CaptureSpec()  # the recovery's sums for every candidate come with the pass (calibrate adds them)

    def score(self, stats: Stats, candidate: int, drop: int, options: SelectOptions) -> float:
        return options.context.block_loss(stats, (candidate, candidate + drop))


@register
class LossGreedy(Given):
    name = "loss-greedy"
    help = ("layers anywhere, removed one at a time (SLEB-style): each time the layer whose removal, repaired by "
            "--recover on the model pruned so far, gives the lowest loss on the held-out windows; per removed layer "
            "one pass over the calibration windows, one over the held-out ones, and per candidate the layers after "
            "it; the final operators are then fitted as --fit auto says")
    contiguous = False
    held_out = True

    def choose(self, model, windows, num_layers, drop, layers, batch_size, progress, options):
        from .loss import greedy_loss
        from .offload import Offloaded

        if isinstance(model, Offloaded):
            raise GhostlayersError("--select loss-greedy prunes as it goes and needs the model in memory: "
                                   "drop --layer-by-layer or choose another selection")
        check_drop(drop, num_layers)
        return greedy_loss(options.context, windows, drop)


@register
class GhostGreedy(Given):
    name = "ghost-greedy"
    help = ("layers anywhere, removed one at a time where the model pruned so far is best repaired (one pass per "
            "layer)")
    contiguous = False

    def choose(self, model, windows, num_layers, drop, layers, batch_size, progress, options):
        from .offload import Offloaded

        if isinstance(model, Offloaded):
            raise GhostlayersError("--select ghost-greedy prunes as it goes and needs the model in memory: "
                                   "drop --layer-by-layer or choose another selection")
        removed = greedy_ghost(model, windows, drop, batch_size, progress)
        return removed, {str(layer): float(step) for step, layer in enumerate(removed)}  # the order picked


@register
class Last(Given):
    name = "last"
    help = "the block just before the final layer"

    def choose(self, model, windows, num_layers, drop, layers, batch_size, progress, options):
        return last(num_layers, drop), {}


def folded(criteria: list[str], fit: FitOptions | None) -> bool:
    """Whether choosing among `criteria` (with the ghost fit `fit`) needs the sums of calibration folds."""
    return any(get(c).needs_folds(SelectOptions(ghost=fit)) for c in criteria)


def held_out_windows(criteria: list[str], select_windows: int) -> int:
    """How many calibration windows beyond the fit's a run draws (in the same seeded draw, after them) for the
    criteria among `criteria` that score candidates on held-out windows (`loss`, `loss-greedy`); 0 for the rest."""
    return select_windows if any(get(c).held_out for c in criteria) else 0


MANUAL_NEEDS_LAYERS = "--select manual needs --layers, e.g. --layers 18-23 or --layers 3,9,14"


@register
class Manual(Given):
    name = "manual"
    help = "--layers"
    contiguous = False

    def choose(self, model, windows, num_layers, drop, layers, batch_size, progress, options):
        if not layers:
            raise GhostlayersError(MANUAL_NEEDS_LAYERS)
        return list(layers), {}


CRITERIA = tuple(CRITERIA_REGISTRY)
# what `prune` selects with unless told otherwise: of the rules measured on four calibration texts × drops 4/6/8 ×
# four scored texts, the smallest worst case and the most cells within 1% of the best (docs/selection/transfer)
DEFAULT = "ghost-blend"


def ghost_residual(stats: Stats, block: Pair, options: FitOptions | None = None) -> float:
    """‖X W* − Y‖ / ‖Y‖ for the block's ghost W* on the calibration sums: what the next layer gets wrong, relative
    to what it expects, after the best linear repair (0: removable for free)."""
    from .operators import Moments
    from .recovery.ghost import solve_ghost

    mo = Moments.of(stats, *block)
    folds = [Moments.of(f, *block) for f in stats.folds] or None  # for --eps cv
    try:
        fitted = solve_ghost(mo, options or FitOptions(), folds)
    except GhostlayersError:  # a candidate whose system is singular cannot be repaired: never chosen
        return math.inf
    return (mo.error(fitted.m, fitted.bias) / max(float(mo.yy), 1e-300)) ** 0.5


def held_out_residual(stats: Stats, block: Pair, options: FitOptions) -> float:
    """√(Σ_k ‖X_k W_{−k} − Y_k‖² / ‖Y‖²): each calibration fold's error under the block's operator fitted (as
    `options` says) on the other folds, relative to the target (`stats.folds`, 2 or more)."""
    from .operators import Moments
    from .recovery.ghost import held_out_error

    if len(stats.folds) < 2:
        raise GhostlayersError("a cross-validated selection needs the sums of at least two calibration folds: "
                               "give --folds 2 or more")
    mo = Moments.of(stats, *block)
    try:
        error = held_out_error(mo, options, [Moments.of(f, *block) for f in stats.folds])
    except GhostlayersError:  # no fold could be fitted on the others: never chosen
        return math.inf
    return (error / max(float(mo.yy), 1e-300)) ** 0.5


def cosine_distance(stats: Stats, pair: Pair) -> float:
    """√(2(1 − mean cos(h_i, h_j))): streamline's similarity as the distance between unit vectors."""
    return math.sqrt(max(2.0 * (1.0 - stats.mean_cos(pair)), 0.0))


def greedy_ghost(
    model: PreTrainedModel, windows: Tensor, drop: int, batch_size: int = 8, progress: bool = True
) -> list[int]:
    """Recovery-aware selection for scattered layers: remove one layer at a time, each time the layer of the model
    pruned so far (operators installed) whose removal its ghost repairs best (smallest ‖XW* − Y‖/‖Y‖ of that
    layer's input X and output Y), and fit that ghost in its place. One pass per removed layer. Returns the layers
    in the order picked (dense numbering)."""
    from .capture import capture
    from .maps import Operator, remove_layer
    from .models import adapter
    from .recovery import fit
    from .surgery import apply

    n = adapter(model).num_layers
    check_drop(drop, n)
    removed: list[int] = []
    operators: list[Operator] = []
    for _ in range(drop):
        current = apply(model, removed, operators) if removed else model
        kept = Plan(n, tuple(sorted(removed))).kept
        spec = CaptureSpec(grams=frozenset(range(len(kept))), cross=frozenset((k, k + 1) for k in range(len(kept))))
        stats = capture(current, windows, spec, batch_size, progress=progress)
        best = min(range(len(kept)), key=lambda k: ghost_residual(stats, (k, k + 1)))
        layer = kept[best]
        fitted = fit("ghost", stats, Plan(len(kept), (best,)))[0]  # raw input of `layer` -> raw input after it
        end = kept[best + 1] if best + 1 < len(kept) else n  # the next kept boundary (dense numbering)
        operators = remove_layer(operators, layer, end, fitted.map, "ghost", fitted.hidden)
        removed.append(layer)
        del current
    return removed


def last(num_layers: int, drop: int) -> list[int]:
    """The n layers before the final one."""
    check_drop(drop, num_layers)
    return list(range(num_layers - 1 - drop, num_layers - 1))


def selection_spec(criterion: str, drop: int, num_layers: int, paper: bool = False) -> CaptureSpec:
    """The statistics a criterion needs, plus what fitting any of its candidates needs (one pass does both)."""
    check_drop(drop, num_layers)
    crit = get(criterion)
    return crit.needs(num_layers, drop, SelectOptions(paper=paper)) if isinstance(crit, Scored) else CaptureSpec()


def candidate_spec(crit: Scored, pairs: list[Pair], methods: tuple[str, ...], options: SelectOptions,
                   two_pass: bool = False) -> CaptureSpec:
    """What one calibration pass captures for the candidates `pairs`: the sums that score them and, unless the
    fit sums come from a second pass (`two_pass`), those that fit each of `methods` on any of them."""
    from . import recovery

    spec = crit.needs_for(pairs, options)
    for method in () if two_pass else methods:
        spec = spec | recovery.needs(method, pairs, pairs if crit.contiguous else [])
    return spec


def _scored(criterion: str) -> Scored:
    crit = get(criterion)
    if not isinstance(crit, Scored):
        raise GhostlayersError(f"internal: --select {criterion} does not score candidates from the pass")
    return crit


def candidate_scores(criterion: str, stats: Stats, drop: int, options: SelectOptions,
                     only: set[int] | None = None) -> dict[int, float]:
    """Each candidate's score (`only`: those candidates, whose sums `stats` holds)."""
    crit = _scored(criterion)
    return {c: crit.score(stats, c, drop, options) for c in crit.candidates(stats.num_layers, drop, options)
            if only is None or c in only}
