"""Issue 6, beyond the paper: ridge choices, affine and low-rank ghosts, Procrustes, token weights, sequential
fitting and recovery-aware selection, each checked against an explicit computation on the activations."""

import pytest
import torch

from conftest import random_windows, tiny_model
from ghostlayers.capture import CaptureSpec, PairSource, capture, collect
from ghostlayers.errors import GhostlayersError
from ghostlayers.maps import Matrix, Operator
from ghostlayers.operators import Moments
from ghostlayers.options import RIDGE_GRID, FitOptions, Ridge, parse_ridge
from ghostlayers.recovery import fit
from ghostlayers.recovery.ghost import choose_eps, fit_ghost, gcv_scores, solve_ghost
from ghostlayers.recovery.procrustes import fit_procrustes
from ghostlayers.pipeline import Selection, apply, calibrate, fit_sequential, recover
from ghostlayers.plan import Plan, make_plan
from ghostlayers.select import ghost_residual, greedy_ghost
from ghostlayers.surgery import ghost_modules
from ghostlayers.options import QUIET, RunOptions

C = 16


def hidden(model, windows):
    with torch.no_grad():
        return [h.reshape(-1, h.shape[-1]) for h in model(windows, output_hidden_states=True).hidden_states]


def pair_stats(model, windows, i, j, **kw):
    return capture(model, windows, CaptureSpec(frozenset({i}), frozenset({(i, j)})), progress=False, **kw)


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", layers=6)
    windows = random_windows(6, 20)
    return model, windows, pair_stats(model, windows, 1, 4), hidden(model, windows)


def test_parse_ridge():
    assert parse_ridge("1e-6") == Ridge("absolute", 1e-6)
    assert parse_ridge("rel:1e-3") == Ridge("relative", 1e-3)
    assert parse_ridge("gcv").mode == "gcv" and parse_ridge("cv").mode == "cv"
    for bad in ("abc", "rel:x", "-1"):
        with pytest.raises(GhostlayersError, match="--eps"):
            parse_ridge(bad)


def test_default_options_are_the_papers_fit(setup):
    _, _, stats, _ = setup
    fitted = solve_ghost(Moments.of(stats, 1, 4))
    torch.testing.assert_close(torch.eye(C, dtype=torch.float64) + fitted.m, fit_ghost(stats.gram[1], stats.cross[(1, 4)]))
    assert fitted.factors is None and fitted.bias is None and fitted.eps == 1e-6


def test_relative_ridge_scales_with_the_trace(setup):
    _, _, stats, _ = setup
    mo = Moments.of(stats, 1, 4)
    eps = choose_eps(mo, FitOptions(Ridge("relative", 1e-2)))
    assert eps == pytest.approx(1e-2 * float(torch.trace(stats.gram[1])) / C)


def test_affine_ghost_equals_least_squares_with_a_ones_column(setup):
    _, _, stats, hs = setup
    x, y = hs[1], hs[4]
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    ref = torch.linalg.lstsq(xa, y - x).solution  # (C + 1, C): M* and b
    fitted = solve_ghost(Moments.of(stats, 1, 4), FitOptions(Ridge("absolute", 0.0), affine=True))
    torch.testing.assert_close(fitted.m, ref[:C], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(fitted.bias, ref[C], rtol=1e-6, atol=1e-8)
    explicit = float((x @ (torch.eye(C, dtype=x.dtype) + fitted.m) + fitted.bias - y).square().sum())
    assert Moments.of(stats, 1, 4).error(fitted.m, fitted.bias) == pytest.approx(explicit, rel=1e-8)


def test_low_rank_ghost_is_the_best_rank_r_fit(setup):
    _, _, stats, hs = setup
    x = hs[1]
    mo = Moments.of(stats, 1, 4)
    full = solve_ghost(mo)
    errors = []
    for r in (1, 4, 8, C):
        fitted = solve_ghost(mo, FitOptions(rank=r))
        if r < C:
            down, up = fitted.factors
            assert down.shape == (C, r) and up.shape == (r, C)
            torch.testing.assert_close(down @ up, fitted.m)
        # reduced-rank regression: X M_r is the rank-r truncation of the full fit's X M*
        u, s, vh = torch.linalg.svd(x @ full.m, full_matrices=False)
        torch.testing.assert_close(x @ fitted.m, (u[:, :r] * s[:r]) @ vh[:r], rtol=1e-6, atol=1e-7)
        errors.append(mo.error(fitted.m))
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] == pytest.approx(mo.error(full.m))
    with pytest.raises(GhostlayersError, match="--rank"):
        solve_ghost(mo, FitOptions(rank=0))


def test_gcv_matches_the_hat_matrix_formula(setup):
    _, _, stats, hs = setup
    x, d = hs[1], hs[4] - hs[1]
    mo = Moments.of(stats, 1, 4)
    grid = [1e-3, 1e-1, 10.0]
    for eps, score in zip(grid, gcv_scores(mo, grid)):
        hat = x @ torch.linalg.solve(x.T @ x + eps * torch.eye(C, dtype=x.dtype), x.T)
        n = len(x)
        explicit = float(((torch.eye(n, dtype=x.dtype) - hat) @ d).square().sum()) / (1 - float(torch.trace(hat)) / n) ** 2
        assert score == pytest.approx(explicit, rel=1e-6)
    assert choose_eps(mo, FitOptions(Ridge("gcv", 0))) in [float(torch.trace(stats.gram[1])) / C * r for r in RIDGE_GRID]


def test_gcv_with_an_intercept_counts_its_degree_of_freedom(setup):
    """Affine GCV: the hat matrix of [X 1] with the ridge on X only (the intercept unpenalised) has trace
    df(ε) + 1; the score from the centred sums equals the explicit one (issue 13, defect 6)."""
    _, _, stats, hs = setup
    x, d = hs[1], hs[4] - hs[1]
    n = len(x)
    a = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    grid = [1e-3, 1e-1, 10.0]
    mo = Moments.of(stats, 1, 4).centred()
    for eps, score in zip(grid, gcv_scores(mo, grid, intercept=True)):
        penalty = torch.diag(torch.cat([torch.full((C,), eps, dtype=x.dtype), torch.zeros(1, dtype=x.dtype)]))
        hat = a @ torch.linalg.solve(a.T @ a + penalty, a.T)
        explicit = float(((torch.eye(n, dtype=x.dtype) - hat) @ d).square().sum()) / (1 - float(torch.trace(hat)) / n) ** 2
        assert score == pytest.approx(explicit, rel=1e-6)


def test_scored_selection_keeps_fold_sums_for_the_chosen_block_only(setup):
    """With folds, a scored criterion selects from the candidates' plain sums, then one more pass keeps the chosen
    block's sums per fold: the same selection and fit sums as a manual run of that block, and no candidate folds.
    --select ghost scoring with a cross-validated fit keeps every candidate's folds (it needs them)."""
    model, windows, _, _ = setup
    run = RunOptions(progress=False, folds=3)
    plain, plain_plan = calibrate(model, windows, Selection("streamline", 2), ("ghost",), RunOptions(progress=False))
    stats, plan = calibrate(model, windows, Selection("streamline", 2), ("ghost",), run)
    assert plan.removed == plain_plan.removed and len(stats.folds) == 3
    (i, j), = [p for b in plan.blocks() for p in plan.fit_pairs(b)]
    manual, _ = calibrate(model, windows, Selection("manual", 2, list(plan.removed)), ("ghost",), run)
    for mine, theirs in zip([stats, *stats.folds], [manual, *manual.folds]):
        torch.testing.assert_close(mine.gram[i], theirs.gram[i], rtol=0, atol=0)
        torch.testing.assert_close(mine.cross[(i, j)], theirs.cross[(i, j)], rtol=0, atol=0)
    assert all(set(f.cross) == {(i, j)} for f in stats.folds) and len(stats.cross) > 1  # candidates: totals only
    torch.testing.assert_close(stats.cross[(0, 2)], plain.cross[(0, 2)])
    cv = Selection("ghost", 2, ghost=FitOptions(Ridge("cv", 0)))
    stats, _ = calibrate(model, windows, cv, ("ghost",), run)
    assert all(len(f.cross) == len(stats.cross) > 1 for f in stats.folds)


def test_cross_validated_eps_minimises_the_explicit_held_out_error(setup):
    model, windows, _, _ = setup
    stats, _ = calibrate(model, windows, Selection("manual", 3, [1, 2, 3]), run=RunOptions(progress=False, folds=3))
    assert len(stats.folds) == 3
    total = sum(stats.folds[1:], stats.folds[0])
    torch.testing.assert_close(total.gram[1], stats.gram[1])
    unit = float(torch.trace(stats.gram[1])) / C
    parts = [hidden(model, chunk) for chunk in windows.tensor_split(3)]

    def explicit(eps):
        err = 0.0
        for k in range(3):
            train = [p for i, p in enumerate(parts) if i != k]
            x = torch.cat([p[1] for p in train])
            d = torch.cat([p[4] - p[1] for p in train])
            m = torch.linalg.solve(x.T @ x + eps * torch.eye(C, dtype=x.dtype), x.T @ d)
            err += float((parts[k][1] @ m - (parts[k][4] - parts[k][1])).square().sum())
        return err

    best = min((unit * r for r in RIDGE_GRID), key=explicit)
    mo = Moments.of(stats, 1, 4)
    assert choose_eps(mo, FitOptions(Ridge("cv", 0)), [Moments.of(f, 1, 4) for f in stats.folds]) == pytest.approx(best)
    with pytest.raises(GhostlayersError, match="folds"):
        choose_eps(mo, FitOptions(Ridge("cv", 0)))


def test_procrustes_recovers_a_scaled_rotation():
    torch.manual_seed(0)
    x = torch.randn(200, C, dtype=torch.float64)
    q0, _ = torch.linalg.qr(torch.randn(C, C, dtype=torch.float64))
    y = 2.5 * x @ q0 + 1e-6 * torch.randn(200, C, dtype=torch.float64)
    s, q = fit_procrustes(x.T @ x, x.T @ y)
    assert s == pytest.approx(2.5, rel=1e-5)
    torch.testing.assert_close(q, q0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q @ q.T, torch.eye(C, dtype=torch.float64))


def test_procrustes_is_folded_and_beats_the_best_scale(setup):
    model, windows, stats, hs = setup
    plan = make_plan(6, [1, 2, 3])
    pruned, ops = recover(model, stats, plan, "procrustes")
    assert not ghost_modules(pruned) and ops[0].map.q is not None
    x, y = hs[1], hs[4]
    best_scale = float((x * y).sum() / x.square().sum())  # the best h ← αh; α = 1·I is a scaled rotation too
    assert ops[0].errors[0] < float((best_scale * x - y).norm() / (x - y).norm())
    # the fold matches the map s·Q applied by a module (up to RMSNorm's ε, which the scale fold moves)
    explicit = apply(model, plan.removed, [Operator("ghost", (1, 4), [(1, 4)], Matrix(ops[0].linear_map()), C)])
    with torch.no_grad():
        torch.testing.assert_close(pruned(windows).logits, explicit(windows).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("weighting", ["skip-first", "clip"])
def test_token_weights_in_the_fit_sums(setup, weighting):
    model, windows, _, hs = setup
    if weighting == "clip":  # a massive first token, as in real LLMs, so that clipping has something to clip
        model = tiny_model("llama", layers=6)
        with torch.no_grad():
            model.model.embed_tokens.weight[windows[:, 0].unique()] *= 30.0
        hs = hidden(model, windows)
    stats = pair_stats(model, windows, 1, 4, token_weights=weighting, batch_size=6)
    x, y = hs[1], hs[4]
    if weighting == "skip-first":
        w = torch.ones(len(x), dtype=x.dtype)
        w[:: windows.shape[1]] = 0.0
    else:  # each window's own median (the weights must not depend on how windows are batched)
        norm2 = x.square().sum(1).view(len(windows), -1)
        w = (16 * norm2.median(1, keepdim=True).values / norm2).clamp(max=1.0).flatten()
        assert (w < 1).any()  # something is clipped, or this would test nothing
    torch.testing.assert_close(stats.gram[1], (x * w[:, None]).T @ x)
    torch.testing.assert_close(stats.cross[(1, 4)], (x * w[:, None]).T @ y)
    torch.testing.assert_close(stats.sumsq[4], y.square().sum())  # the other sums are unweighted
    torch.testing.assert_close(stats.weighted_sumsq_y[(1, 4)], w @ y.square().sum(1))
    assert fit("ghost", stats, make_plan(6, [1, 2, 3]))[0].errors == []  # a weighted error would mislead
    # the affine fit is weighted least squares with a ones column: every sum it reads carries the same weights
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) * w.sqrt()[:, None]
    ref = torch.linalg.lstsq(xa, (y - x) * w.sqrt()[:, None]).solution
    fitted = solve_ghost(Moments.of(stats, 1, 4), FitOptions(Ridge("absolute", 0.0), affine=True))
    torch.testing.assert_close(fitted.m, ref[:C], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(fitted.bias, ref[C], rtol=1e-6, atol=1e-8)
    mo = Moments.of(stats, 1, 4)
    assert float(mo.dd) == pytest.approx(float(w @ (y - x).square().sum(1)), rel=1e-9)
    with pytest.raises(GhostlayersError, match="ghost and procrustes fits only"):
        fit("prunecomp", stats, make_plan(6, [1, 2, 3]))


def test_capture_pair_of_the_first_block_is_the_dense_capture(setup):
    model, windows, stats, _ = setup
    plan = make_plan(6, [1, 2, 3])
    pruned = apply(model, plan.removed, [])
    paired = collect(PairSource(model, pruned, (1, 4), plan.pruned_index(4)), windows,
                     CaptureSpec(frozenset({1}), frozenset({(1, 4)})), QUIET)
    torch.testing.assert_close(paired.gram[1], stats.gram[1])
    torch.testing.assert_close(paired.cross[(1, 4)], stats.cross[(1, 4)])


def test_sequential_fit_uses_what_the_pruned_model_delivers():
    model = tiny_model("qwen3", layers=8)
    windows = random_windows(8, 24)
    plan = make_plan(8, [1, 2, 5], "sequential")
    assert plan.blocks() == [(1, 3), (5, 6)] and not plan.per_layer
    pruned, ops = fit_sequential(model, windows, plan, "ghost", run=QUIET)
    # first block: the dense fit; second: least squares from the pruned model's own input at layer 6 (pruned 3)
    dense = pair_stats(model, windows, 1, 3)
    torch.testing.assert_close(ops[0].linear_map(), fit_ghost(dense.gram[1], dense.cross[(1, 3)]))
    first_only = apply(model, plan.removed, ops[:1])
    x = hidden(first_only, windows)[3]  # what pruned layer 3 (dense 6) receives, before its own operator
    y = hidden(model, windows)[6]
    ref = torch.linalg.solve(x.T @ x + 1e-6 * torch.eye(C, dtype=x.dtype), x.T @ y)
    torch.testing.assert_close(ops[1].linear_map(), ref, rtol=1e-6, atol=1e-8)
    assert sorted(ghost_modules(pruned)) == ["model.layers.1", "model.layers.3"]
    with pytest.raises(GhostlayersError, match="sequential"):
        fit_sequential(model, windows, plan, "replaceme", run=QUIET)
    # a folded method: the second block is fitted on the stream the first block's map really gives (the fold
    # keeps the stream in another frame, so the capture runs with the earlier operator as a module)
    _, folded = fit_sequential(model, windows, plan, "prunecomp", run=QUIET)
    as_module = apply(model, plan.removed, [Operator("ghost", (1, 3), [(1, 3)], Matrix(folded[0].linear_map()), C)])
    x = hidden(as_module, windows)[3]
    assert folded[1].scale == pytest.approx(float((y.abs().sum(0) / x.abs().sum(0)).mean()), rel=1e-9)


def test_ghost_selection_picks_the_block_with_the_smallest_explicit_residual():
    model = tiny_model("mistral", layers=6)
    windows = random_windows(6, 20)
    stats, _ = calibrate(model, windows, Selection("ghost", 2), run=QUIET)
    hs = hidden(model, windows)

    def explicit(s):
        x, y = hs[s], hs[s + 2]
        m = torch.linalg.solve(x.T @ x + 1e-6 * torch.eye(C, dtype=x.dtype), x.T @ (y - x))
        return float((x @ (torch.eye(C, dtype=x.dtype) + m) - y).norm() / y.norm())

    for s in range(4):  # (HF's last hidden state is after the final norm, so block [4, 6) is left out here)
        assert ghost_residual(stats, (s, s + 2)) == pytest.approx(explicit(s), rel=1e-6)
    selection = Selection("ghost", 2)
    stats, plan = calibrate(model, windows, selection, run=QUIET)
    best = min(range(5), key=lambda s: ghost_residual(stats, (s, s + 2)))
    assert plan.removed == (best, best + 1)
    assert selection.scores[str(best)] == min(selection.scores.values())


def test_greedy_ghost_selection():
    model = tiny_model("llama", layers=6)
    windows = random_windows(6, 20)
    picked = greedy_ghost(model, windows, 3, progress=False)
    assert len(set(picked)) == 3 and all(0 <= i < 6 for i in picked)
    dense = capture(model, windows, CaptureSpec(frozenset(range(6)), frozenset((k, k + 1) for k in range(6))),
                    progress=False)
    assert picked[0] == min(range(6), key=lambda k: ghost_residual(dense, (k, k + 1)))
    # past the first pick: the second is the best-repaired layer of the model pruned of the first, its ghost installed
    first = fit("ghost", dense, Plan(6, (picked[0],)))
    current = apply(model, [picked[0]], first)
    kept = [i for i in range(6) if i != picked[0]]
    again = capture(current, windows, CaptureSpec(frozenset(range(5)), frozenset((k, k + 1) for k in range(5))),
                    progress=False)
    assert picked[1] == kept[min(range(5), key=lambda k: ghost_residual(again, (k, k + 1)))]
    stats, plan = calibrate(model, windows, Selection("ghost-greedy", 3, fit="sequential"), run=QUIET)
    assert plan.removed == tuple(sorted(picked))


def test_ghost_selection_scores_with_the_fit_asked_for(setup):
    """--select ghost fits each candidate's ghost as --eps/--affine/--rank say, not always the paper's (issue 13,
    defect 5): its scores are the residuals of that fit, and differ from the paper's."""
    model, windows, _, _ = setup
    options = FitOptions(Ridge("relative", 1.0), affine=True, rank=4)
    sel = Selection("ghost", 2, ghost=options)
    stats, plan = calibrate(model, windows, sel, run=QUIET)
    paper = Selection("ghost", 2)
    calibrate(model, windows, paper, run=QUIET)
    for s in range(5):
        assert sel.scores[str(s)] == pytest.approx(ghost_residual(stats, (s, s + 2), options), rel=1e-12)
        assert sel.scores[str(s)] != pytest.approx(paper.scores[str(s)], rel=1e-3)
    best = min(sel.scores, key=sel.scores.get)
    assert plan.removed == (int(best), int(best) + 1)


def test_alignment_of_a_sequential_fit_is_scored_on_the_delivered_input():
    """compare's alignment error of a later block's operator uses what the pruned model delivers there (issue 13,
    defect 4): ‖X'W − Y‖ / ‖X' − Y‖ with X' the pruned model's input at the boundary, Y the dense h_e."""
    from ghostlayers.capture import _hidden_at
    from ghostlayers.alignment import alignment_errors, alignment_spec, delivered_alignment_errors

    model = tiny_model("llama", layers=6)
    windows = random_windows(6, 20)
    held_out = random_windows(4, 20, seed=9)
    _, plan = calibrate(model, windows, Selection("manual", 2, [1, 4], fit="sequential"), run=QUIET)
    pruned, operators = fit_sequential(model, windows, plan, "ghost")
    held = capture(model, held_out, alignment_spec(plan), progress=False)
    errors = delivered_alignment_errors(model, pruned, held_out, plan, operators)
    assert errors[0] == pytest.approx(alignment_errors(held, operators, plan.blocks())[0], rel=1e-9)
    ones = torch.ones_like(held_out)
    with torch.no_grad():
        delivered = _hidden_at(pruned, 3, held_out, ones).reshape(-1, C).double()  # pruned layer 3 = dense 5
        y = _hidden_at(model, 5, held_out, ones).reshape(-1, C).double()
    explicit = float((delivered @ operators[1].linear_map() - y).norm() / (delivered - y).norm())
    assert errors[1] == pytest.approx(explicit, rel=1e-9)
    assert errors[1] != pytest.approx(alignment_errors(held, operators, plan.blocks())[1], rel=1e-3)


def held_out_error(parts, fit) -> float:
    """Σ over folds k of ‖X_k M − Δ_k‖² for the block (1, 4), M = fit(X, Δ) on the activations of the other folds."""
    err = 0.0
    for k in range(len(parts)):
        x = torch.cat([p[1] for i, p in enumerate(parts) if i != k])
        d = torch.cat([p[4] - p[1] for i, p in enumerate(parts) if i != k])
        err += float((parts[k][1] @ fit(x, d) - (parts[k][4] - parts[k][1])).square().sum())
    return err


def test_parse_shrink():
    from ghostlayers.options import Shrink, parse_shrink

    assert parse_shrink("diagonal") == Shrink("diagonal", None) == parse_shrink("diagonal:cv")
    assert parse_shrink("scalar:0.3") == Shrink("scalar", 0.3) and parse_shrink("none") is None
    for bad, message in (("cube", "unknown --shrink target"), ("diagonal:2", "between 0 and 1"),
                         ("scalar:x", "cannot read --shrink")):
        with pytest.raises(GhostlayersError, match=message):
            parse_shrink(bad)
    with pytest.raises(GhostlayersError, match="--shrink and --rank"):
        FitOptions(rank=2, shrink=Shrink())
    assert FitOptions(shrink=Shrink()).needs_folds and not FitOptions(shrink=Shrink("scalar", 0.5)).needs_folds


@pytest.mark.parametrize("target", ["diagonal", "scalar"])
def test_shrunk_ghost_is_its_defining_mixture_of_least_squares_fits(setup, target):
    """M = (1 − α) M* + α M_c, with M* the ridge least squares of Δ = Y − X on X and M_c the least-squares diagonal
    (each channel of Δ on the same channel of X) or scalar (all of Δ on all of X), from explicit activations."""
    from ghostlayers.options import Shrink

    _, _, stats, hs = setup
    x, d = hs[1], hs[4] - hs[1]
    eps = 1e-3
    full = torch.linalg.solve(x.T @ x + eps * torch.eye(C, dtype=x.dtype), x.T @ d)
    if target == "diagonal":
        mc = torch.diag(torch.stack([(x[:, k] @ d[:, k]) / (x[:, k] @ x[:, k] + eps) for k in range(C)]))
    else:
        mc = torch.linalg.lstsq(x.reshape(-1, 1), d.reshape(-1, 1)).solution * torch.eye(C, dtype=x.dtype)
        eps = 0.0  # the scalar's ridge is C·ε on tr G: compare the plain least squares
        full = torch.linalg.solve(x.T @ x, x.T @ d)
    mo = Moments.of(stats, 1, 4)
    for alpha in (0.0, 0.25, 1.0):
        got = solve_ghost(mo, FitOptions(Ridge("absolute", eps), shrink=Shrink(target, alpha)))
        torch.testing.assert_close(got.m, (1 - alpha) * full + alpha * mc, rtol=1e-7, atol=1e-9)
        assert got.alpha == alpha


def test_cross_validated_shrinkage_minimises_the_explicit_held_out_error(setup):
    from ghostlayers.options import SHRINK_GRID, Shrink

    model, windows, _, _ = setup
    stats, _ = calibrate(model, windows, Selection("manual", 3, [1, 2, 3]), run=RunOptions(progress=False, folds=3))
    parts = [hidden(model, chunk) for chunk in windows.tensor_split(3)]
    eps = 1e-2

    def explicit(alpha):
        def fit(x, d):
            full = torch.linalg.solve(x.T @ x + eps * torch.eye(C, dtype=x.dtype), x.T @ d)
            return (1 - alpha) * full + alpha * torch.diag((x * d).sum(0) / (x.square().sum(0) + eps))

        return held_out_error(parts, fit)

    best = min(SHRINK_GRID, key=explicit)
    mo, folds = Moments.of(stats, 1, 4), [Moments.of(f, 1, 4) for f in stats.folds]
    got = solve_ghost(mo, FitOptions(Ridge("absolute", eps), shrink=Shrink("diagonal")), folds)
    assert got.alpha == best
    with pytest.raises(GhostlayersError, match="folds"):
        solve_ghost(mo, FitOptions(Ridge("absolute", eps), shrink=Shrink("diagonal")))


def test_folds_by_source_leave_one_source_out(tmp_path, tokenizer):
    """--calib a,b --folds source: fold k holds exactly source k's windows, so --eps cv picks the ε whose fit on
    one source best predicts the other (explicit leave-one-source-out on the activations)."""
    from conftest import PROSE
    from ghostlayers.data import calibration_windows
    from ghostlayers.capture import fold_windows

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(PROSE * 20)
    b.write_text("Entirely different words about ships, harbours and the weather at sea. " * 120)
    windows = calibration_windows(tokenizer, f"{a},{b}", 6, 16, seed=0)
    run = RunOptions(progress=False, folds=2, stride=True)
    alone = [calibration_windows(tokenizer, str(p), 3, 16, seed=0) for p in (a, b)]
    assert all(torch.equal(part, want) for part, want in zip(fold_windows(windows, run.folds, run.stride), alone))
    model = tiny_model("llama", layers=6)
    stats, _ = calibrate(model, windows, Selection("manual", 3, [1, 2, 3]), run=run)
    parts = [hidden(model, w) for w in alone]
    unit = float(torch.trace(stats.gram[1])) / C

    def explicit(eps):
        err = 0.0
        for k in range(2):
            x, d = parts[1 - k][1], parts[1 - k][4] - parts[1 - k][1]
            m = torch.linalg.solve(x.T @ x + eps * torch.eye(C, dtype=x.dtype), x.T @ d)
            err += float((parts[k][1] @ m - (parts[k][4] - parts[k][1])).square().sum())
        return err

    best = min((unit * r for r in RIDGE_GRID), key=explicit)
    got = choose_eps(Moments.of(stats, 1, 4), FitOptions(Ridge("cv", 0)), [Moments.of(f, 1, 4) for f in stats.folds])
    assert got == pytest.approx(best)


def test_cross_validated_rank_minimises_the_explicit_held_out_error(setup):
    from ghostlayers.recovery.ghost import choose_rank

    model, windows, _, _ = setup
    stats, _ = calibrate(model, windows, Selection("manual", 3, [1, 2, 3]), run=RunOptions(progress=False, folds=3))
    parts = [hidden(model, chunk) for chunk in windows.tensor_split(3)]
    eps = 1e-3

    def explicit(rank):
        def fit(x, d):
            m = torch.linalg.solve(x.T @ x + eps * torch.eye(C, dtype=x.dtype), x.T @ d)
            if rank < C:  # reduced-rank regression: the top right singular directions of the fitted X M
                v = torch.linalg.svd(x @ m, full_matrices=False).Vh[:rank].T
                m = m @ v @ v.T
            return m

        return held_out_error(parts, fit)

    scores = {r: explicit(r) for r in (8, C)}
    mo, folds = Moments.of(stats, 1, 4), [Moments.of(f, 1, 4) for f in stats.folds]
    options = FitOptions(Ridge("absolute", eps))
    assert choose_rank(mo, options, eps, folds) == min(scores, key=scores.get)
    fitted = solve_ghost(mo, FitOptions(Ridge("absolute", eps), rank="cv"), folds)
    assert (fitted.factors is None) == (min(scores, key=scores.get) == C)
    with pytest.raises(GhostlayersError, match="--rank must be a number"):
        FitOptions(rank=0)
    with pytest.raises(GhostlayersError, match="folds"):
        solve_ghost(mo, FitOptions(rank="cv"))
