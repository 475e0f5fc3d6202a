"""--refit: closed-form refits of the kept layers' write projections (issue 12), on tiny random models."""

import json

import pytest
import torch

from conftest import FAMILIES, random_windows, saved_tiny_llama, tiny_model
from ghostlayers.cli import main
from ghostlayers.errors import GhostlayersError
from ghostlayers.models import adapter
from ghostlayers.recovery.ghost import fit_ghost
from ghostlayers.pipeline import Selection, apply, calibrate, fit_plan, refit_plan
from ghostlayers.options import RefitOptions, parse_refit
from ghostlayers.refit import Sums, choose_rho, solve_refit
from ghostlayers.recovery import get as recovery_get
from ghostlayers.options import QUIET, RunOptions

ADDITIVE = [f for f in FAMILIES if f != "gemma3_text"]  # writes added to the stream as they are


def prepared(family="llama", layers=(2, 3), method="none", n_layers=6, windows=12, fit="auto"):
    model = tiny_model(family, layers=n_layers)
    calib = random_windows(windows, 24)
    stats, plan = calibrate(model, calib, Selection("manual", len(layers), list(layers), fit=fit),
                            methods=(method,) if method != "none" else (), run=QUIET)
    return model, calib, stats, plan


def states(model, index, windows, removed=()):
    """Explicit per-token activations of (pruned) layer `index`: z into o_proj, its output a, the mid-state, u into
    down_proj, the layer output (N, ·) each."""
    ad = adapter(model)
    got = {}
    hooks = [
        ad.o_proj(index).register_forward_hook(lambda m, a, o: got.update(z=a[0], a=o)),
        ad.mid_norm(index).register_forward_pre_hook(lambda m, a: got.update(mid=a[0])),
        ad.down_proj(index).register_forward_hook(lambda m, a, o: got.update(u=a[0])),
        ad.layers[index].register_forward_hook(lambda m, a, o: got.update(out=o[0] if isinstance(o, tuple) else o)),
    ]
    try:
        with torch.no_grad():
            model(windows)
    finally:
        for h in hooks:
            h.remove()
    return {k: v.reshape(-1, v.shape[-1]).double() for k, v in got.items()}


@pytest.mark.parametrize("family", ADDITIVE)
def test_refit_is_the_least_squares_optimum_of_explicit_activations(family):
    """With ρ = 0, the refitted o_proj solves min ‖Z Wᵀ − (m* − h)‖ and then down_proj min ‖U Wᵀ − (out* − m)‖,
    on the pruned model's own activations, as torch.linalg.lstsq finds them."""
    model, calib, stats, plan = prepared(family)
    refitted, _, refits = refit_plan(model, calib, stats, plan, "none", RefitOptions(1, 0.0, token_weights="uniform"),
                                     run=QUIET)
    assert [(r.layer, r.pruned, r.matrix) for r in refits] == [(4, 2, "o_proj"), (4, 2, "down_proj")]
    before = apply(model, plan.removed, [])
    dense = states(model, 4, calib)
    pruned = states(before, 2, calib)
    target = dense["mid"] - (pruned["mid"] - pruned["a"])
    w_o = torch.linalg.lstsq(pruned["z"], target).solution
    got_o = adapter(refitted).o_proj(2).weight.double().T
    torch.testing.assert_close(got_o, w_o, rtol=1e-6, atol=1e-8)
    adapter(before).o_proj(2).weight = adapter(refitted).o_proj(2).weight  # the down_proj fit sees the new o_proj
    pruned = states(before, 2, calib)
    w_d = torch.linalg.lstsq(pruned["u"], dense["out"] - pruned["mid"]).solution
    torch.testing.assert_close(adapter(refitted).down_proj(2).weight.double().T, w_d, rtol=1e-6, atol=1e-8)
    # and the refitted layer's states are those optima: its mid-state error is the least-squares residual
    after = states(refitted, 2, calib)
    best = (pruned["z"] @ w_o - target).norm()
    assert float((after["mid"] - dense["mid"]).norm()) == pytest.approx(float(best), rel=1e-6)


SINK = 1000.0  # a massive first-token activation, as real models have (SmolLM2: ~160× a typical token's norm)
RECOVERIES = ["none", "prunecomp", "linearpatch-d", "linearpatch-r", "replaceme", "procrustes", "ghost"]


def sink_model(family: str):
    """A tiny model whose windows all start with token 257, whose embedding carries SINK in two channels: the
    residual stream of the first token stays hundreds of times larger than the rest through every layer."""
    model = tiny_model(family, layers=6, tied=False)
    with torch.no_grad():
        adapter(model).embed_tokens.weight[257, :2] = SINK
    return model


def sink_windows(n: int, seed: int = 0) -> torch.Tensor:
    ids = random_windows(n, 24, seed=seed)
    ids[:, 0] = 257
    return ids


def kl_to_dense(dense, pruned, ids) -> float:
    """Mean KL(dense ‖ pruned) of the next-token distributions over every position of `ids`."""
    with torch.no_grad():
        p, q = (m(ids).logits.double().log_softmax(-1) for m in (dense, pruned))
    return float((p.exp() * (p - q)).sum(-1).mean())


def layer_outputs(model, ids, layers) -> list[torch.Tensor]:
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    return [hidden[i + 1].double() for i in layers]


def test_clipped_refit_is_the_weighted_least_squares_of_explicit_activations():
    """The default refit counts token t w_t = min(1, (4 · median_window ‖h‖ / ‖h_t‖)²) times, h the stream its write
    is added to: with ρ = 0 it is lstsq of √w Z Wᵀ = √w (m* − h), on the pruned model's explicit activations."""
    model, calib = sink_model("llama"), sink_windows(12)
    stats, plan = calibrate(model, calib, Selection("manual", 2, [2, 3]), methods=(), run=QUIET)
    refitted, _, refits = refit_plan(model, calib, stats, plan, "none", RefitOptions(1, 0.0), run=QUIET)
    before = apply(model, plan.removed, [])
    dense, pruned = states(model, 4, calib), states(before, 2, calib)
    stream = pruned["mid"] - pruned["a"]  # the layer's input, to which o_proj's output is added
    norm2 = stream.square().sum(1).view(len(calib), -1)
    w = (16 * norm2.median(dim=1, keepdim=True).values / norm2).clamp(max=1.0).flatten()
    assert w[::24].max() < 1e-2 and (w.view(len(calib), -1)[:, 1:] == 1).float().mean() > 0.9  # the sink, clipped
    root = w.sqrt()[:, None]
    w_o = torch.linalg.lstsq(root * pruned["z"], root * (dense["mid"] - stream)).solution
    torch.testing.assert_close(adapter(refitted).o_proj(2).weight.double().T, w_o, rtol=1e-6, atol=1e-8)
    uniform = torch.linalg.lstsq(pruned["z"], dense["mid"] - stream).solution
    assert not torch.allclose(w_o, uniform, rtol=1e-3, atol=1e-3)  # the weights matter here


@pytest.mark.parametrize("method", RECOVERIES)
@pytest.mark.parametrize("family", FAMILIES)
def test_refit_never_makes_its_starting_point_worse(family, method):
    """Issue 27: on a model with an attention sink, the refit of the two kept layers after the block lowers their
    outputs' error against the dense layers' on the calibration windows, and the divergence from the dense model
    (KL of the next-token distributions) on the calibration windows and on windows never fitted on, whatever the
    recovery it starts from. Prune&Comp's α rescales the sink, whose error then dominated uniform sums: a refit
    counting every token once made the layer error worse (up to 26×) and the held-out KL worse in every family."""
    model = sink_model(family)
    try:
        recovery_get(method).check(adapter(model))
    except GhostlayersError:
        pytest.skip(f"{method} does not apply to {family}")
    calib, held = sink_windows(24), sink_windows(8, seed=5)
    stats, plan = calibrate(model, calib, Selection("manual", 2, [2, 3]),
                            methods=(method,) if method != "none" else (), run=QUIET)
    plain, _ = fit_plan(model, calib, stats, plan, method)
    refitted, _, refits = refit_plan(model, calib, stats, plan, method, RefitOptions(2, 0.1), run=QUIET)
    assert sorted({r.layer for r in refits}) == [4, 5]
    dense = layer_outputs(model, calib, [4, 5])  # the frame is the same for both pruned models (both fold alike)
    err = lambda m: sum(float((d - p).square().sum()) for d, p in zip(dense, layer_outputs(m, calib, [2, 3])))  # noqa: E731
    assert err(refitted) < err(plain)
    for ids in (calib, held):
        assert kl_to_dense(model, refitted, ids) < kl_to_dense(model, plain, ids)


def test_ridge_solve_is_the_augmented_least_squares():
    """(ZᵀZ + λI)⁻¹(ZᵀT + λW₀) is lstsq of [Z; √λ I] W = [T; √λ W₀], with λ = ρ tr(ZᵀZ)/d."""
    g = torch.Generator().manual_seed(0)
    z, t, w0 = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((200, 6), (200, 5), (6, 5)))
    sums = Sums(torch.zeros(6, 6, dtype=torch.float64), torch.zeros(6, 5, dtype=torch.float64),
                torch.zeros((), dtype=torch.float64))
    sums.add(z[:120], t[:120])
    sums.add(z[120:], t[120:])
    w, lam = solve_refit(sums, w0, 0.3)
    assert lam == pytest.approx(0.3 * float((z * z).sum()) / 6)
    eye = torch.eye(6, dtype=torch.float64)
    ref = torch.linalg.lstsq(torch.cat([z, lam**0.5 * eye]), torch.cat([t, lam**0.5 * w0])).solution
    torch.testing.assert_close(w, ref)
    assert sums.error(w) == pytest.approx(float((z @ w - t).square().sum()))
    far, _ = solve_refit(sums, w0, 1e12)
    torch.testing.assert_close(far, w0, rtol=1e-6, atol=1e-6)


def test_cross_validated_rho_minimises_the_explicit_held_out_error():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(90, 8, generator=g, dtype=torch.float64)
    t = z @ torch.randn(8, 4, generator=g, dtype=torch.float64) + 2.0 * torch.randn(90, 4, generator=g, dtype=torch.float64)
    w0 = torch.zeros(8, 4, dtype=torch.float64)
    parts = []
    for rows in torch.arange(90).tensor_split(3):
        s = Sums(torch.zeros(8, 8, dtype=torch.float64), torch.zeros(8, 4, dtype=torch.float64),
                 torch.zeros((), dtype=torch.float64))
        s.add(z[rows], t[rows])
        parts.append(s)
    grid = (1e-3, 1e-1, 1.0, 10.0)

    def explicit(rho):
        total = 0.0
        for rows in torch.arange(90).tensor_split(3):
            rest = torch.ones(90, dtype=torch.bool)
            rest[rows] = False
            lam = rho * float((z[rest] ** 2).sum()) / 8
            w = torch.linalg.solve(z[rest].T @ z[rest] + lam * torch.eye(8, dtype=torch.float64), z[rest].T @ t[rest])
            total += float((z[rows] @ w - t[rows]).square().sum())
        return total

    assert choose_rho(parts, w0, grid) == min(grid, key=explicit)


@pytest.mark.parametrize("family", FAMILIES)
def test_infinite_ridge_keeps_the_weights_and_a_finite_one_lowers_every_error(family):
    model, calib, stats, plan = prepared(family, method="ghost")
    plain, _ = fit_plan(model, calib, stats, plan, "ghost")
    kept, _, refits = refit_plan(model, calib, stats, plan, "ghost", RefitOptions(None, 1e12), run=QUIET)
    assert {r.matrix for r in refits} == {"o_proj", "down_proj"} and len(refits) == 4  # layers 4 and 5
    ids = random_windows(2, 20, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(kept(ids).logits, plain(ids).logits, rtol=1e-6, atol=1e-6)
    _, _, refits = refit_plan(model, calib, stats, plan, "ghost", RefitOptions(None, 0.1), run=QUIET)
    assert all(r.error_after < r.error_before for r in refits), [(r.error_before, r.error_after) for r in refits]
    for name, p in model.named_parameters():  # the dense model is never modified
        assert torch.equal(p, dict(tiny_model(family, layers=6).named_parameters())[name]), name


@pytest.mark.parametrize("family,method", [("llama", "procrustes"), ("qwen3", "prunecomp"), ("mistral", "replaceme"),
                                           ("gemma3_text", "prunecomp"), ("qwen2", "linearpatch-r")])
def test_scattered_refit_fits_later_operators_on_the_refitted_model_and_folds_exactly(family, method):
    """Blocks [1, 2) and [4, 5): the walk refits layers 2, 3 (3 is also the layer before the second block, where
    ReplaceMe's transform sits) before it reaches the second boundary; the result with every folded operator
    folded computes what the walk's model (operators as modules) computed."""
    from ghostlayers.refit import Boundaries, walk
    from ghostlayers.recovery import fit, needs
    from ghostlayers.plan import Plan

    model, calib, stats, plan = prepared(family, layers=(1, 4), method=method)
    assert plan.sequential and plan.blocks() == [(1, 2), (4, 5)]
    options = RefitOptions(None, 0.1)
    result, operators, refits = refit_plan(model, calib, stats, plan, method, options, run=QUIET)
    assert [op.block for op in operators] == [(1, 2), (4, 5)]
    assert sorted({r.layer for r in refits}) == [2, 3, 5]
    first = fit("replaceme", stats, plan) if method == "replaceme" else []
    walked = apply(model, plan.removed, first)
    boundaries = None if method == "replaceme" else Boundaries(
        lambda b: needs(method, [b], [b]), lambda b, s, f: fit(method, s, Plan(6, tuple(range(*b))), 1e-6, f))
    walk(model, walked, calib, plan.removed, options, boundaries, progress=False)
    ids = random_windows(3, 20, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(result(ids).logits, walked(ids).logits, rtol=1e-5, atol=1e-5)


def test_later_ghost_is_the_least_squares_map_of_what_the_refitted_layers_deliver():
    from ghostlayers.capture import _hidden_at

    model, calib, stats, plan = prepared("llama", layers=(1, 4), method="ghost")
    result, operators, _ = refit_plan(model, calib, stats, plan, "ghost", RefitOptions(None, 0.1), run=QUIET)
    with torch.no_grad():
        x = _hidden_at(result, 3, calib, torch.ones_like(calib)).reshape(-1, 16).double()  # pruned layer 3 = dense 5
        y = _hidden_at(model, 5, calib, torch.ones_like(calib)).reshape(-1, 16).double()
    expected = fit_ghost(x.T @ x, x.T @ y)
    torch.testing.assert_close(operators[1].linear_map(), expected, rtol=1e-6, atol=1e-8)


def test_refit_before_the_block_targets_the_block_end():
    model, calib, stats, plan = prepared("llama", layers=(2, 3), method="none")
    _, _, refits = refit_plan(model, calib, stats, plan, "none", RefitOptions(1, 0.1, before=True), run=QUIET)
    assert [(r.layer, r.matrix, r.target) for r in refits] == [
        (1, "down_proj", "block end"), (4, "o_proj", "dense layer"), (4, "down_proj", "dense layer")]


def test_refit_refuses_per_layer_and_block_fits_of_scattered_layers():
    model, calib, stats, plan = prepared("llama", layers=(1, 4), method="ghost", fit="layer")
    with pytest.raises(GhostlayersError, match="drop --fit layer"):
        refit_plan(model, calib, stats, plan, "ghost", RefitOptions(2))
    model, calib, stats, plan = prepared("llama", layers=(1, 4), method="ghost", fit="block")
    with pytest.raises(GhostlayersError, match="sequentially"):
        refit_plan(model, calib, stats, plan, "ghost", RefitOptions(2))


def test_parse_refit():
    assert parse_refit("none") is None and parse_refit(None) is None
    assert parse_refit("all") == RefitOptions(None, 0.1) and parse_refit("4", "cv", True) == RefitOptions(4, "cv", True)
    for bad, message in (("x", "cannot read --refit"), ("-1", "at least 1")):
        with pytest.raises(GhostlayersError, match=message):
            parse_refit(bad)
    with pytest.raises(GhostlayersError, match="--refit-ridge"):
        parse_refit("2", "strong")
    with pytest.raises(GhostlayersError, match="--refit-before refits with --refit"):
        parse_refit("none", before=True)


# ------------------------------------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_tiny_llama(tmp_path_factory)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("method", ["none", "procrustes"])
def test_prune_refit_vanilla_export_reloads_in_plain_transformers(capsys, tmp_path, model_dir, method):
    from transformers import AutoModelForCausalLM

    from ghostlayers.data import calibration_windows
    from ghostlayers.models import load_model

    out = tmp_path / "v"
    code, _, err = run(capsys, "prune", "--model", model_dir, "--select", "manual", "--layers", "1,3", "--recover",
                       method, "--refit", "all", "--refit-ridge", "cv", "--folds", 2, "--calib",
                       model_dir.parent / "prose.txt", "--calib-samples", 8, "--seq-len", 32, "--format", "vanilla",
                       "--out", out)
    assert code == 0, err
    assert "refitted 6 matrices" in err
    manifest = json.loads((out / "ghostlayers.json").read_text())
    refit = manifest["recovery"]["refit"]
    assert refit["layers"] == "all" and refit["ridge"] == "cv" and len(refit["matrices"]) == 6
    assert all(m["lam"] > 0 and m["error_after"] <= m["error_before"] for m in refit["matrices"])
    plain = AutoModelForCausalLM.from_pretrained(out)
    # the same pruned model, rebuilt in memory from the same inputs
    model, tok = load_model(str(model_dir))
    calib = calibration_windows(tok, str(model_dir.parent / "prose.txt"), 8, 32, 0)
    stats, plan = calibrate(model, calib, Selection("manual", 2, [1, 3]), methods=(method,), run=QUIET)
    expected, _, _ = refit_plan(model, calib, stats, plan, method, RefitOptions(None, "cv"), run=RunOptions(progress=False, folds=2))
    ids = random_windows(2, 20, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, expected(ids).logits, rtol=1e-5, atol=1e-5)
    code, stdout, _ = run(capsys, "info", out)
    assert code == 0 and "refit:       6 matrices (o_proj, down_proj) of dense layers 2,4-5" in stdout


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--refit", "two"], "cannot read --refit"),
        (["--refit", "2", "--refit-ridge", "-1"], "--refit-ridge must be zero or positive"),
        (["--refit", "none", "--refit-before"], "--refit-before refits with --refit"),
        (["--refit", "2", "--fit", "layer"], "drop --fit layer"),
    ],
)
def test_bad_refit_options_fail_in_one_line(capsys, tmp_path, model_dir, extra, message):
    code, _, err = run(capsys, "prune", "--model", model_dir, "--drop", 2, "--calib", model_dir.parent / "prose.txt",
                       "--calib-samples", 8, "--seq-len", 32, "--quiet", "--out", tmp_path / "out", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_compare_puts_refit_variants_side_by_side(capsys, tmp_path, model_dir):
    out = tmp_path / "cmp"
    args = ["compare", "--model", model_dir, "--drop", 2, "--select", "streamline", "--recover", "none,ghost",
            "--refit", "none,1,all", "--calib", model_dir.parent / "prose.txt", "--calib-samples", 8, "--seq-len", 32,
            "--text", model_dir.parent / "prose.txt", "--quiet", "--out", out]
    code, stdout, err = run(capsys, *args)
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    cells = {(r["recover"], r.get("refit")) for r in rows if r["recover"] != "dense"}
    assert cells == {(m, r) for m in ("none", "ghost") for r in (None, "1", "all")}
    assert "ghost + refit all" in stdout and "none + refit 1" in stdout
    refitted = [r for r in rows if r.get("refit")]
    assert all(r["refit_error"] and all(a <= b for b, a in r["refit_error"]) for r in refitted)
    code, _, err = run(capsys, *args)  # resumes: nothing left to do
    assert code == 0 and len((out / "results.jsonl").read_text().splitlines()) == len(rows)


@pytest.mark.parametrize(
    "extra,expected",
    [
        (["--drop", 2], 2),  # the default: 2 kept layers after the boundary
        (["--drop", 2, "--fit", "layer"], None),  # the paper's per-layer fit: no refit
        (["--select", "manual", "--layers", "1,3", "--fit", "block"], None),  # scattered, each block from the dense pass
        (["--select", "manual", "--layers", "1,3"], 2),  # scattered, fitted sequentially: refit
        (["--drop", 2, "--layer-by-layer"], 2),  # layer by layer too
        (["--drop", 2, "--refit", "none"], None),
    ],
)
def test_prune_refits_two_layers_by_default_where_the_fit_allows(capsys, tmp_path, model_dir, extra, expected):
    code, _, err = run(capsys, "prune", "--model", model_dir, "--calib", model_dir.parent / "prose.txt",
                       "--calib-samples", 8, "--seq-len", 32, "--quiet", "--out", tmp_path / "o", *extra)
    assert code == 0, err
    refit = json.loads((tmp_path / "o" / "ghostlayers.json").read_text())["recovery"]["refit"]
    assert (refit and refit["layers"]) == expected
