"""--heal: a short distillation of only what the repair owns (issue 25), on tiny random models."""

import pytest
import torch

from conftest import FAMILIES, byte_tokenizer, random_windows, tiny_model
from ghostlayers import PruneSpec, prune
from ghostlayers.api import heal
from ghostlayers.divergence import against
from ghostlayers.errors import GhostlayersError
from ghostlayers.heal import owned
from ghostlayers.options import HealOptions
from ghostlayers.select import Selection

WINDOWS = random_windows(10, 24, seed=3)
TRAIN, HELD = WINDOWS[:8], WINDOWS[8:]


def pruned(family="llama", recover="ghost", refit=True, layers=(2, 3)):
    dense = tiny_model(family, layers=6, dtype=torch.float32)
    kw = {} if refit else {"refit": None}
    result = prune(dense, TRAIN, PruneSpec(Selection("manual", len(layers), list(layers)), recover, progress=False, **kw))
    return dense, result


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def quick(steps, **kw):
    return HealOptions(steps=steps, **{"lr": 0.05, "eval_every": 5, "patience": 100, **kw})


def test_zero_steps_leave_the_model_unchanged_bit_for_bit():
    dense, result = pruned()
    before = state(result.model)
    healed = heal(dense, result, TRAIN, HELD, quick(0), progress=False)
    after = state(result.model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert healed.steps_run == 0 and healed.kl_after == healed.kl_before and result.manifest["heal"]["steps"] == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_declared_parameters_move_and_the_teacher_never(family):
    dense, result = pruned(family)
    declared = owned(result.model, result.plan.removed, result.refits, layers=1)
    names = set(declared)
    assert any(".ghost." in n for n in names) and any("o_proj" in n for n in names)
    assert any(".mlp.up_proj." in n for n in names)  # the whole kept layer after the boundary
    dense_before, pruned_before = state(dense), state(result.model)
    # stopped on the training windows themselves, so that a step is kept and something moves
    healed = heal(dense, result, TRAIN, TRAIN, quick(6, layers=1, eval_every=2, lr=0.01), progress=False)
    assert healed.best_step > 0
    dense_after, pruned_after = state(dense), state(result.model)
    assert all(torch.equal(dense_before[k], dense_after[k]) for k in dense_before)
    moved = {k for k in pruned_before if not torch.equal(pruned_before[k], pruned_after[k])}
    assert moved and moved <= names, moved - names
    assert set(result.manifest["heal"]["parameters"]) == names
    assert not any(p.requires_grad for n, p in result.model.named_parameters() if ".ghost." in n)


def test_the_shared_prefix_runs_once_per_batch_in_the_dense_model_only():
    dense, result = pruned(layers=(3, 4))
    calls = {"dense": [0] * 6, "pruned": [0] * 4}
    handles = [layer.register_forward_hook(lambda *a, w=w, i=i: calls[w].__setitem__(i, calls[w][i] + 1))
               for w, model in (("dense", dense), ("pruned", result.model))
               for i, layer in enumerate(model.model.layers)]
    steps = 4
    heal(dense, result, TRAIN, HELD, quick(steps, batch_size=2, eval_every=steps), progress=False)
    for h in handles:
        h.remove()
    batches = steps + 2 * 1  # training batches, then the held-out windows (one batch) before and after
    assert calls["dense"][:3] == [batches] * 3 and calls["pruned"][:3] == [0] * 3
    assert calls["dense"][3:] == [batches] * 3 and calls["pruned"][3] == batches


def test_the_kl_on_the_training_windows_falls_and_the_best_step_is_kept():
    dense, result = pruned()
    before = against(dense, result.model, TRAIN, progress=False).as_dict()["kl_mean"]
    healed = heal(dense, result, TRAIN, TRAIN, quick(30, lr=0.01), progress=False)  # stopped on the same windows
    after = against(dense, result.model, TRAIN, progress=False).as_dict()["kl_mean"]
    assert after < 0.9 * before, (before, after)
    assert healed.best_step > 0 and healed.kl_after == pytest.approx(after, rel=1e-4)
    # on windows it never trained on, the parameters kept are the best measured, the start included
    dense, result = pruned()
    healed = heal(dense, result, TRAIN, HELD, quick(20), progress=False)
    held = against(dense, result.model, HELD, progress=False).as_dict()["kl_mean"]
    assert held == pytest.approx(healed.kl_after, rel=1e-4) and healed.kl_after <= healed.kl_before


def test_the_same_seed_gives_the_same_parameters_and_another_seed_others():
    runs = []
    for seed in (0, 0, 1):
        dense, result = pruned()
        heal(dense, result, TRAIN, HELD, quick(5, seed=seed, batch_size=3), progress=False)
        runs.append(state(result.model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_a_healed_plain_model_stays_a_vanilla_checkpoint_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    dense, result = pruned(recover="none")
    healed = heal(dense, result, TRAIN, HELD, quick(10), progress=False)
    assert healed.best_step > 0 and not result.keeps_operators
    out = result.save(tmp_path / "healed", byte_tokenizer(), format="auto")
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(plain(WINDOWS).logits, result.model(WINDOWS).logits)


def test_nothing_to_heal_is_refused_with_the_way_out():
    dense, result = pruned(recover="none", refit=False)
    with pytest.raises(GhostlayersError, match="nothing to heal.*--heal-layers"):
        heal(dense, result, TRAIN, HELD, quick(3), progress=False)
    heal(dense, result, TRAIN, HELD, quick(2, layers=1), progress=False)  # whole layers are something


def test_prune_heal_and_the_heal_command_record_the_heal_and_keep_the_format(tmp_path, capsys):
    import json

    from conftest import PROSE
    from ghostlayers.cli import main
    from ghostlayers.export import load

    folder = tmp_path / "dense"
    tiny_model("llama", layers=6, dtype=torch.float32).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    text = tmp_path / "prose.txt"
    text.write_text(PROSE * 30)
    common = ["--calib", str(text), "--calib-samples", "6", "--seq-len", "32"]
    assert main(["prune", "--model", str(folder), "--select", "manual", "--layers", "2-3", "--recover", "none",
                 "--heal", "3", *common, "--out", str(tmp_path / "plain")]) == 0
    err = capsys.readouterr().err
    assert "healing" in err and "GB and" in err and "held-out KL to the dense model" in err
    manifest = json.loads((tmp_path / "plain" / "ghostlayers.json").read_text())
    assert manifest["export"] == "vanilla" and manifest["heal"]["steps"] == 3
    assert all("o_proj" in n or "down_proj" in n for n in manifest["heal"]["parameters"])
    assert main(["prune", "--model", str(folder), "--select", "manual", "--layers", "2-3", *common, "--quiet",
                 "--out", str(tmp_path / "ghost")]) == 0
    assert main(["heal", str(tmp_path / "ghost"), "--steps", "2", "--quiet", "--out", str(tmp_path / "healed")]) == 0
    model, _, manifest = load(tmp_path / "healed")
    assert manifest["export"] == "exact" and manifest["heal"]["calibration"]["samples"] == 6
    assert any(".ghost." in n for n in manifest["heal"]["parameters"])
    capsys.readouterr()
    assert main(["prune", "--model", str(folder), "--drop", "2", "--heal", "3", "--layer-by-layer", *common,
                 "--out", str(tmp_path / "x")]) == 2
    assert "--heal trains the pruned model in memory" in capsys.readouterr().err


def test_gradient_checkpointing_changes_nothing_but_memory():
    runs = []
    for checkpoint in (False, True):
        dense, result = pruned()
        heal(dense, result, TRAIN, TRAIN, quick(4, checkpoint=checkpoint, lr=0.01, eval_every=2), progress=False)
        runs.append(state(result.model))
    for k in runs[0]:
        torch.testing.assert_close(runs[0][k], runs[1][k], rtol=1e-5, atol=1e-6)


def test_a_heal_that_would_not_fit_is_refused_before_any_step():
    from ghostlayers.heal import heal as distil

    dense, result = pruned()
    before = state(result.model)
    params = owned(result.model, result.plan.removed, result.refits)
    with pytest.raises(GhostlayersError, match="needs about .* GB .* available: lower --heal-batch"):
        distil(dense, result.model, TRAIN, HELD, params, quick(3), progress=False, memory=1.0)
    assert all(torch.equal(before[k], v) for k, v in state(result.model).items())


def test_a_heal_that_kept_its_start_says_what_to_try():
    from ghostlayers.heal import Healed

    kept_start = Healed(50, 30, 0, 0.78, 0.78, ["w"], 10, 1.0, {}, {})
    assert "unchanged" in kept_start.summary() and "--heal-lr" in kept_start.summary()
    helped = Healed(50, 50, 40, 0.78, 0.70, ["w"], 10, 1.0, {}, {})
    assert "--heal-lr" not in helped.summary() and "kept step 40" in helped.summary()
