"""Issue 14: choosing layers by what the repaired model loses (`--select loss`, `loss-greedy`), each checked against
a brute force that prunes every candidate, fits it, and runs the whole model on the held-out windows."""

import json

import pytest
import torch

from conftest import PROSE, byte_tokenizer, random_windows, tiny_model
from ghostlayers.cli import main
from ghostlayers.data import calibration_windows
from ghostlayers.errors import GhostlayersError
from ghostlayers.evaluate import perplexity
from ghostlayers.loss import LossContext, greedy_loss, layer_states, resumed_loss
from ghostlayers.options import QUIET
from ghostlayers.pipeline import calibrate, recover, split_held_out
from ghostlayers.recovery.ghost import fit_ghost
from ghostlayers.select import Selection

C = 16


def full_loss(model, windows):
    return perplexity(model, windows, progress=False)["mean_nll"]


@pytest.mark.parametrize("family,method", [("qwen2", "ghost"), ("gemma3_text", "ghost"), ("llama", "replaceme"),
                                           ("mistral", "procrustes"), ("qwen3", "none")])
def test_loss_selection_is_the_argmin_of_the_brute_force_loss(family, method):
    """Every candidate's score is the full-forward held-out loss of the model pruned there with its recovery fitted
    on the fit windows alone; the chosen block is their argmin."""
    model = tiny_model(family, layers=6)
    windows = random_windows(11, 24)
    selection = Selection("loss", 2, select_windows=3)
    fit_windows, held = split_held_out(windows, selection)
    assert torch.equal(held, windows[-3:]) and len(fit_windows) == 8
    methods = () if method == "none" else (method,)
    stats, plan = calibrate(model, fit_windows, selection, methods, QUIET, held_out=held)
    assert stats.tokens == 8 * 24  # the held-out windows are never in the fit sums
    brute = {}
    for s in range(5):
        one, one_plan = calibrate(model, fit_windows, Selection("manual", 2, [s, s + 1]), methods, QUIET)
        try:
            pruned, _ = recover(model, one, one_plan, method)
        except GhostlayersError:  # replaceme cannot repair a block at layer 0
            brute[s] = float("inf")
            continue
        brute[s] = full_loss(pruned, held)
    scores = {int(k): v for k, v in selection.scores.items()}
    assert scores.keys() == brute.keys()
    for s in brute:
        assert scores[s] == pytest.approx(brute[s], rel=1e-9, abs=1e-12), s
    best = min(brute, key=brute.get)
    assert list(plan.removed) == [best, best + 1] and selection.score_with == (method if methods else "none")


def test_resumed_loss_is_the_full_forward_loss_from_any_start():
    model = tiny_model("gemma3_text", layers=6)
    held = random_windows(3, 20, seed=5)
    states = layer_states(model, held, batch_size=2)
    for start in range(7):
        assert resumed_loss(model, states, start) == pytest.approx(full_loss(model, held), rel=1e-6)  # CE in fp32


def _run(model, ids, removed, operators, capture_at=None):
    """The dense model with `removed` layers skipped and `operators` (dense boundary -> C×C W, applied to that
    module's input) by hooks; with `capture_at` also the raw input and the output of that layer."""
    got = {}
    handles = []
    layers = model.model.layers
    n = len(layers)
    if capture_at is not None:
        handles.append(layers[capture_at].register_forward_pre_hook(
            lambda m, a, k: got.__setitem__("x", (a[0] if a else k["hidden_states"]).clone()), with_kwargs=True))
        handles.append(layers[capture_at].register_forward_hook(
            lambda m, a, k, out: got.__setitem__("y", out[0] if isinstance(out, tuple) else out), with_kwargs=True))
    for i in removed:
        handles.append(layers[i].register_forward_hook(
            lambda m, a, k, out: a[0] if a else k["hidden_states"], with_kwargs=True))
    for b, w in operators.items():
        module = model.model.norm if b == n else layers[b]

        def pre(m, a, k, w=w):
            h = a[0] if a else k["hidden_states"]
            h = h @ w.to(h.dtype)
            return ((h, *a[1:]), k) if a else (a, {**k, "hidden_states": h})

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return logits, got


def _nll(logits, ids):
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()))


def test_loss_greedy_matches_a_naive_reimplementation_past_its_first_pick():
    """Each step: for every kept layer, the ghost of its raw input (before any operator there, which it replaces)
    onto its output, composed before any operator already at the next boundary; the pick is the lowest held-out
    loss of the whole model so built, run with hooks on the dense model."""
    model = tiny_model("llama", layers=6)
    windows = random_windows(8, 24)
    held = random_windows(3, 24, seed=9)
    picked, scores = greedy_loss(LossContext(model, held, "ghost", progress=False), windows, 3)
    removed, ops = [], {}
    for step in range(3):
        kept = [i for i in range(6) if i not in removed]
        losses = {}
        for k, layer in enumerate(kept):
            _, got = _run(model, windows, removed, ops, capture_at=layer)
            x, y = (t.reshape(-1, C).double() for t in (got["x"], got["y"]))
            w = fit_ghost(x.T @ x, x.T @ y)
            end = kept[k + 1] if k + 1 < len(kept) else 6
            trial = {b: m for b, m in ops.items() if b != layer}
            trial[end] = w @ ops[end] if end in ops else w
            logits, _ = _run(model, held, [*removed, layer], trial)
            losses[layer] = (_nll(logits, held), trial)
        best = min(losses, key=lambda layer: losses[layer][0])
        assert picked[step] == best, (step, picked, {k: v[0] for k, v in losses.items()})
        assert scores[str(best)] == pytest.approx(losses[best][0], rel=1e-6)
        removed.append(best)
        ops = losses[best][1]


def test_loss_greedy_refuses_a_recovery_without_a_boundary_operator():
    model = tiny_model("llama", layers=6)
    with pytest.raises(GhostlayersError, match="loss-greedy"):
        greedy_loss(LossContext(model, random_windows(2, 16), "replaceme", progress=False), random_windows(4, 16), 2)


def test_the_held_out_windows_are_drawn_after_the_fit_windows_and_never_among_them(tokenizer):
    fit = calibration_windows(tokenizer, "wiki", 8, 64, seed=3)
    both = calibration_windows(tokenizer, "wiki", 8 + 4, 64, seed=3)
    assert torch.equal(both[:8], fit)  # adding held-out windows leaves the fit windows as they were
    assert not any(torch.equal(h, f) for h in both[8:] for f in fit)
    with pytest.raises(GhostlayersError, match="select-windows"):
        split_held_out(fit, Selection("loss", 2, select_windows=8))


def test_prune_with_the_loss_criterion_records_every_candidate_score(tmp_path, capsys):
    model = tiny_model("qwen3", layers=6, dtype=torch.float32)
    model.save_pretrained(tmp_path / "dense")
    byte_tokenizer().save_pretrained(tmp_path / "dense")
    (tmp_path / "prose.txt").write_text(PROSE * 30)
    code = main(["prune", "--model", str(tmp_path / "dense"), "--calib", str(tmp_path / "prose.txt"), "--seq-len", "32",
                 "--calib-samples", "8", "--drop", "2", "--select", "loss", "--select-windows", "3", "--out",
                 str(tmp_path / "out"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "out" / "ghostlayers.json").read_text())
    selection = manifest["selection"]
    assert selection["criterion"] == "loss" and selection["held_out_windows"] == 3 and selection["scored_with"] == "ghost"
    scores = {int(k): v for k, v in selection["scores"].items()}
    assert sorted(scores) == [0, 1, 2, 3, 4]
    start = min(scores, key=scores.get)
    assert manifest["removed_layers"] == [start, start + 1]
    assert manifest["calibration"]["tokens"] == 8 * 32  # the 3 held-out windows are not fitted on


def test_compare_puts_the_loss_criteria_beside_the_others_on_the_same_fit_windows(tmp_path, capsys):
    model = tiny_model("llama", layers=6, dtype=torch.float32)
    model.save_pretrained(tmp_path / "dense")
    byte_tokenizer().save_pretrained(tmp_path / "dense")
    (tmp_path / "prose.txt").write_text(PROSE * 30)
    common = ["compare", "--model", str(tmp_path / "dense"), "--drop", "2", "--recover", "none,ghost", "--calib",
              str(tmp_path / "prose.txt"), "--text", str(tmp_path / "prose.txt"), "--calib-samples", "8",
              "--seq-len", "32", "--max-windows", "3", "--align-windows", "2", "--quiet"]
    assert main([*common, "--select", "streamline,loss,loss-greedy", "--select-windows", "3",
                 "--out", str(tmp_path / "with")]) == 0, capsys.readouterr().err
    assert main([*common, "--select", "streamline", "--out", str(tmp_path / "without")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "with" / "results.jsonl").read_text().splitlines()]
    alone = [json.loads(x) for x in (tmp_path / "without" / "results.jsonl").read_text().splitlines()]
    key = lambda r: (r["select"], r["recover"])  # noqa: E731
    by = {key(r): r for r in rows[1:]}
    for r in alone[1:]:  # streamline fitted on the same 8 windows whether or not loss criteria hold 3 more out
        assert by[key(r)]["perplexity"] == pytest.approx(r["perplexity"], rel=1e-9)
    loss = by[("loss", "ghost")]
    assert loss["scored_with"] == "ghost" and sorted(int(k) for k in loss["scores"]) == [0, 1, 2, 3, 4]
    start = min(loss["scores"], key=loss["scores"].get)
    assert loss["removed"] == [int(start), int(start) + 1]
    assert len(by[("loss-greedy", "ghost")]["scores"]) == 2
    assert (tmp_path / "with" / "selection.png").is_file()
