"""Issue 13: the one library call, `ghostlayers.prune(model, windows, PruneSpec(...)) -> Result`, in memory and
layer by layer; the spec refuses what cannot work when it is made."""

import pytest
import torch

import ghostlayers
from conftest import byte_tokenizer, random_windows, tiny_model
from ghostlayers.errors import GhostlayersError
from ghostlayers.offload import Offloaded
from ghostlayers.options import DEFAULT_SHRINK, FitOptions, RefitOptions, Ridge, RunOptions
from ghostlayers.pipeline import calibrate, fit_plan, refit_plan
from ghostlayers.select import Selection


def test_prune_is_calibrate_then_fit_then_refit_and_saves_what_it_computed(tmp_path):
    model = tiny_model("qwen2", layers=6, dtype=torch.float32)
    windows = random_windows(8, 24)
    spec = ghostlayers.PruneSpec(Selection("manual", 2, [1, 2]), "ghost", progress=False)
    result = ghostlayers.prune(model, windows, spec, base_model="tiny", calibration={"source": "random"})
    # the default fit: M* shrunk toward the diagonal, α cross-validated over 4 folds of the windows
    assert spec.fit == FitOptions(shrink=DEFAULT_SHRINK) and result.manifest["recovery"]["shrink"] == "diagonal:cv"
    folded = RunOptions(progress=False, folds=4)
    stats, plan = calibrate(model, windows, Selection("manual", 2, [1, 2]), run=folded)
    assert result.plan == plan
    reference, ops, refits = refit_plan(model, windows, stats, plan, "ghost", RefitOptions(2), spec.fit, folded)
    ids = random_windows(2, 16, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(result.model(ids).logits, reference(ids).logits)
    assert len(result.refits) == len(refits) == 4 and result.manifest["recovery"]["refit"]["layers"] == 2
    assert result.manifest["calibration"] == {"source": "random", "tokens": stats.tokens, "ranks": 1}
    out = result.save(tmp_path / "out", byte_tokenizer())
    loaded, _, manifest = ghostlayers.load(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, result.model(ids).logits)
    assert manifest["removed_layers"] == list(plan.removed)
    # refit=None is the fit alone
    plain = ghostlayers.prune(model, windows, ghostlayers.PruneSpec(Selection("manual", 2, [1, 2]), refit=None,
                                                                    progress=False))
    alone, _ = fit_plan(model, windows, stats, plan, "ghost", spec.fit, folded)
    with torch.no_grad():
        torch.testing.assert_close(plain.model(ids).logits, alone(ids).logits)


def test_prune_layer_by_layer_gives_the_in_memory_operators_and_refits_and_writes_them(tmp_path):
    model = tiny_model("llama", layers=6, dtype=torch.float32)
    model.save_pretrained(tmp_path / "dense")
    windows = random_windows(6, 20)
    spec = ghostlayers.PruneSpec(Selection("manual", 2, [1, 2]), "ghost", progress=False)  # the default repair
    offloaded = ghostlayers.prune(Offloaded(tmp_path / "dense"), windows, spec)
    in_memory = ghostlayers.prune(model, windows, spec)
    assert offloaded.model is None and len(offloaded.refits) == len(in_memory.refits) == 4
    assert [r.as_dict() for r in offloaded.refits] == [r.as_dict() for r in in_memory.refits]
    assert torch.equal(offloaded.operators[0].linear_map(), in_memory.operators[0].linear_map())
    assert offloaded.manifest["recovery"] == in_memory.manifest["recovery"]
    loaded, _, _ = ghostlayers.load(offloaded.save(tmp_path / "out", byte_tokenizer()))
    ids = random_windows(2, 16, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, in_memory.model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs,message", [
    (dict(recover="nope"), "unknown recovery"),
    (dict(recover="prunecomp", fit=FitOptions(affine=True)), "--affine, --rank and --shrink shape the ghost"),
    (dict(recover="linearpatch-d", token_weights="clip"), "changes the ghost and procrustes fits only"),
    (dict(folds=1), "--folds must be at least 2"),
    (dict(refit=RefitOptions(2), refit_auto=False, selection=Selection("shortgpt", 2, fit="layer")), "drop --fit layer"),
])
def test_the_spec_refuses_what_cannot_work_when_it_is_made(kwargs, message):
    kwargs.setdefault("selection", Selection("streamline", 2))
    with pytest.raises(GhostlayersError, match=message):
        ghostlayers.PruneSpec(**kwargs)


def test_the_spec_default_fit_is_each_methods_own():
    """PruneSpec(fit=None): the ghost shrunk toward the diagonal (α cross-validated), other methods their plain fit;
    an explicit FitOptions() is the paper's ghost."""
    select = Selection("ghost", 2)
    assert ghostlayers.PruneSpec(select).fit == FitOptions(shrink=DEFAULT_SHRINK)
    assert ghostlayers.PruneSpec(select, "replaceme").fit == FitOptions()
    assert ghostlayers.PruneSpec(select, fit=FitOptions()).fit.shrink is None
    from ghostlayers.select import candidate_fit

    scoring = candidate_fit(ghostlayers.PruneSpec(select).selection.options)
    assert scoring == FitOptions()  # candidates ranked by the unshrunk ghost
