"""Issue 13: one shape for every method. The registries drive the CLI, compare and export; a method or criterion
added in one place works everywhere; the typed maps compose as their matrices do; Plan owns the index arithmetic."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import random_windows, skipped_logits, tiny_model
from ghostlayers import maps, recovery, select
from ghostlayers.capture import CaptureSpec, capture
from ghostlayers.cli import build_parser, main
from ghostlayers.errors import GhostlayersError
from ghostlayers.outputs import FOLDING_METHODS
from ghostlayers.pipeline import Selection, apply, calibrate, recover
from ghostlayers.plan import make_plan
from ghostlayers.recovery.base import Fitted, Recovery, register
from ghostlayers.options import QUIET

C = 16


def _choices(parser, command, dest):
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return next(a for a in sub._actions if a.dest == dest)


def test_the_command_line_and_export_read_the_registries():
    parser = build_parser()
    action = _choices(parser, "prune", "recover")
    assert list(action.choices) == list(recovery.REGISTRY)
    for name, how in recovery.REGISTRY.items():
        assert f"{name}: {how.help}" in action.help
    assert _choices(parser, "compare", "recover").default == ",".join(recovery.REGISTRY)
    assert list(_choices(parser, "prune", "select").choices) == list(select.CRITERIA_REGISTRY)
    assert _choices(parser, "prune", "select").default == select.DEFAULT in select.CRITERIA_REGISTRY
    assert set(FOLDING_METHODS) == {n for n, r in recovery.REGISTRY.items() if r.placement != "module"}
    assert set(FOLDING_METHODS) == {"none", "prunecomp", "replaceme", "procrustes"}


def test_the_registries_import_without_torch():
    code = ("import sys\nimport ghostlayers.recovery, ghostlayers.select, ghostlayers.plan, ghostlayers.options\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stderr


def _random_map(kind: str, g: torch.Generator):
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    q, _ = torch.linalg.qr(rnd(C, C))
    return {
        "matrix": lambda: maps.Matrix(torch.eye(C, dtype=torch.float64) + 0.1 * rnd(C, C), 0.1 * rnd(C)),
        "lowrank": lambda: maps.LowRank(0.3 * rnd(C, 3), 0.3 * rnd(3, C), 0.1 * rnd(C)),
        "diagonal": lambda: maps.Diagonal(1 + 0.1 * rnd(C)),
        "scale": lambda: maps.Scale(float(1 + 0.1 * rnd(1))),
        "rotation": lambda: maps.ScaledRotation(float(1 + 0.1 * rnd(1)), q),
    }[kind]()


def _affine(m, h):
    out = h @ m.matrix(C)
    return out if m.bias is None else out + m.bias


KINDS = ["matrix", "lowrank", "diagonal", "scale", "rotation"]


@pytest.mark.parametrize("first", KINDS)
@pytest.mark.parametrize("second", KINDS)
def test_compose_applies_the_maps_in_order_and_keeps_closed_kinds(first, second):
    g = torch.Generator().manual_seed(KINDS.index(first) * 5 + KINDS.index(second))
    a, b = _random_map(first, g), _random_map(second, g)
    h = torch.randn(7, C, generator=g, dtype=torch.float64)
    both = maps.compose([a, b], C)
    torch.testing.assert_close(_affine(both, h), _affine(b, _affine(a, h)))
    closed = {"diagonal": maps.Diagonal, "scale": maps.Scale, "rotation": maps.ScaledRotation}
    expected = closed[first] if first == second and first in closed else maps.Matrix
    assert type(both) is expected
    assert both.in_weights == (expected in (maps.Scale, maps.ScaledRotation))


def test_every_map_places_itself_where_surgery_applies_it():
    g = torch.Generator().manual_seed(0)
    edits = maps.Edits()
    for kind, block in zip(KINDS, [(1, 2), (2, 3), (3, 4), (4, 5), (5, 6)]):
        _random_map(kind, g).place(edits, block)
    maps.MlpTransform(torch.eye(C, dtype=torch.float64)).place(edits, (3, 4))
    assert sorted(edits.operators) == [2, 3, 4] and edits.operators[3].keys() == {"down", "up", "bias"}
    assert sorted(edits.scales) == [5, 6] and sorted(edits.rotations) == [6] and sorted(edits.transforms) == [2]


def test_plan_owns_the_index_arithmetic():
    plan = make_plan(8, [6, 1, 2], "layer")
    assert plan.removed == (1, 2, 6) and plan.kept == [0, 3, 4, 5, 7] and plan.blocks() == [(1, 3), (6, 7)]
    assert [plan.pruned_index(d) for d in (0, 3, 7, 8)] == [0, 1, 4, 5]
    with pytest.raises(GhostlayersError, match="removed"):
        plan.pruned_index(2)
    assert plan.fit_pairs((1, 3)) == [(1, 2), (2, 3)] and plan.fit == "layer"
    model = tiny_model("gemma3_text", layers=8)
    config = plan.pruned_config(model.config)
    assert config.num_hidden_layers == 5
    assert config.layer_types == [model.config.layer_types[i] for i in plan.kept]
    assert model.config.num_hidden_layers == 8  # a copy


class HalfGhost(Recovery):
    """A method added in one place: half of the ghost's change, h ← h (I + M*/2), as a module."""

    name = "half-ghost"
    help = "half of the ghost's change"
    uses = frozenset({"eps"})

    def needs(self, pairs, blocks):
        return recovery.get("ghost").needs(pairs, blocks)

    def fit_pair(self, stats, pair, options, folds):
        full = recovery.get("ghost").fit_pair(stats, pair, options, folds)
        eye = torch.eye(C, dtype=torch.float64)
        return Fitted(maps.Matrix(eye + (full.map.matrix(C) - eye) / 2), full.eps)


@pytest.fixture
def half_ghost():
    register(HalfGhost)
    yield HalfGhost
    del recovery.REGISTRY[HalfGhost.name]


def test_a_method_registered_in_one_place_works_through_calibration_fit_apply_and_the_command_line(
        half_ghost, tmp_path, capsys):
    model = tiny_model("qwen3", layers=6)
    windows = random_windows(6, 24)
    stats, plan = calibrate(model, windows, Selection("streamline", 2), methods=("half-ghost",), run=QUIET)
    pruned, ops = recover(model, stats, plan, "half-ghost")
    ghost = recovery.fit("ghost", stats, plan)[0].linear_map()
    eye = torch.eye(C, dtype=torch.float64)
    torch.testing.assert_close(ops[0].linear_map(), eye + (ghost - eye) / 2)
    assert 0 < ops[0].errors[0] < 1  # half the ghost's change is better than nothing, worse than the ghost
    with torch.no_grad():
        ids = random_windows(2, 16, seed=3)
        torch.testing.assert_close(pruned(ids).logits, skipped_logits(model, ids, plan.removed, {ops[0].boundary: ops[0].linear_map()}))
    assert "half-ghost: half of the ghost's change" in _choices(build_parser(), "prune", "recover").help
    with pytest.raises(GhostlayersError, match="--affine, --rank and --shrink shape the ghost"):
        recovery.check_options(recovery.get("half-ghost"), recovery.FitOptions(affine=True))


class FirstCosine(select.Scored):
    """A criterion added in one place: the block whose input is least like the embedding (a toy)."""

    name = "test-first-cosine"
    help = "toy"

    def needs_for(self, pairs, options):
        return super().needs_for(pairs, options) | CaptureSpec(cosine=frozenset((0, s) for s, _ in pairs if s > 0))

    def score(self, stats, candidate, drop, options):
        return stats.mean_cos((0, candidate)) if candidate > 0 else 1.0


def test_a_criterion_registered_in_one_place_selects_the_argmin_of_its_own_scores():
    select.register(FirstCosine)
    try:
        model = tiny_model("llama", layers=6)
        windows = random_windows(6, 24)
        selection = Selection("test-first-cosine", 2)
        stats, plan = calibrate(model, windows, selection, run=QUIET)
        scores = {int(k): v for k, v in selection.scores.items()}
        best = min(scores, key=scores.get)
        assert list(plan.removed) == [best, best + 1] and len(scores) == 5
        ref = capture(model, windows, CaptureSpec(cosine=frozenset((0, s) for s in range(1, 5))), progress=False)
        for s in range(1, 5):
            assert scores[s] == pytest.approx(ref.mean_cos((0, s)), rel=1e-9)
    finally:
        del select.CRITERIA_REGISTRY[FirstCosine.name]


@pytest.mark.parametrize("criterion", ["streamline", "angular", "shortgpt", "ghost"])
def test_the_pick_is_the_best_scored_candidate(criterion):
    """calibrate picks from `candidate_scores` with `Criterion.pick`: a block starting at the best score, or the
    best-scored layers (the one selection path; issue 22 removed a second one, `select.select`)."""
    model = tiny_model("mistral", layers=6)
    windows = random_windows(6, 24)
    stats = capture(model, windows, select.selection_spec(criterion, 2, 6), progress=False)
    options = select.SelectOptions(True, False, None)
    rated = select.candidate_scores(criterion, stats, 2, options)
    crit = select.get(criterion)
    chosen = crit.pick(rated, 2)
    if crit.contiguous:
        pick = (max if crit.best == "max" else min)(rated, key=rated.get)
        assert chosen == [pick, pick + 1]
    else:
        ranked = sorted(rated, key=rated.get, reverse=crit.best == "max")
        assert chosen == sorted(ranked[:2])


def test_drop_and_layers_are_checked_against_the_folder_depth_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import json

    import ghostlayers.models as models

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 6}))

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", no_load)
    for extra, message in [(["--drop", "0"], "--drop must be between 1 and 5"), (["--drop", "6"], "between 1 and 5"),
                           (["--select", "manual", "--layers", "2,99"], "out of range: this model has layers 0-5")]:
        code = main(["prune", "--model", str(model_dir), "--quiet", "--out", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()


def test_a_folded_map_as_a_module_applies_the_same_map():
    model = tiny_model("llama", layers=6)
    windows = random_windows(6, 24)
    stats, plan = calibrate(model, windows, Selection("manual", 2, [1, 2]), methods=("procrustes",), run=QUIET)
    folded = recover(model, stats, plan, "procrustes")[1][0]
    module = folded.map.as_module(C)
    assert isinstance(module, maps.Matrix) and module.parts() is not None and folded.map.parts() is None
    torch.testing.assert_close(module.matrix(C), folded.linear_map())
    ids = random_windows(2, 16, seed=5)
    installed = apply(model, plan.removed, [maps.Operator("procrustes", (1, 3), [(1, 3)], module, C)])
    with torch.no_grad():
        torch.testing.assert_close(installed(ids).logits,
                                   skipped_logits(model, ids, plan.removed, {3: folded.linear_map()}))


def test_a_new_file_in_the_recovery_package_is_a_new_method(tmp_path):
    """The one-file change: a copy of the package with one more file in recovery/ offers that method everywhere."""
    import shutil

    import ghostlayers

    package = tmp_path / "ghostlayers"
    shutil.copytree(Path(ghostlayers.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "recovery" / "scaled_identity.py").write_text(
        '"""A toy method: h ← 0.5 h."""\n'
        "from .base import Fitted, Recovery, register\n\n\n"
        "@register\nclass Half(Recovery):\n"
        '    name = "half"\n    help = "halve the residual stream, folded"\n    placement = "folded"\n\n'
        "    def fit_pair(self, stats, pair, options, folds):\n"
        "        from ..maps import Scale\n\n        return Fitted(Scale(0.5))\n")
    code = ("from ghostlayers import recovery\nfrom ghostlayers.cli import build_parser\n"
            "from ghostlayers.outputs import FOLDING_METHODS\n"
            "sub = next(a for a in build_parser()._actions if a.dest == 'command').choices['prune']\n"
            "print(recovery.RECOVERY[-1], 'half' in next(a for a in sub._actions if a.dest == 'recover').choices,"
            " 'half' in FOLDING_METHODS)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)}, cwd=tmp_path)
    assert out.stdout.split() == ["half", "True", "True"], out.stderr
