"""The constrained baselines against their defining equations, folding that is exact, and the ghost's optimality."""

import pytest
import torch

from conftest import random_windows, skipped_logits, tiny_model
from ghostlayers.capture import CaptureSpec, capture
from ghostlayers.errors import GhostlayersError
from ghostlayers.hadamard import hadamard
from ghostlayers.models import num_parameters
from ghostlayers.recovery import fit, spec_for
from ghostlayers.alignment import alignment_errors, alignment_spec
from ghostlayers.pipeline import Selection, calibrate, recover
from ghostlayers.plan import make_plan
from ghostlayers.surgery import GhostOperator
from ghostlayers.options import QUIET

ALL = ("prunecomp", "linearpatch-d", "linearpatch-r", "replaceme", "ghost")


def inputs_and_mlp(model, windows, layer):
    """h_0..h_{L-1} and the MLP output of `layer`, explicitly."""
    got = {}
    handle = model.model.layers[layer].mlp.register_forward_hook(lambda m, a, out: got.setdefault("m", out))
    with torch.no_grad():
        hs = model(windows, output_hidden_states=True).hidden_states
    handle.remove()
    flat = lambda h: h.reshape(-1, h.shape[-1])  # noqa: E731
    return [flat(h) for h in hs[:-1]], flat(got["m"])


def stats_for(model, windows, plan, methods=ALL):
    rotation = hadamard(16)
    spec = spec_for(tuple(m for m in methods if m != "none"), plan) | alignment_spec(plan)
    return capture(model, windows, spec, progress=False, rotation=rotation)


def test_linearpatch_and_prunecomp_equations():
    model = tiny_model("llama")
    windows = random_windows(3, 20)
    plan = make_plan(6, [1, 2, 3])
    stats = stats_for(model, windows, plan)
    hs, _ = inputs_and_mlp(model, windows, 0)
    x, y = hs[1], hs[4]
    d = y.abs().mean(0) / x.abs().mean(0)
    torch.testing.assert_close(fit("linearpatch-d", stats, plan)[0].map.d, d)
    assert fit("prunecomp", stats, plan)[0].scale == pytest.approx(float(d.mean()))
    h = hadamard(16)
    d_r = (y @ h).abs().mean(0) / (x @ h).abs().mean(0)
    w = fit("linearpatch-r", stats, plan)[0].linear_map()
    torch.testing.assert_close(w, h @ torch.diag(d_r) @ h.T)
    torch.testing.assert_close(w, w.T)  # symmetric, as every LinearPatch operator is


def test_replaceme_equation():
    model = tiny_model("qwen2")
    windows = random_windows(4, 24)
    plan = make_plan(6, [2, 3])
    stats = stats_for(model, windows, plan, ("replaceme",))
    hs, m = inputs_and_mlp(model, windows, 1)
    x, y = hs[2], hs[4]
    t_ref = torch.linalg.lstsq(m, y - x + m).solution
    op = fit("replaceme", stats, plan, 0.0)[0]
    torch.testing.assert_close(op.transform, t_ref, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
@pytest.mark.parametrize("removed", [[2, 3], [1, 2, 4]])
def test_prunecomp_fold_equals_the_scaling_it_replaces(family, removed):
    """Folding 1/α into the writes after the boundary = multiplying the residual at the boundary by α."""
    model = tiny_model(family, tied=True)
    windows = random_windows(2, 16)
    plan = make_plan(6, removed)
    stats = stats_for(model, windows, plan, ("prunecomp",))
    folded, ops = recover(model, stats, plan, "prunecomp")
    scaling = {op.boundary: op.scale * torch.eye(16, dtype=torch.float64) for op in ops}
    with torch.no_grad():  # equal up to the RMSNorm ε, which is not scale-invariant (≈1e-5 relative here)
        torch.testing.assert_close(folded(windows).logits, skipped_logits(model, windows, removed, scaling), rtol=1e-4, atol=1e-4)
    assert all(op.scale != 1.0 for op in ops)
    assert folded.lm_head.weight is model.lm_head.weight  # the tied embedding is left alone


@pytest.mark.parametrize("removed", [[2, 3], [1, 2, 4]])
def test_replaceme_fold_equals_transformed_mlp(removed):
    model = tiny_model("mistral")
    windows = random_windows(2, 16)
    plan = make_plan(6, removed, fit="block")
    stats = stats_for(model, windows, plan, ("replaceme",))
    folded, ops = recover(model, stats, plan, "replaceme")
    handles = [
        model.model.layers[op.block[0] - 1].mlp.register_forward_hook(lambda m, a, out, t=op.transform: out @ t.to(out.dtype))
        for op in ops
    ]
    try:
        reference = skipped_logits(model, windows, removed, {})
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        torch.testing.assert_close(folded(windows).logits, reference)


@pytest.mark.parametrize("method", ["none", "prunecomp", "replaceme"])
def test_folded_methods_add_no_parameter_and_no_module(method):
    model = tiny_model("llama")
    plan = make_plan(6, [2, 3])
    stats = stats_for(model, random_windows(3, 20), plan)
    pruned_none, _ = recover(model, stats, plan, "none")
    pruned, _ = recover(model, stats, plan, method)
    assert num_parameters(pruned) == num_parameters(pruned_none)
    assert [n for n, _ in pruned.named_modules()] == [n for n, _ in pruned_none.named_modules()]
    assert not any(isinstance(m, GhostOperator) for m in pruned.modules())
    dense_before = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in model.state_dict().items():  # the dense model is never modified by folding
        assert torch.equal(v, dense_before[k])


@pytest.mark.parametrize("method", ["linearpatch-d", "linearpatch-r", "ghost"])
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_runtime_methods_contiguous_and_not(method, family):
    model = tiny_model(family)
    windows = random_windows(3, 20)
    for removed in ([2, 3], [1, 2, 4]):
        plan = make_plan(6, removed)
        pruned, ops = recover(model, stats_for(model, windows, plan), plan, method)
        maps = {op.boundary: op.linear_map() for op in ops}
        with torch.no_grad():
            torch.testing.assert_close(pruned(windows).logits, skipped_logits(model, windows, removed, maps))


def test_ghost_has_the_lowest_alignment_error_on_its_own_data():
    model = tiny_model("llama")
    windows = random_windows(6, 24)  # 144 tokens > C = 16
    for removed in ([2, 3, 4], [1, 3]):
        plan = make_plan(6, removed, fit="block")
        stats = stats_for(model, windows, plan)
        errors = {m: alignment_errors(stats, fit(m, stats, plan), plan.blocks()) for m in ("none", *ALL)}
        for m in ("prunecomp", "linearpatch-d", "linearpatch-r"):
            assert all(g <= o + 1e-9 for g, o in zip(errors["ghost"], errors[m])), (m, errors)
        assert all(e < 1 for e in errors["ghost"] + errors["replaceme"])
        # the error from the sums is the explicit ‖XW − Y‖ / ‖X − Y‖ of the activations (not true by definition,
        # as none's 1.0 is)
        with torch.no_grad():
            hs = [h.reshape(-1, h.shape[-1]) for h in model(windows, output_hidden_states=True).hidden_states]
        for (s, e), op, got in zip(plan.blocks(), fit("ghost", stats, plan), errors["ghost"]):
            x, y = hs[s], hs[e]
            explicit = float((x @ op.linear_map() - y).norm() / (x - y).norm())
            assert got == pytest.approx(explicit, rel=1e-6)


def test_replaceme_refusals():
    gemma = tiny_model("gemma3_text")
    with pytest.raises(GhostlayersError, match="normalises"):
        calibrate(gemma, random_windows(2, 8), Selection("last", 2), methods=("replaceme",), run=QUIET)
    model = tiny_model("llama")
    plan = make_plan(6, [0, 1])
    stats = capture(model, random_windows(3, 20), CaptureSpec(), progress=False)
    with pytest.raises(GhostlayersError, match="starts at layer 0"):
        fit("replaceme", stats, plan)


@pytest.mark.parametrize("n", [576, 640, 896, 2048, 3584, 4096, 5120])
def test_hadamard_sizes_of_real_models(n):
    h = hadamard(n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5))


def test_hadamard_size_without_construction():
    with pytest.raises(GhostlayersError, match="no Hadamard matrix construction for hidden size 92"):
        hadamard(92)


def test_one_pass_feeds_every_method():
    model = tiny_model("llama")
    stats, plan = calibrate(model, random_windows(3, 20), Selection("streamline", 2), methods=ALL, run=QUIET)
    for method in ALL:
        assert fit(method, stats, plan)  # no second pass needed, nothing missing


def test_shortgpt_needs_one_pass_except_for_replaceme(monkeypatch):
    import ghostlayers.pipeline as pipeline

    calls = []
    real = pipeline.collect
    monkeypatch.setattr(pipeline, "collect", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_model("llama")
    windows = random_windows(3, 20)
    stats, plan = calibrate(model, windows, Selection("shortgpt", 2, fit="layer"),
                            methods=("prunecomp", "linearpatch-d", "linearpatch-r", "ghost"), run=QUIET)
    assert len(calls) == 1 and plan.per_layer
    for method in ("prunecomp", "linearpatch-d", "linearpatch-r", "ghost"):
        assert fit(method, stats, plan)
    calls.clear()
    calibrate(model, windows, Selection("shortgpt", 2), methods=ALL, run=QUIET)
    assert len(calls) == 2  # ReplaceMe's MLP sums depend on where ShortGPT's runs end: a second pass


def test_compare_on_an_architecture_that_refuses_a_method(tmp_path):
    from ghostlayers.compare import Grid, run

    model = tiny_model("gemma3_text", dtype=torch.float32)
    windows = random_windows(6, 20)
    rows = run(model, windows, windows[:2], windows[:2], Grid([2], ["streamline"], ["none", "replaceme", "ghost"]),
               tmp_path, progress=False)
    by = {r["recover"]: r for r in rows}
    assert "normalises" in by["replaceme"]["error"]
    assert by["ghost"]["perplexity"] > 0 and by["none"]["perplexity"] > 0
