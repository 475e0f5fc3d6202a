"""The steps `ghostlayers.prune` is made of: calibrate the dense model once (selection and sums from one pass),
then fit and apply the recovery.

    stats, plan = calibrate(model, windows, Selection("streamline", 6))
    pruned, operators = recover(model, stats, plan, "ghost")

Beyond one pass: `fit_sequential` (one operator per block, fitted on what the pruned model really delivers there)
and `refit_plan` (the kept layers after each boundary refitted, `refit.walk`); `fit_plan` picks between `recover`
and `fit_sequential` as the plan says.
"""

from __future__ import annotations

import platform
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import torch
import transformers
from torch import Tensor
from transformers import PreTrainedModel

from . import recovery
from .version import __version__
from .capture import CaptureSpec, DenseSource, Stats, collect, fold_windows
from .loss import LossContext
from .errors import GhostlayersError
from .maps import Operator
from .models import adapter
from .offload import LayerwiseSource, Offloaded
from .options import REFIT_NOT_PER_LAYER, FitOptions, RefitOptions, Ridge, RunOptions, as_fit_options, parse_ridge
from .forecast import spec_matrices
from .plan import SCATTERED_AUTO, Pair, Plan, check_drop, make_plan
from .recovery import fit, get, needs, spec_for
from .refit import Boundaries, Refit, walk, with_weights
from .spill import keeper
from .select import CRITERIA_REGISTRY, Scored, Selection, candidate_fit, candidate_scores, candidate_spec
from .select import get as criterion
from .surgery import apply, apply_deferred, ghost_modules


def calibrate(
    model: PreTrainedModel | Offloaded,
    windows: Tensor,
    selection: Selection,
    methods: tuple[str, ...] = ("ghost",),
    run: RunOptions = RunOptions(),
    extra: CaptureSpec | None = None,
    two_pass: bool = False,
    held_out: Tensor | None = None,
    sums_budget: float | None = None,
) -> tuple[Stats, Plan]:
    """One pass of the dense model over `windows` that yields the selection and the sums every method in `methods`
    needs to be fitted.

    For criteria whose blocks are known only after the pass, the pass captures the sums of every candidate block,
    so no second pass is needed (except for sums of blocks the criterion does not visit, e.g. ReplaceMe after
    ShortGPT, whose MLP sums depend on where its runs end, or --fit block after ShortGPT, or --fit layer after a
    contiguous criterion: those get a second pass over the same windows).
    `extra` adds sums to the pass (e.g. every pair's cosine, for a similarity map). `run.token_weights` is how tokens
    count in the fit sums (options.TOKEN_WEIGHTS); `run.folds` > 1 also keeps the sums of that many disjoint parts
    of the windows in `stats.folds` (for --eps cv). With --fit sequential the fit sums come later, from `fit_sequential`.
    An `Offloaded` model is calibrated layer by layer (`offload.LayerwiseSource`, the same sums). `two_pass`
    selects from the cosines of a first pass and captures the fit sums of the chosen blocks only in a second: for
    large hidden sizes, where the sums of every candidate (2 C² float64 each) would not fit.
    `held_out`: the windows the loss criteria score candidates on (never part of `windows`: see `split_held_out`).
    `sums_budget`: bytes the candidates' float64 sums may hold; where all of them would not fit, the candidates
    are scored in groups that do, one pass each (the same sums, hence the same choice, in more passes).
    """
    offloaded = isinstance(model, Offloaded)
    skeleton = model.model if offloaded else model
    ad = adapter(skeleton)
    n = ad.num_layers
    if ghost_modules(skeleton):
        raise GhostlayersError("this model already carries ghost operators: prune the dense model instead")
    crit = criterion(selection.criterion)
    for method in methods:
        recovery.check(method, ad)

    if not run.folds <= len(windows):
        raise GhostlayersError(f"cannot split {len(windows)} calibration windows into {run.folds} folds for a "
                               "cross-validated choice (--shrink, the ghost's default; --eps cv; --rank cv): give "
                               f"--calib-samples {run.folds} or more, fewer --folds, or --shrink none")
    if two_pass and not crit.cosines_only:
        usable = ", ".join(c.name for c in CRITERIA_REGISTRY.values() if c.cosines_only)
        raise GhostlayersError(f"--two-pass selects from cosines first: use it with --select {usable} "
                               f"(--select {selection.criterion} needs no candidate sums or all of them)")

    options = selection.options
    if crit.held_out:
        if offloaded:
            raise GhostlayersError(f"--select {crit.name} runs the pruned candidates and needs the model in memory: "
                                   "drop --layer-by-layer or choose another selection")
        if held_out is None or len(held_out) == 0:
            raise GhostlayersError(f"--select {crit.name} scores candidates on held-out calibration windows: give "
                                   "--select-windows 1 or more")
        score_with = selection.score_with or ("ghost" if "ghost" in methods else (methods[0] if methods else "none"))
        recovery.check(score_with, ad)
        methods = tuple(dict.fromkeys((*methods, score_with)))  # its sums for every candidate come with the pass
        options = replace(options, context=LossContext(model, held_out, score_with, candidate_fit(selection.options),
                                                       run.batch_size, run.progress))
        selection.score_with = score_with
    def sums(spec: CaptureSpec, folded: bool = True) -> Stats:
        return capture_sums(model, windows, spec, run, folded)

    if not isinstance(crit, Scored):
        removed, selection.scores = crit.choose(model, windows, n, selection.drop, selection.layers, run.batch_size,
                                                run.progress, options)
        plan = make_plan(n, sorted(removed), selection.fit, SCATTERED_AUTO)
        fitted = _dense_fitted(methods, plan.sequential)
        if not fitted and extra is None:  # nothing to fit from the dense pass (the refit's walk fits): no pass
            return Stats(n, tokens=windows.numel(), sequences=len(windows), token_weights=run.token_weights), plan
        return sums(spec_for(fitted, plan) | (extra or CaptureSpec())), plan

    check_drop(selection.drop, n)
    candidates = crit.pairs(n, selection.drop, options)  # every block (or layer) the criterion may pick
    contiguous = crit.contiguous  # its candidates are blocks; shortgpt's are single layers

    every = CaptureSpec(cosine=frozenset(candidates)) if crit.all_cosines else CaptureSpec()  # cheap: a sum each

    def spec_of(pairs: list[Pair]) -> CaptureSpec:
        return candidate_spec(crit, pairs, methods, options, two_pass) | every | (extra or CaptureSpec())

    # the folds of a cross-validated fit are kept for the chosen blocks only (a second pass), not for every
    # candidate: 1 + --folds times the candidates' sums would not fit for large hidden sizes
    lean = run.folds > 1 and not two_pass and not crit.needs_folds(options)
    starts = crit.candidates(n, selection.drop, options)
    groups = candidate_groups(len(candidates), spec_of(candidates), ad.hidden_size, sums_budget, crit.held_out,
                              1 if lean or run.folds == 1 else run.folds + 1)
    rated: dict[int, float] = {}
    for group in groups:  # one pass per group of candidates, whose sums fit the budget (one group: all of them)
        stats = sums(spec_of([candidates[k] for k in group]), folded=not lean)
        rated.update(candidate_scores(selection.criterion, stats, selection.drop, options, {starts[k] for k in group}))
    rated = {c: rated[c] for c in starts}  # in candidate order, whatever the groups
    removed = crit.pick(rated, selection.drop)
    selection.scores = {str(c): score for c, score in rated.items()}
    # ShortGPT is a scattered criterion: `auto` fits it as scattered removals are fitted even when its picks happen
    # to be adjacent (per layer, or sequentially: the default, which costs one pass per block)
    fit_mode = SCATTERED_AUTO if selection.fit == "auto" and not contiguous else selection.fit
    plan = make_plan(n, removed, fit_mode, SCATTERED_AUTO)
    # the chosen blocks' fit sums (and folds, where a choice is cross-validated): the pass's, or one more pass
    return with_fit_sums(model, windows, stats, plan, methods, run), plan


def candidate_groups(count: int, spec: CaptureSpec, hidden: int, budget: float | None,
                     held_out: bool = False, copies: int = 1) -> list[list[int]]:
    """The candidates 0 … count − 1 in as few consecutive groups as keep each group's C × C float64 sums (`copies`
    sets of them: 1 + folds where the candidates' fit is cross-validated) within `budget` bytes (None, or a
    criterion that scores on held-out windows with the model: one group)."""
    per = copies * spec_matrices(spec) * hidden * hidden * 8 / max(count, 1)  # each candidate's share
    if budget is None or held_out or per * count <= budget:
        return [list(range(count))]
    size = max(1, int(budget / per + 1e-6)) if per else count
    return [list(range(k, min(k + size, count))) for k in range(0, count, size)]


def capture_sums(model: PreTrainedModel | Offloaded, windows: Tensor, spec: CaptureSpec, run: RunOptions,
                 folded: bool = True) -> Stats:
    """One pass over `windows` for the sums `spec` names; with `run.folds` > 1 (and `folded`) those of each fold
    too, in `stats.folds`. Layer by layer for an `Offloaded` model."""
    source = LayerwiseSource(model, keeper(run.spill)) if isinstance(model, Offloaded) else DenseSource(model)
    if not folded or run.folds == 1:
        return collect(source, windows, spec, run)
    parts = [collect(source, chunk, spec, run) for chunk in fold_windows(windows, run.folds, run.stride)]
    total = sum(parts[1:], parts[0])
    total.folds = parts
    return total


def with_fit_sums(model: PreTrainedModel | Offloaded, windows: Tensor, stats: Stats, plan: Plan, methods: tuple[str, ...],
                  run: RunOptions) -> Stats:
    """`stats` with what fitting `methods` from the dense pass needs for `plan` (one more pass where missing)."""
    needed = spec_for(_dense_fitted(methods, plan.sequential), plan)
    if needed.covered_by(stats) and (run.folds == 1 or stats.folds or needed == CaptureSpec()):
        return stats
    fitted = capture_sums(model, windows, needed, run)  # with its folds, for a cross-validated choice
    fitted.update(stats)
    return fitted


def split_held_out(windows: Tensor, selection: Selection) -> tuple[Tensor, Tensor | None]:
    """(fit windows, held-out windows): for the loss criteria the last `selection.select_windows` windows are held
    out of every fit and only score candidates; for the others nothing is held out."""
    if not criterion(selection.criterion).held_out:
        return windows, None
    k = selection.select_windows
    if not 1 <= k < len(windows):
        raise GhostlayersError(f"--select {selection.criterion} holds out --select-windows {k} of {len(windows)} "
                               "calibration windows: it needs at least 1 and fewer than there are windows")
    return windows[:-k], windows[-k:]


def fit_plan(
    model: PreTrainedModel | Offloaded,
    windows: Tensor,
    stats: Stats,
    plan: Plan,
    method: str,
    options: FitOptions | Ridge | float | str | None = None,
    run: RunOptions = RunOptions(),
) -> tuple[PreTrainedModel, list[Operator]]:
    """The pruned model with `method` fitted as `plan` says: from the dense pass's sums (`recover`), or in order on
    the pruned model's own input (`fit_sequential`, for a sequential plan and a method with a boundary operator)."""
    if plan.sequential and get(method).at_boundary:
        return fit_sequential(model, windows, plan, method, options, run)
    return recover(model, stats, plan, method, options)


def refit_plan(
    model: PreTrainedModel | Offloaded,
    windows: Tensor,
    stats: Stats,
    plan: Plan,
    method: str,
    refit: RefitOptions,
    options: FitOptions | Ridge | float | str | None = None,
    run: RunOptions = RunOptions(),
) -> tuple[PreTrainedModel, list[Operator], list[Refit]]:
    """`method`'s recovery, then the kept layers after each boundary refitted as `refit` says (see `refit.walk`):
    each block's operator is fitted when the walk reaches it, on what the refitted layers before it deliver (for
    one block that is the dense fit; ReplaceMe's transforms come from the dense pass's `stats`). Folded recoveries
    (none, prunecomp, replaceme, procrustes) stay folded: the result is still a vanilla checkpoint.
    `run.folds` > 1 splits the windows for --eps cv and --refit-ridge cv. Returns the model, the operators, the
    refits."""
    how, options = get(method), as_fit_options(options)
    if plan.per_layer:
        raise GhostlayersError(REFIT_NOT_PER_LAYER)
    if len(plan.blocks()) > 1 and not plan.sequential:
        raise GhostlayersError("--refit fits each later block's operator on the refitted model, i.e. sequentially: "
                               "use --fit sequential (or auto) with scattered layers")
    n = plan.num_layers
    first = [] if how.at_boundary else fit(method, stats, plan, options)  # ReplaceMe's, from the dense pass
    current = pruned_model(model, plan.removed, first)
    boundaries = _boundaries(method, n, options, run) if how.at_boundary else None
    offloaded = isinstance(model, Offloaded)
    try:
        # the walk's model carries ReplaceMe's transform folded (held layers fold it again each time, which only
        # a refit-before of that down_proj, in its last hold, could see); scales and rotations come as modules
        fitted, refits = walk(model.model if offloaded else model, current, windows, plan.removed, refit,
                              boundaries, run.folds, run.batch_size, run.progress, model.hold if offloaded else None,
                              run.stride, keeper(run.spill))
        operators = sorted(first + fitted, key=lambda op: op.block)
        base = with_weights(model.model if offloaded else model, current, refits)
    finally:
        _done_with(model, current)
    refitted_down = {r.layer for r in refits if r.matrix == "down_proj"}
    # a refitted down_proj already holds what a ReplaceMe transform of that layer did (it was the starting point)
    folded = [op for op in operators if op.transform is None or op.block[0] - 1 not in refitted_down]
    # the walk's model carries folded kinds as matrices; the result folds them into the refitted weights
    return pruned_model(model, plan.removed, folded, base), operators, refits


def repair(
    model: PreTrainedModel | Offloaded,
    windows: Tensor,
    stats: Stats,
    plan: Plan,
    method: str,
    options: FitOptions | None = None,
    refit: RefitOptions | None = None,
    run: RunOptions = RunOptions(),
) -> tuple[PreTrainedModel, list[Operator], list[Refit]]:
    """The one fit-and-repair step of `prune` and `compare`: `method` fitted as `plan` says (`fit_plan`), or with
    `refit` fitted and the kept layers after each boundary refitted (`refit_plan`). Returns the pruned model, the
    operators and the refits (none without `refit`)."""
    if refit is None:
        return (*fit_plan(model, windows, stats, plan, method, options, run), [])
    return refit_plan(model, windows, stats, plan, method, refit, options, run)


def _dense_fitted(methods: tuple[str, ...], sequential: bool) -> tuple[str, ...]:
    """The methods fitted from the dense pass's sums: all, or under --fit sequential only those with no boundary
    operator to fit sequentially (ReplaceMe, which folds into the layer before the block)."""
    return tuple(m for m in methods if not get(m).at_boundary) if sequential else methods


def recover(
    model: PreTrainedModel | Offloaded,
    stats: Stats,
    plan: Plan,
    method: str,
    options: FitOptions | Ridge | float | str | None = None,
) -> tuple[PreTrainedModel, list[Operator]]:
    """The pruned model with `method`'s recovery installed or folded; the dense model is left as it was."""
    operators = fit(method, stats, plan, options, stats.folds or None)
    return pruned_model(model, plan.removed, operators), operators


def pruned_model(model: PreTrainedModel | Offloaded, removed: tuple[int, ...], operators: list[Operator],
                 base: PreTrainedModel | None = None) -> PreTrainedModel:
    """`surgery.apply`: `base` (default: the dense model) without `removed`, `operators` installed or folded. For an
    `Offloaded` model, on its skeleton: the decoder layers stay in their files, and `model.hold` reads them into the
    result with its folds applied (`surgery.Folds`, deferred to each layer's turn)."""
    if not isinstance(model, Offloaded):
        return apply(base if base is not None else model, removed, operators)
    pruned, folds = apply_deferred(base if base is not None else model.model, removed, operators)
    model.share(pruned, folds)
    return pruned


def _done_with(model: PreTrainedModel | Offloaded, pruned: PreTrainedModel) -> None:
    """Forget a pruned model that was a step on the way (an `Offloaded` model stops filling it)."""
    if isinstance(model, Offloaded):
        model.unshare(pruned)


def fit_sequential(
    model: PreTrainedModel | Offloaded,
    windows: Tensor,
    plan: Plan,
    method: str,
    options: FitOptions | Ridge | float | str | None = None,
    run: RunOptions = RunOptions(),
) -> tuple[PreTrainedModel, list[Operator]]:
    """Fit one operator per removed block, in order, on X = what the pruned model with the earlier blocks'
    operators installed delivers at the block's boundary, against Y = the dense model's h_e there.

    The paper fits every operator on the dense model's own (h_s, h_e); after the first block the pruned model no
    longer delivers h_s, and this fit sees the error the earlier operators left. It is the refit's walk with no
    layer refitted (`refit.walk`): both models side by side, layer by layer, each operator fitted and installed as a
    module when the walk reaches its boundary (folded into the weights at the end). `run.folds` > 1 keeps the sums
    of that many parts of the windows (--eps cv)."""
    how, options = get(method), as_fit_options(options)
    if not how.at_boundary:
        raise GhostlayersError(f"--fit sequential fits an operator at each boundary: it does not apply to {method}")
    current = pruned_model(model, plan.removed, [])
    offloaded = isinstance(model, Offloaded)
    try:
        operators, _ = walk(model.model if offloaded else model, current, windows, plan.removed, None,
                            _boundaries(method, plan.num_layers, options, run), run.folds, run.batch_size,
                            run.progress, model.hold if offloaded else None, run.stride, keeper(run.spill))
    finally:
        _done_with(model, current)
    return pruned_model(model, plan.removed, operators), operators


def _boundaries(method: str, n: int, options: FitOptions, run: RunOptions) -> Boundaries:
    """How the walk fits `method`'s operator of a block when it reaches its boundary."""
    return Boundaries(
        spec=lambda block: needs(method, [block], [block]),
        fit=lambda block, sums, parts: fit(method, sums, Plan(n, tuple(range(*block))), options, parts),
        token_weights=run.token_weights,
    )


def manifest(
    *,
    base_model: str,
    plan: Plan,
    selection: Selection,
    recovery: str,
    eps: float | str | Ridge,
    operators: list[Operator],
    options: dict[str, Any] | None = None,
    calibration: dict[str, Any],
    dense_parameters: int | None = None,
) -> dict[str, Any]:
    """How a pruned model was made, in original (dense) layer numbering."""
    kept = plan.kept
    return {
        "base_model": base_model,
        "dense_parameters": dense_parameters,
        "num_layers_dense": plan.num_layers,
        "num_layers_pruned": len(kept),
        "removed_layers": list(plan.removed),
        "kept_layers": kept,
        "selection": {
            "criterion": selection.criterion,
            "drop": len(plan.removed),
            "angular_last_token": selection.angular_last_token if selection.criterion == "angular" else None,
            "scores": selection.scores,
            **({"held_out_windows": selection.select_windows, "scored_with": selection.score_with}
               if criterion(selection.criterion).held_out else {}),
        },
        "recovery": {
            "method": recovery,
            "eps": parse_ridge(eps).recorded if "eps" in get(recovery).uses else None,
            "per_layer": plan.per_layer,
            "sequential": plan.sequential,
            **(options or {}),
        },
        "operators": [
            {
                "block": list(op.block),
                "boundary_dense": op.boundary,
                "boundary_pruned": plan.pruned_index(op.boundary),
                "kind": op.describe(),
                "scale": op.scale,
                "fitted_on": [list(p) for p in op.pairs],
                "relative_fit_error": op.errors,
                "eps_used": op.eps,
            }
            for op in operators
        ],
        "calibration": calibration,
        "versions": {
            "ghostlayers": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
