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
