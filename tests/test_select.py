"""Selection criteria against brute force on explicit activations, and plan validation."""

import pytest
import torch

from conftest import random_windows, tiny_model
from ghostlayers.capture import capture
from ghostlayers.errors import GhostlayersError
from ghostlayers.pipeline import Selection, calibrate
from ghostlayers.plan import make_plan, parse_layers
from ghostlayers.select import SelectOptions, candidate_scores, get, selection_spec
from ghostlayers.options import QUIET


def select(criterion, stats, drop, angular_last_token=True, paper=False):
    """The layers `criterion` removes from its scores on `stats`, as `calibrate` picks them."""
    options = SelectOptions(angular_last_token, paper, None)
    return get(criterion).pick(candidate_scores(criterion, stats, drop, options), drop)


def all_inputs(model, windows):
    """h_0..h_L with h_L taken before the final norm (pre-hook), as the criteria define."""
    got = {}
    handle = model.model.norm.register_forward_pre_hook(lambda m, args: got.setdefault("h", args[0]))
    with torch.no_grad():
        hs = list(model(windows, output_hidden_states=True).hidden_states[:-1])
    handle.remove()
    return hs + [got["h"]]


def mean_cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


@pytest.mark.parametrize("drop", [1, 2, 4])
def test_streamline_and_angular_match_brute_force(drop):
    model = tiny_model("llama", layers=6)
    windows = random_windows(3, 16)
    stats = capture(model, windows, selection_spec("streamline", drop, 6), progress=False)
    hs = all_inputs(model, windows)
    best = max(range(7 - drop), key=lambda s: mean_cos(hs[s], hs[s + drop]))
    assert select("streamline", stats, drop) == list(range(best, best + drop))
    last_angle = lambda s: float(  # noqa: E731
        torch.arccos(torch.nn.functional.cosine_similarity(hs[s][:, -1], hs[s + drop][:, -1], dim=-1).clamp(-1, 1)).mean()
    )
    best_angular = min(range(7 - drop), key=last_angle)
    assert select("angular", stats, drop, angular_last_token=True) == list(range(best_angular, best_angular + drop))


def test_shortgpt_picks_lowest_block_influence():
    model = tiny_model("qwen2", layers=6)
    windows = random_windows(3, 16)
    stats = capture(model, windows, selection_spec("shortgpt", 2, 6), progress=False)
    hs = all_inputs(model, windows)
    influence = [1 - mean_cos(hs[i], hs[i + 1]) for i in range(6)]
    assert select("shortgpt", stats, 2) == sorted(sorted(range(6), key=influence.__getitem__)[:2])


def test_last_and_manual_plans():
    model = tiny_model("llama", layers=6)
    windows = random_windows(2, 8)
    _, plan = calibrate(model, windows, Selection("last", 2), run=QUIET)
    assert plan.removed == (3, 4) and not plan.per_layer
    _, plan = calibrate(model, windows, Selection("manual", 2, [4, 1]), run=QUIET)
    assert plan.removed == (1, 4) and plan.sequential and not plan.per_layer  # scattered: sequential by default
    _, plan = calibrate(model, windows, Selection("manual", 2, [4, 1], fit="layer"), run=QUIET)
    assert plan.per_layer and not plan.sequential


def test_one_pass_feeds_selection_and_fit():
    model = tiny_model("llama", layers=6)
    stats, plan = calibrate(model, random_windows(2, 8), Selection("streamline", 3), run=QUIET)
    (s, e), = plan.blocks()
    assert (s, e) in stats.cross and s in stats.gram


def test_parse_layers():
    assert parse_layers("12-14") == [12, 13, 14]
    assert parse_layers("3, 9,14") == [3, 9, 14]
    assert parse_layers("1,4-5") == [1, 4, 5]
    for bad in ("a", "5-3", "1,,2"):
        with pytest.raises(GhostlayersError, match="--layers"):
            parse_layers(bad)


@pytest.mark.parametrize(
    "layers,message", [([1, 1], "repeat"), ([0, 9], "out of range"), ([0, 1, 2, 3, 4, 5], "between 1 and 5"), ([], "between 1")]
)
def test_make_plan_rejects_bad_layers(layers, message):
    with pytest.raises(GhostlayersError, match=message):
        make_plan(6, layers)


def test_drop_bounds():
    for drop in (0, 6, 7):
        with pytest.raises(GhostlayersError, match="--drop"):
            selection_spec("streamline", drop, 6)


def test_paper_selection_reproduces_the_reference_code():
    """Cosine over the sequence axis (torch's default dim=1 on [B, T, C]) and start 0 / the last block never scored."""
    model = tiny_model("llama", layers=6)
    windows = random_windows(3, 16)
    stats = capture(model, windows, selection_spec("streamline", 2, 6, paper=True), progress=False)
    hs = all_inputs(model, windows)
    reference = {s: float(torch.cosine_similarity(hs[s], hs[s + 2]).mean()) for s in range(1, 4)}
    for s, value in reference.items():
        assert stats.mean_cos((s, s + 2), sequence_axis=True) == pytest.approx(value, rel=1e-9)
    best = max(reference, key=reference.__getitem__)
    assert select("streamline", stats, 2, paper=True) == [best, best + 1]
    stats = capture(model, windows, selection_spec("shortgpt", 2, 6, paper=True), progress=False)
    # ShortGPT as the reference loops it (issue 13, defect 1): `for i in range(num_layers - 1)`, the Block Influence
    # of layer i from the cosine (over the sequence axis) of its input and output; the last layer is never scored
    influence = {}
    for i in range(6 - 1):
        influence[i] = 1.0 - float(torch.cosine_similarity(hs[i], hs[i + 1]).mean())
    for drop in (2, 5):
        assert select("shortgpt", stats, drop, paper=True) == sorted(sorted(influence, key=influence.get)[:drop])
    assert 5 not in select("shortgpt", stats, 5, paper=True) and 0 in select("shortgpt", stats, 5, paper=True)


def test_ghost_selection_scores_the_unshrunk_fit_whoever_asks():
    """Issue 22: the rule that --select ghost ranks candidates by the unshrunk residual lives in the criterion, so
    `prune` and `compare` (which passed its --shrink through and ranked by the shrunk fit) rank alike; a shrink
    alone needs no candidate fold sums."""
    from ghostlayers.options import FitOptions, parse_shrink

    model = tiny_model("llama", layers=6)
    windows = random_windows(6, 24)
    stats = capture(model, windows, selection_spec("ghost", 2, 6), progress=False)
    shrunk = SelectOptions(ghost=FitOptions(shrink=parse_shrink("diagonal:0.5")))
    plain = SelectOptions(ghost=FitOptions())
    assert candidate_scores("ghost", stats, 2, shrunk) == candidate_scores("ghost", stats, 2, plain)
    assert not get("ghost").needs_folds(shrunk)


@pytest.mark.parametrize("criterion", ["ghost", "streamline"])
def test_candidates_scored_in_groups_within_a_budget_give_the_same_scores_and_choice(criterion):
    """A sums budget that holds two candidates' sums: four passes instead of one, the same scores bit for bit."""
    from ghostlayers.forecast import spec_matrices
    from ghostlayers.pipeline import calibrate, candidate_groups
    from ghostlayers.select import Selection, candidate_spec

    model = tiny_model("llama", layers=8)
    windows = random_windows(6, 24)
    crit = get(criterion)
    pairs = crit.pairs(8, 2, SelectOptions())
    per = spec_matrices(candidate_spec(crit, pairs, ("ghost",), SelectOptions())) * 16 * 16 * 8 / len(pairs)
    assert candidate_groups(len(pairs), candidate_spec(crit, pairs, ("ghost",), SelectOptions()), 16, 2 * per) == [
        [0, 1], [2, 3], [4, 5], [6]]
    one, grouped = Selection(criterion, 2), Selection(criterion, 2)
    _, plan = calibrate(model, windows, one, ("ghost",), QUIET)
    _, grouped_plan = calibrate(model, windows, grouped, ("ghost",), QUIET, sums_budget=2 * per)
    assert grouped.scores == one.scores and grouped_plan.removed == plan.removed


# --- rules that transfer (issue 26): each score against its definition on explicit activations -----------------

def _fold_states(model, windows, folds):
    """Per fold, the hidden states h_0..h_L of its windows as (tokens, C) float64 (the fold split `capture` uses)."""
    from ghostlayers.capture import fold_windows

    return [[h.reshape(-1, h.shape[-1]) for h in all_inputs(model, part)] for part in fold_windows(windows, folds)]


def _fit(x, y, eps=1e-6):
    c = x.shape[1]
    return torch.linalg.solve(x.T @ x + eps * torch.eye(c, dtype=x.dtype), x.T @ (y - x))


def _selected(criterion, model, windows, drop, folds=3, ghost=None):
    from dataclasses import replace as with_

    selection = Selection(criterion, drop, ghost=ghost)
    _, plan = calibrate(model, windows, selection, run=with_(QUIET, folds=folds))
    return {int(k): v for k, v in selection.scores.items()}, plan


def test_ghost_cv_is_the_residual_of_each_fold_under_the_fit_on_the_others():
    model = tiny_model("llama", layers=6)
    windows = random_windows(9, 20)
    parts = _fold_states(model, windows, 3)
    scores, plan = _selected("ghost-cv", model, windows, 2)

    def explicit(s):
        error, target = 0.0, 0.0
        for k, fold in enumerate(parts):
            others = [p for j, p in enumerate(parts) if j != k]
            x = torch.cat([p[s] for p in others])
            m = _fit(x, torch.cat([p[s + 2] for p in others]))
            error += float((fold[s] + fold[s] @ m - fold[s + 2]).square().sum())
            target += float(fold[s + 2].square().sum())
        return (error / target) ** 0.5

    for s in range(5):
        assert scores[s] == pytest.approx(explicit(s), rel=1e-6)
    best = min(scores, key=scores.get)
    assert plan.removed == (best, best + 1)
    # the in-sample residual (--select ghost) is smaller than the held-out one for every block: the fit overfits
    in_sample, _ = _selected("ghost", model, windows, 2)
    assert all(in_sample[s] < scores[s] for s in range(5))


def test_ghost_shrunk_is_the_held_out_error_of_the_shrunk_fit_at_its_best_alpha():
    from ghostlayers.options import SHRINK_GRID

    model = tiny_model("qwen2", layers=6)
    windows = random_windows(9, 20)
    parts = _fold_states(model, windows, 3)
    scores, plan = _selected("ghost-shrunk", model, windows, 2)
    cv, _ = _selected("ghost-cv", model, windows, 2)

    def explicit(s):
        totals = [0.0] * len(SHRINK_GRID)
        target = sum(float(p[s + 2].square().sum()) for p in parts)
        for k, fold in enumerate(parts):
            others = [p for j, p in enumerate(parts) if j != k]
            x, y = torch.cat([p[s] for p in others]), torch.cat([p[s + 2] for p in others])
            full = _fit(x, y)
            diagonal = torch.diag(((x * (y - x)).sum(0)) / ((x * x).sum(0) + 1e-6))  # the best diagonal map
            for a, alpha in enumerate(SHRINK_GRID):
                m = (1 - alpha) * full + alpha * diagonal
                totals[a] += float((fold[s] + fold[s] @ m - fold[s + 2]).square().sum())
        return (min(totals) / target) ** 0.5

    for s in range(5):
        assert scores[s] == pytest.approx(explicit(s), rel=1e-6)
        assert scores[s] <= cv[s] * (1 + 1e-9)  # α = 0 is on the grid: shrinking never scores worse
    best = min(scores, key=scores.get)
    assert plan.removed == (best, best + 1)


def test_ghost_blend_and_streamline_ghost_follow_their_definitions():
    from ghostlayers.select import STREAMLINE_TIE

    model = tiny_model("mistral", layers=6)
    windows = random_windows(6, 20)
    hs = [h.reshape(-1, h.shape[-1]) for h in all_inputs(model, windows)]

    def residual(s):
        x, y = hs[s], hs[s + 2]
        return float((x + x @ _fit(x, y) - y).norm() / y.norm())

    distance = {s: 1 - mean_cos(hs[s], hs[s + 2]) for s in range(5)}
    blend, plan = _selected("ghost-blend", model, windows, 2, folds=1)
    for s in range(5):
        assert blend[s] == pytest.approx((residual(s) * (2 * distance[s]) ** 0.5) ** 0.5, rel=1e-6)
    assert plan.removed[0] == min(blend, key=blend.get)
    tied, plan = _selected("streamline-ghost", model, windows, 2, folds=1)
    near = [s for s in range(5) if distance[s] <= (1 + STREAMLINE_TIE) * min(distance.values())]
    for s in range(5):
        assert tied[s] == (pytest.approx(residual(s), rel=1e-6) if s in near else float("inf"))
    assert plan.removed[0] == min(near, key=residual)


def test_streamline_ghost_breaks_a_tie_streamline_would_not_see():
    """Two blocks as similar in cosine: streamline takes the first, streamline-ghost the one the ghost repairs
    better; with no tie both take streamline's."""
    from ghostlayers.capture import Stats
    from ghostlayers.select import candidate_scores

    c, tokens = 4, 100
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, c, dtype=torch.float64, generator=g)
    stats = Stats(num_layers=3, tokens=tokens, sequences=1)
    for s, (cos, y) in enumerate([(0.90, x + torch.randn(tokens, c, dtype=torch.float64, generator=g)),
                                      (0.899, 2 * x)]):
        stats.gram[s] = x.T @ x
        stats.cross[(s, s + 1)] = x.T @ y
        stats.sumsq[s + 1] = y.square().sum()
        stats.sum[s], stats.sum[s + 1] = x.sum(0), y.sum(0)
        stats.cos[(s, s + 1)] = torch.tensor(cos * tokens, dtype=torch.float64)
    options = SelectOptions()
    assert get("streamline").pick(candidate_scores("streamline", stats, 1, options, {0, 1}), 1) == [0]
    scores = {s: get("streamline-ghost").score(stats, s, 1, options) for s in (0, 1)}
    assert scores[1] < 1e-6 < scores[0] < float("inf")  # 2x is repaired exactly; noise is not
    stats.cos[(1, 2)] = torch.tensor(0.5 * tokens, dtype=torch.float64)  # no longer a tie
    assert get("streamline-ghost").score(stats, 1, 1, options) == float("inf")


def test_cross_validated_selection_memory_is_flat_in_windows_and_grows_with_folds():
    """The candidates' sums (and their folds') do not grow with the calibration windows; ghost-cv holds 1 + --folds
    sets of them, --select ghost one."""
    from dataclasses import replace as with_

    model = tiny_model("llama", layers=6)

    def held(criterion, windows, folds):
        stats, _ = calibrate(model, random_windows(windows, 20), Selection(criterion, 2), run=with_(QUIET, folds=folds))
        return sum(t.numel() for s in [stats, *stats.folds] for t in s.tensors())

    assert held("ghost-cv", 6, 3) == held("ghost-cv", 12, 3)
    assert held("ghost-cv", 12, 3) > 3 * held("ghost", 12, 1)


def test_a_cross_validated_selection_gets_its_folds_even_where_the_fit_needs_none():
    from ghostlayers.api import PruneSpec, prune
    from ghostlayers.options import FitOptions

    model = tiny_model("llama", layers=6)
    spec = PruneSpec(Selection("ghost-cv", 2), fit=FitOptions(), refit=None, progress=False)
    result = prune(model, random_windows(8, 20), spec)
    scores = result.manifest["selection"]["scores"]
    assert len(scores) == 5 and all(0 < v < float("inf") for v in scores.values())
    best = int(min(scores, key=scores.get))
    assert result.plan.removed == (best, best + 1)
