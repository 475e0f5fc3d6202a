"""Layer-by-layer calibration: the same sums as the normal pass, bit for bit, and the same export."""

import dataclasses

import pytest
import torch

from conftest import FAMILIES, PROSE, byte_tokenizer, random_windows, tiny_model
import ghostlayers
from ghostlayers import load
from ghostlayers.select import Selection
from ghostlayers.capture import CaptureSpec, DenseSource, collect
from ghostlayers.cli import main
from ghostlayers.errors import GhostlayersError
from ghostlayers.hadamard import hadamard
from ghostlayers.offload import LayerwiseSource, Offloaded
from ghostlayers.options import QUIET, RunOptions

SPEC = CaptureSpec(
    grams=frozenset({0, 2, 6}), cross=frozenset({(0, 2), (2, 5), (2, 6)}), cosine=frozenset({(1, 4), (0, 6)}),
    sequence_cosine=frozenset({(1, 4)}), rotated=frozenset({3}), mlp=frozenset({(1, 2), (1, 5)}),
)


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_sums_equal_the_normal_pass_bit_for_bit(family, tmp_path):
    model = tiny_model(family, layers=6, dtype=torch.float32)
    model.save_pretrained(tmp_path, max_shard_size="20KB")  # several shards and an index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    windows = random_windows(5, 20)
    masks = torch.ones_like(windows)
    masks[1, 15:] = 0  # right padding
    masks[4, 9:] = 0
    for weighting in ("uniform", "clip"):
        run = RunOptions(batch_size=2, progress=False, token_weights=weighting)
        normal = collect(DenseSource(model), windows, SPEC, run, masks, hadamard(16))
        layerwise = collect(LayerwiseSource(Offloaded(tmp_path)), windows, SPEC, run, masks, hadamard(16))
        assert (layerwise.tokens, layerwise.sequences) == (normal.tokens, normal.sequences)
        for a, b in zip(normal.tensors(), layerwise.tensors()):
            assert torch.equal(a, b)


def test_offloaded_keeps_layers_on_meta(tmp_path):
    tiny_model("llama", layers=4, dtype=torch.float32).save_pretrained(tmp_path)
    off = Offloaded(tmp_path)
    layers = off.model.model.layers
    assert all(p.is_meta for p in layers.parameters())
    assert not off.model.model.embed_tokens.weight.is_meta and not off.model.model.norm.weight.is_meta
    with off.layer(2) as layer:
        assert not any(p.is_meta for p in layer.parameters())
    assert all(p.is_meta for p in layers[2].parameters())
    with pytest.raises(GhostlayersError, match="local folder"):
        Offloaded(tmp_path / "missing")


def _map_of(op) -> list:
    """An operator's map as numbers: its C × C matrix, or ReplaceMe's transform of the MLP output."""
    m = op.linear_map()
    return (m if m is not None else op.transform).tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_by_layer_writes_what_the_in_memory_prune_writes_bit_for_bit(family, tmp_path):
    """The default repair (shrunk ghost + refit of 2 layers), a module recovery, every folded recovery (folded into
    each layer as it is read), none + refit (vanilla), and scattered layers fitted sequentially (with and without
    the refit): operators, refits and every written tensor equal to the in-memory run's."""
    model = tiny_model(family, layers=6, dtype=torch.float32)
    model.save_pretrained(tmp_path / "dense", max_shard_size="30KB")
    windows = random_windows(6, 20)
    cases = [(recover, format, [2, 3], True) for recover, format in
             (("ghost", "exact"), ("linearpatch-d", "exact"), ("none", "vanilla"), ("prunecomp", "vanilla"))]
    cases += [("ghost", "exact", [1, 3], True), ("ghost", "exact", [1, 3], False)]  # sequential, with and without refit
    cases += [("prunecomp", "vanilla", [1, 3], False), ("prunecomp", "exact", [2, 3], False)]
    if family != "gemma3_text":  # Gemma 3 takes no rotation and no MLP transform
        cases += [(recover, "vanilla", [2, 3], refit) for recover in ("procrustes", "replaceme") for refit in (True, False)]
    for recover, format, layers, refit in cases:
        spec = ghostlayers.PruneSpec(Selection("manual", 2, layers), recover, progress=False,
                                     **({} if refit else {"refit": None}))
        memory = ghostlayers.prune(model, windows, spec)
        offloaded = Offloaded(tmp_path / "dense")
        layered = ghostlayers.prune(offloaded, windows, spec)
        assert len(layered.refits) == len(memory.refits) == (0 if not refit else 4 if layers == [2, 3] else 6)
        assert [r.as_dict() for r in layered.refits] == [r.as_dict() for r in memory.refits]
        assert [_map_of(op) for op in layered.operators] == [_map_of(op) for op in memory.operators]
        name = f"{recover}-{layers[0]}-{refit}"
        a = memory.save(tmp_path / f"m-{name}", byte_tokenizer(), format=format)
        b = layered.save(tmp_path / f"l-{name}", byte_tokenizer(), format=format)
        assert all(p.is_meta for p in offloaded.model.parameters() if p.dim() > 1 and p is not
                   offloaded.model.get_input_embeddings().weight)  # nothing stayed resident
        sa, sb = load(a)[0].state_dict(), load(b)[0].state_dict()
        assert sorted(sa) == sorted(sb)
        for key in sa:
            assert torch.equal(sa[key], sb[key]), (recover, key)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "qwen2"
    tiny_model("qwen2", layers=6, dtype=torch.float32).save_pretrained(path, max_shard_size="30KB")
    byte_tokenizer().save_pretrained(path)
    (path.parent / "prose.txt").write_text(PROSE * 30)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--drop", 2], ["--select", "shortgpt", "--drop", 3, "--recover", "linearpatch-d", "--fit", "layer"],
                                   ["--select", "manual", "--layers", "4,5", "--dtype", "bfloat16", "--affine"],
                                   ["--drop", 2, "--shrink", "diagonal"],  # cross-validated over the folds' sums
                                   ["--drop", 2, "--eps", "cv", "--shrink", "scalar:cv"], ["--drop", 2, "--rank", "cv"],
                                   ["--drop", 2, "--refit", "none"], ["--drop", 2, "--recover", "none", "--format", "vanilla"],
                                   ["--select", "manual", "--layers", "1,2", "--refit", "all", "--refit-ridge", "cv"],
                                   ["--select", "manual", "--layers", "1,3,4", "--refit", "none"],  # sequential
                                   ["--select", "shortgpt", "--drop", 2, "--fit", "sequential", "--eps", "cv"]])
def test_layer_by_layer_prune_writes_the_same_model(capsys, tmp_path, folder, extra):
    base = ["prune", "--model", folder, "--calib", folder.parent / "prose.txt", "--calib-samples", 6, "--seq-len", 32,
            "--quiet", *extra]
    code, err = run(capsys, *base, "--out", tmp_path / "normal")
    assert code == 0, err
    code, err = run(capsys, *base, "--layer-by-layer", "--out", tmp_path / "lbl")
    assert code == 0, err
    a, _, ma = load(tmp_path / "normal")
    b, _, mb = load(tmp_path / "lbl")
    assert ma["removed_layers"] == mb["removed_layers"] and ma["dense_parameters"] == mb["dense_parameters"]
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert len(list((tmp_path / "lbl").glob("model-layer-*.safetensors"))) == a.config.num_hidden_layers


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--select", "ghost-greedy"], "needs the model in memory"),
    ],
)
def test_layer_by_layer_refusals(capsys, tmp_path, folder, extra, message):
    code, err = run(capsys, "prune", "--model", folder, "--calib", folder.parent / "prose.txt", "--calib-samples", 6,
                    "--seq-len", 32, "--quiet", "--drop", 2, "--layer-by-layer", "--out", tmp_path / "o", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
    code, err = run(capsys, "prune", "--model", "smollm2-135m", "--drop", 2, "--layer-by-layer", "--out", tmp_path / "o")
    assert code == 2 and "local folder of safetensors" in err


@pytest.mark.parametrize("select", ["streamline", "shortgpt"])
def test_two_pass_keeps_only_the_chosen_sums_and_gives_the_same_operators(select):
    from ghostlayers.recovery import fit
    from ghostlayers.pipeline import Selection, calibrate

    model = tiny_model("mistral", layers=6)
    windows = random_windows(4, 20)
    one, plan = calibrate(model, windows, Selection(select, 2, fit="layer"), run=QUIET)
    two, plan2 = calibrate(model, windows, Selection(select, 2, fit="layer"), two_pass=True, run=QUIET)
    assert plan2 == plan
    assert set(two.gram) == {i for b in plan.blocks() for i, _ in plan.fit_pairs(b)} and len(two.gram) < len(one.gram)
    for a, b in zip(fit("ghost", one, plan), fit("ghost", two, plan2)):
        assert torch.equal(a.linear_map(), b.linear_map())
    with pytest.raises(GhostlayersError, match="--two-pass selects from cosines"):
        calibrate(model, windows, Selection("ghost", 2), two_pass=True, run=QUIET)


def test_spilled_states_give_the_same_prune_and_leave_no_file(tmp_path):
    """The cached states in memory-mapped files (`--spill-dir`): the same operators, refits and written tensors as
    in memory, layer by layer and in memory, with the default repair and a sequential fit; the folder left empty."""
    from ghostlayers.spill import Spill

    model = tiny_model("qwen2", layers=6, dtype=torch.float32)
    model.save_pretrained(tmp_path / "dense")
    windows = random_windows(5, 20)
    spill = tmp_path / "spill"
    state = torch.randn(3, 4)
    kept = Spill(spill)(state)
    assert torch.equal(kept, state) and kept.data_ptr() != state.data_ptr() and not list(spill.iterdir())
    for layers in ([2, 3], [1, 3]):
        spec = ghostlayers.PruneSpec(Selection("manual", 2, layers), progress=False)
        spilled = dataclasses.replace(spec, spill=str(spill))
        for dense in (model, Offloaded(tmp_path / "dense")):
            a, b = ghostlayers.prune(dense, windows, spec), ghostlayers.prune(dense, windows, spilled)
            assert [r.as_dict() for r in a.refits] == [r.as_dict() for r in b.refits] and a.refits
            assert [op.linear_map().tolist() for op in a.operators] == [op.linear_map().tolist() for op in b.operators]
        sa = load(a.save(tmp_path / f"a{layers[0]}", byte_tokenizer()))[0].state_dict()
        sb = load(b.save(tmp_path / f"b{layers[0]}", byte_tokenizer()))[0].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not list(spill.iterdir())


def test_holds_nest_and_a_result_can_be_released(tmp_path):
    """A layer held twice is read (and folded) once; a failed or finished run leaves nothing registered."""
    tiny_model("llama", layers=6, dtype=torch.float32).save_pretrained(tmp_path)
    off = Offloaded(tmp_path)
    layers = off.model.model.layers
    with off.hold([2]):
        weight = layers[2].mlp.down_proj.weight
        with off.hold([2, 3]):
            assert layers[2].mlp.down_proj.weight is weight and not layers[3].mlp.down_proj.weight.is_meta
        assert layers[3].mlp.down_proj.weight.is_meta and not weight.is_meta
    assert all(p.is_meta for p in layers.parameters())
    registered = sum(map(len, off._sharers.values()))
    spec = ghostlayers.PruneSpec(Selection("manual", 2, [2, 3]), "prunecomp", progress=False)
    result = ghostlayers.prune(off, random_windows(5, 20), spec)
    assert len(off._folds) == 1  # the result's model only: the walk's was released
    result.close()
    assert sum(map(len, off._sharers.values())) == registered and not off._folds
