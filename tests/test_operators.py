"""The ghost fit: closed form equals least squares, errors from sums equal explicit ones, singularity is reported."""

import pytest
import torch

from conftest import random_windows, tiny_model
from ghostlayers.capture import CaptureSpec, capture
from ghostlayers.errors import GhostlayersError
from ghostlayers.operators import relative_error
from ghostlayers.recovery import fit, spec_for
from ghostlayers.recovery.ghost import fit_ghost
from ghostlayers.plan import make_plan


def activations(model, windows, i, j):
    with torch.no_grad():
        hs = model(windows, output_hidden_states=True).hidden_states
    flat = lambda h: h.reshape(-1, h.shape[-1])  # noqa: E731
    return flat(hs[i]), flat(hs[j])


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_ghost_equals_lstsq(family):
    model = tiny_model(family)
    windows = random_windows(4, 24)
    stats = capture(model, windows, CaptureSpec(frozenset({1}), frozenset({(1, 4)})), progress=False)
    x, y = activations(model, windows, 1, 4)
    m_ref = torch.linalg.lstsq(x, y - x).solution
    w = fit_ghost(stats.gram[1], stats.cross[(1, 4)], eps=0.0)
    torch.testing.assert_close(w, torch.eye(16, dtype=torch.float64) + m_ref, rtol=1e-7, atol=1e-9)


def test_ridge_matches_augmented_least_squares():
    """(XᵀX + εI)M = XᵀΔ is least squares on X stacked over √ε·I with zero targets."""
    model = tiny_model("llama")
    windows = random_windows(2, 12)  # 24 tokens, C = 16
    stats = capture(model, windows, CaptureSpec(frozenset({2}), frozenset({(2, 3)})), progress=False)
    x, y = activations(model, windows, 2, 3)
    eps = 0.5
    xa = torch.cat([x, eps**0.5 * torch.eye(16, dtype=x.dtype)])
    da = torch.cat([y - x, torch.zeros(16, 16, dtype=x.dtype)])
    m_ref = torch.linalg.lstsq(xa, da).solution
    torch.testing.assert_close(fit_ghost(stats.gram[2], stats.cross[(2, 3)], eps), torch.eye(16, dtype=x.dtype) + m_ref)


def test_relative_error_from_sums_equals_explicit():
    model = tiny_model("mistral")
    windows = random_windows(3, 20)
    stats = capture(model, windows, CaptureSpec(frozenset({1}), frozenset({(1, 5)})), progress=False)
    x, y = activations(model, windows, 1, 5)
    w = fit_ghost(stats.gram[1], stats.cross[(1, 5)])
    explicit = float((x @ w - y).norm() / (x - y).norm())
    assert relative_error(stats.gram[1], stats.cross[(1, 5)], stats.sumsq[5], w) == pytest.approx(explicit, rel=1e-6)
    identity = torch.eye(16, dtype=torch.float64)
    assert relative_error(stats.gram[1], stats.cross[(1, 5)], stats.sumsq[5], identity) == pytest.approx(1.0)
    assert explicit < 1.0


def test_singular_system_is_reported_not_nan():
    model = tiny_model("llama")
    windows = random_windows(1, 6)  # 6 tokens < 16 channels: XᵀX is singular
    stats = capture(model, windows, CaptureSpec(frozenset({1}), frozenset({(1, 2)})), progress=False)
    with pytest.raises(GhostlayersError, match="singular"):
        fit_ghost(stats.gram[1], stats.cross[(1, 2)], eps=0.0)


def test_per_layer_operators_chain_in_order():
    model = tiny_model("llama")
    assert make_plan(6, [1, 2, 4], fit="auto").sequential  # the default for scattered layers
    plan = make_plan(6, [1, 2, 4], fit="layer")
    assert plan.per_layer and plan.blocks() == [(1, 3), (4, 5)]
    stats = capture(model, random_windows(4, 20), spec_for(("ghost",), plan), progress=False)
    ops = fit("ghost", stats, plan)
    assert [op.boundary for op in ops] == [3, 5]
    assert ops[0].pairs == [(1, 2), (2, 3)]
    w1 = fit_ghost(stats.gram[1], stats.cross[(1, 2)])
    w2 = fit_ghost(stats.gram[2], stats.cross[(2, 3)])
    torch.testing.assert_close(ops[0].linear_map(), w1 @ w2)
    assert all(0 <= e < 1 for op in ops for e in op.errors)


def test_operator_shape_measures():
    from ghostlayers.operators import shape_of

    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, 32, generator=g, dtype=torch.float64)
    eye = torch.eye(32, dtype=torch.float64)
    assert shape_of(eye + (a + a.T))["antisymmetric_share"] == pytest.approx(0.0, abs=1e-12)
    assert shape_of(eye + (a - a.T))["antisymmetric_share"] == pytest.approx(1.0)
    assert 0.3 < shape_of(eye + a)["antisymmetric_share"] < 0.7  # a random matrix is about half and half
    rank_one = torch.outer(a[0], a[1])
    shape = shape_of(eye + rank_one, top=3)
    assert shape["effective_rank"] == pytest.approx(1.0)
    torch.testing.assert_close(torch.tensor(shape["singular_values"], dtype=torch.float64), torch.linalg.svdvals(rank_one)[:3])
    assert shape_of(eye)["distance_from_identity"] == 0.0
    assert shape_of(torch.full((8,), 1.5))["distance_from_identity"] == pytest.approx(0.5)
