"""The command line on a tiny model saved to a folder: the happy path, and one-line errors with exit status 2."""

import json

import pytest
import torch

from conftest import PROSE, byte_tokenizer, tiny_model
from ghostlayers import load
from ghostlayers.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_model("llama", layers=6, dtype=torch.float32).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "prose.txt"
    path.write_text(PROSE * 30)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_prune_then_eval(capsys, tmp_path, model_dir, text):
    out = tmp_path / "pruned"
    code, _, err = run(capsys, "prune", "--model", model_dir, "--drop", 2, "--calib", text, "--calib-samples", 8,
                       "--seq-len", 32, "--out", out, "--quiet")
    assert code == 0, err
    manifest = json.loads((out / "ghostlayers.json").read_text())
    assert len(manifest["removed_layers"]) == 2 and manifest["calibration"]["seed"] == 0
    assert manifest["num_layers_pruned"] == 4 and len(manifest["operators"]) == 1
    assert 0 <= manifest["operators"][0]["relative_fit_error"][0] < 1
    code, stdout, err = run(capsys, "eval", out, "--text", text, "--seq-len", 32, "--json", "--quiet")
    assert code == 0, err
    row = json.loads(stdout)
    assert row["layers"] == 4 and row["pruned"] and row["perplexity"] > 1
    model, _, _ = load(out)
    assert model.config.num_hidden_layers == 4


def test_same_seed_same_operator(capsys, tmp_path, model_dir, text):
    args = ["prune", "--model", model_dir, "--select", "manual", "--layers", "1,3", "--calib", text,
            "--calib-samples", 4, "--seq-len", 32, "--quiet"]
    assert run(capsys, *args, "--out", tmp_path / "a")[0] == 0
    assert run(capsys, *args, "--out", tmp_path / "b")[0] == 0
    a, _, _ = load(tmp_path / "a")
    b, _, _ = load(tmp_path / "b")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_compare_grid_files_and_resume(capsys, tmp_path, model_dir, text):
    out = tmp_path / "results"
    args = ["compare", "--model", model_dir, "--drop", "1,2", "--select", "streamline,shortgpt", "--calib", text,
            "--text", text, "--calib-samples", 8, "--seq-len", 32, "--max-windows", 4, "--align-windows", 2,
            "--out", out, "--quiet"]
    code, stdout, err = run(capsys, *args)
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 + 2 * 2 * 7  # the dense model, then every (drop, select, method) cell
    assert rows[0]["recover"] == "dense" and rows[0]["layers"] == 6
    for row in rows[1:]:
        if "error" in row:  # e.g. replaceme when a block starts at layer 0: the row says why
            assert row["recover"] == "replaceme" and "layer 0" in row["error"]
            continue
        assert row["perplexity"] > 1 and len(row["align_error"]) >= 1
        assert row["kl_mean"] > 0 and row["kl_median"] <= row["kl_p99"] and 0 <= row["top1_agreement"] <= 100
        if row["recover"] == "none":
            assert row["align_error"] == [1.0] * len(row["align_error"])
    ghost = [r for r in rows if r["recover"] == "ghost"]
    assert all(max(r["align_error"]) < 1 for r in ghost)
    for name in ("results.md", "perplexity.png", "similarity.png", "similarity.json"):
        assert (out / name).is_file(), name
    assert "Perplexity on held-out text" in stdout and "ghost" in stdout
    first = next(r for r in rows[1:] if "kl_mean" in r)
    assert f"{first['kl_mean']:.3f} / {first['top1_agreement']:.1f}%" in (out / "results.md").read_text()
    before = (out / "results.jsonl").read_text()
    code, _, err = run(capsys, *args)  # nothing left to do: no new rows
    assert code == 0 and (out / "results.jsonl").read_text() == before
    lines = before.splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:-3]) + "\n" + lines[-3][:20])  # interrupted mid-row
    code, _, err = run(capsys, *args)
    assert code == 0
    again = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]  # every line parses
    assert {(r["drop"], r["select"], r["recover"]) for r in again} == {(r["drop"], r["select"], r["recover"]) for r in rows}
    code, _, err = run(capsys, *[a if a != 8 else 16 for a in args])
    assert code == 2 and "other settings" in err and "calib_samples 8 -> 16" in err
    code, _, err = run(capsys, *args, "--eps", "0.5")
    assert code == 2 and "eps" in err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--drop", 0], "--drop must be between 1 and 5"),
        (["--drop", 6], "--drop must be between 1 and 5"),
        (["--select", "manual", "--layers", "2,9"], "out of range"),
        (["--select", "manual", "--layers", "2,2"], "repeat"),
        (["--select", "manual"], "needs --layers"),
        (["--drop", 2, "--calib-samples", 500], "too short"),
        (["--drop", 2, "--seq-len", 256], "exceeds the model's context of 128"),
    ],
)
def test_bad_selection_input(capsys, tmp_path, model_dir, text, extra, message):
    code, _, err = run(capsys, "prune", "--model", model_dir, "--calib", text, "--seq-len", 32, "--quiet",
                       "--out", tmp_path / "out", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_bad_model_and_files(capsys, tmp_path, model_dir, text):
    def fails(*argv, message):
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err

    base = ["--calib", text, "--seq-len", 32, "--drop", 2, "--quiet"]
    fails("prune", "--model", tmp_path / "nope", *base, "--out", tmp_path / "o", message="unknown model")
    fails("prune", "--model", "org/model", *base, "--out", tmp_path / "o", message="offline")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    fails("prune", "--model", gpt2, *base, "--out", tmp_path / "o", message="unsupported architecture 'gpt2'")
    (tmp_path / "taken").mkdir()
    fails("prune", "--model", model_dir, *base, "--out", tmp_path / "taken", message="already exists")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)))
    fails("eval", "--model", model_dir, "--text", tmp_path / "empty.txt", message="no text")
    fails("eval", "--model", model_dir, "--text", tmp_path / "bin.txt", message="binary")
    fails("eval", "--model", model_dir, "--text", "wikitext2", message="offline")
    fails("eval", message="give exactly one model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin.txt", "empty.txt", "gpt2", "taken"]


def test_help_teaches(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    out = capsys.readouterr().out
    for flag in ("--drop", "--select", "--layers", "--recover", "--calib", "--calib-samples", "--seq-len", "--seed",
                 "--eps", "--out", "examples:"):
        assert flag in out


def test_pruning_a_ghosted_model_is_refused(capsys, tmp_path, model_dir, text):
    base = ["--calib", text, "--calib-samples", 4, "--seq-len", 32, "--drop", 1, "--quiet"]
    assert run(capsys, "prune", "--model", model_dir, *base, "--out", tmp_path / "once")[0] == 0
    code, _, err = run(capsys, "prune", "--model", tmp_path / "once", *base, "--out", tmp_path / "twice")
    assert code == 2 and "is already pruned" in err


def test_more_bad_input(capsys, tmp_path, model_dir, text):
    def fails(*argv, message):
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err

    base = ["--calib", text, "--seq-len", 32, "--drop", 2, "--quiet"]
    fails("prune", "--model", model_dir, *base, "--calib-samples", 1, "--seq-len", 8, "--shrink", "none",
          "--out", tmp_path / "o", message="fewer than the hidden size 16")
    fails("prune", "--model", model_dir, *base, "--calib-samples", 3, "--out", tmp_path / "o",
          message="cannot split 3 calibration windows into 4 folds")  # the default --shrink cross-validates
    fails("prune", "--model", model_dir, *base, "--device", "tpu9", "--out", tmp_path / "o", message="device")
    fails("prune", "--model", model_dir, *base, "--compute-dtype", "float8_e4m3fn", "--out", tmp_path / "o", message="dtype")
    fails("eval", "pruned/", "--text", text, message="unknown model 'pruned/'")
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf file")
    fails("eval", "--model", tmp_path / "fake.gguf", "--text", text, message="cannot load GGUF file")
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (no_weights / name).write_bytes((model_dir / name).read_bytes())
    fails("eval", "--model", no_weights, "--text", text, message="has no weights")
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "thesis.txt").write_text("do not delete")
    fails("prune", "--model", model_dir, *base, "--out", keep, "--overwrite", message="not a ghostlayers export")
    fails("prune", "--model", model_dir, *base, "--out", model_dir, "--overwrite", message="input model")
    assert (keep / "thesis.txt").exists() and (model_dir / "config.json").exists()


def test_overwrite_replaces_an_earlier_export(capsys, tmp_path, model_dir, text):
    args = ["prune", "--model", model_dir, "--calib", text, "--seq-len", 32, "--calib-samples", 4, "--quiet",
            "--out", tmp_path / "out"]
    assert run(capsys, *args, "--drop", 1)[0] == 0
    assert run(capsys, *args, "--drop", 2, "--overwrite")[0] == 0
    assert json.loads((tmp_path / "out" / "ghostlayers.json").read_text())["num_layers_pruned"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("method", ["prunecomp", "linearpatch-d", "linearpatch-r", "replaceme"])
def test_prune_with_each_baseline(capsys, tmp_path, model_dir, text, method):
    code, _, err = run(capsys, "prune", "--model", model_dir, "--select", "manual", "--layers", "2,4", "--recover", method,
                       "--calib", text, "--calib-samples", 8, "--seq-len", 32, "--out", tmp_path / "o", "--quiet")
    assert code == 0, err
    manifest = json.loads((tmp_path / "o" / "ghostlayers.json").read_text())
    assert manifest["recovery"]["method"] == method and len(manifest["operators"]) == 2
    folded = method in ("prunecomp", "replaceme")
    assert (manifest["ghost_modules"] == []) == folded


def test_formats_dtypes_export_and_info(capsys, tmp_path, model_dir, text):
    from transformers import AutoModelForCausalLM

    base = ["prune", "--model", model_dir, "--select", "manual", "--layers", "1,3", "--calib", text,
            "--calib-samples", 8, "--seq-len", 32, "--quiet"]
    code, _, err = run(capsys, *base, "--recover", "ghost", "--format", "vanilla", "--out", tmp_path / "v")
    assert code == 2 and "none, prunecomp, replaceme" in err and not (tmp_path / "v").exists()
    code, _, err = run(capsys, *base, "--recover", "prunecomp", "--format", "vanilla", "--dtype", "bfloat16",
                       "--out", tmp_path / "v")
    assert code == 0, err
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "v")  # a standard checkpoint
    assert plain.dtype == torch.bfloat16 and plain.config.num_hidden_layers == 4
    assert run(capsys, *base, "--recover", "ghost", "--out", tmp_path / "g")[0] == 0
    code, _, err = run(capsys, "export", tmp_path / "g", "--dtype", "float16", "--out", tmp_path / "g16", "--quiet")
    assert code == 0, err
    model, _, manifest = load(tmp_path / "g16")
    assert model.dtype == torch.float16 and manifest["removed_layers"] == [1, 3] and manifest["dtype"] == "float16"
    assert model.model.layers[1].ghost.weight.dtype == torch.float32
    code, _, err = run(capsys, "export", tmp_path / "g", "--format", "vanilla", "--out", tmp_path / "gv")
    assert code == 2 and "cannot be saved as a vanilla checkpoint" in err and not (tmp_path / "gv").exists()
    code, _, err = run(capsys, "export", model_dir, "--out", tmp_path / "d")
    assert code == 2 and "not a ghostlayers export" in err

    code, out, err = run(capsys, "info", tmp_path / "g", "--json")
    assert code == 0, err
    info = json.loads(out)
    dense = sum(p.numel() for p in tiny_model("llama", layers=6).parameters())
    assert info["parameters"]["dense"] == dense and info["layers"] == {"dense": 6, "pruned": 4, "removed": [1, 3]}
    assert info["parameters"]["operators"] == 2 * 16 * 16  # one C x C operator per boundary (layers 2 and 4)
    assert all(0 <= op["antisymmetric_share"] <= 1 and op["distance_from_identity"] > 0 for op in info["operators"])
    assert info["parameters"]["pruned"] == sum(p.numel() for n, p in model.named_parameters() if ".ghost." not in n)
    assert info["size_bytes"]["weights"] == (tmp_path / "g" / "model.safetensors").stat().st_size
    code, out, _ = run(capsys, "info", tmp_path / "g16")
    assert code == 0 and "parameters" in out and "weights on disk" in out and "model.layers.1" in out
    code, out, _ = run(capsys, "info", model_dir)
    assert code == 0 and "not a ghostlayers export" in out
    code, _, err = run(capsys, "info", tmp_path / "nothing")
    assert code == 2 and "not a model folder" in err


@pytest.mark.parametrize(
    "extra,check",
    [
        (["--eps", "rel:1e-3", "--affine"], lambda m, c: m["recovery"]["eps"] == "rel:0.001" and m["recovery"]["affine"]
         and "bias" in m["operators"][0]["kind"] and set(c["ghost_operators"]["model.layers.0"]) == {"weight", "bias"}),
        (["--rank", 4], lambda m, c: c["ghost_operators"]["model.layers.1"] == {"down": [16, 4], "up": [4, 16]}),
        (["--eps", "gcv"], lambda m, c: m["recovery"]["eps"] == "gcv" and m["operators"][0]["eps_used"][0] > 0),
        (["--eps", "cv", "--folds", 2], lambda m, c: m["recovery"]["folds"] == 2 and len(m["operators"][0]["eps_used"]) == 1),
        (["--token-weights", "clip"], lambda m, c: m["recovery"]["token_weights"] == "clip"),
        (["--fit", "sequential"], lambda m, c: m["recovery"]["fit"] == "sequential" and not m["recovery"]["per_layer"]
         and [o["block"] for o in m["operators"]] == [[0, 2], [3, 4]]),
    ],
)
def test_prune_beyond_the_paper(capsys, tmp_path, model_dir, text, extra, check):
    code, _, err = run(capsys, "prune", "--model", model_dir, "--select", "manual", "--layers", "0,1,3", "--calib", text,
                       "--calib-samples", 8, "--seq-len", 32, "--out", tmp_path / "o", "--quiet", *extra)
    assert code == 0, err
    manifest = json.loads((tmp_path / "o" / "ghostlayers.json").read_text())
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert check(manifest, config)
    model, _, _ = load(tmp_path / "o")
    assert model.config.num_hidden_layers == 3


def test_prune_selects_with_the_ghost_and_folds_procrustes(capsys, tmp_path, model_dir, text):
    from transformers import AutoModelForCausalLM

    base = ["prune", "--model", model_dir, "--drop", 2, "--calib", text, "--calib-samples", 8, "--seq-len", 32, "--quiet"]
    assert run(capsys, *base, "--select", "ghost", "--out", tmp_path / "g")[0] == 0
    manifest = json.loads((tmp_path / "g" / "ghostlayers.json").read_text())
    scores = manifest["selection"]["scores"]
    assert len(scores) == 5 and manifest["removed_layers"][0] == int(min(scores, key=scores.get))
    code, _, err = run(capsys, *base, "--select", "ghost-greedy", "--fit", "sequential", "--out", tmp_path / "gg")
    assert code == 0, err
    assert len(json.loads((tmp_path / "gg" / "ghostlayers.json").read_text())["removed_layers"]) == 2
    code, _, err = run(capsys, *base, "--recover", "procrustes", "--format", "vanilla", "--out", tmp_path / "p")
    assert code == 0, err
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "p")  # a standard checkpoint, rotation folded in
    assert plain.config.num_hidden_layers == 4 and not plain.config.tie_word_embeddings


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--eps", "abc"], "cannot read --eps"),
        (["--eps", "-1"], "--eps must be zero or positive"),
        (["--rank", 4, "--recover", "prunecomp"], "--affine, --rank and --shrink shape the ghost"),
        (["--rank", 0], "--rank must be a number of at least 1"),
        (["--eps", "gcv", "--recover", "replaceme"], "give replaceme a number"),
        (["--folds", 1, "--eps", "cv"], "--folds must be at least 2"),
        (["--token-weights", "clip", "--recover", "prunecomp"], "changes the ghost and procrustes fits only"),
    ],
)
def test_bad_options_beyond_the_paper(capsys, tmp_path, model_dir, text, extra, message):
    code, _, err = run(capsys, "prune", "--model", model_dir, "--drop", 2, "--calib", text, "--calib-samples", 8,
                       "--seq-len", 32, "--quiet", "--out", tmp_path / "out", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory):
    """A tiny model whose context fits the offline tasks' passages in byte tokens."""
    path = tmp_path_factory.mktemp("tiny-long") / "llama"
    model = tiny_model("llama", layers=4, dtype=torch.float32)
    model.config.max_position_embeddings = 2048
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def test_zero_shot_accuracy_in_eval_and_compare(capsys, tmp_path, long_model_dir, text):
    code, out, err = run(capsys, "eval", "--model", long_model_dir, "--tasks", "offline", "--limit", 3, "--json",
                         "--quiet")
    assert code == 0, err
    row = json.loads(out)
    assert "perplexity" not in row and set(row["accuracy"]["tasks"]) == {"gl_wiki_nextsent", "gl_wiki_lastword"}
    assert all(t["items"] == 3 and 0 <= t["acc"] <= 1 for t in row["accuracy"]["tasks"].values())
    code, out, err = run(capsys, "compare", "--model", long_model_dir, "--drop", 1, "--recover", "none,ghost",
                         "--calib", text, "--text", text, "--calib-samples", 8, "--seq-len", 32, "--max-windows", 2,
                         "--align-windows", 1, "--tasks", "gl_wiki_lastword", "--limit", 2, "--out", tmp_path / "r",
                         "--quiet")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "r" / "results.jsonl").read_text().splitlines()]
    assert [r["recover"] for r in rows] == ["dense", "none", "ghost"]
    assert all(r["accuracy"]["tasks"]["gl_wiki_lastword"]["items"] == 2 for r in rows)
    assert "Zero-shot accuracy" in out and "streamline 1: ghost" in out
    code, _, err = run(capsys, "eval", "--model", long_model_dir, "--tasks-dir", tmp_path, "--quiet")
    assert code == 2 and "need --tasks" in err
    code, out, err = run(capsys, "tasks", "--out", tmp_path / "t", "--items", 20)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == sorted(
        f"gl_wiki_{t}.{e}" for t in ("nextsent", "lastword") for e in ("yaml", "jsonl"))


def test_help_and_argument_errors_do_not_import_torch():
    """`ghostlayers --help`, `COMMAND --help` and argparse errors answer without importing torch or transformers
    (seconds of start-up; issue 13)."""
    import subprocess
    import sys

    code = ("import sys\nfrom ghostlayers.cli import main\n"
            "for argv in (['--help'], ['prune', '--help'], ['compare', '--help'], ['prune', '--drop', 'x']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stderr


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--select", "manual", "--layers", "5,5"], "repeat an index"),
        (["--select", "manual"], "needs --layers"),
        (["--layers", "3"], "--layers is only for --select manual"),
    ],
)
def test_arguments_are_checked_before_the_model_loads(capsys, tmp_path, extra, message):
    """A model that does not exist is never reached: the arguments fail first, in one line."""
    code, _, err = run(capsys, "prune", "--model", tmp_path / "no-such-model", "--calib", "wiki", "--quiet",
                       "--out", tmp_path / "o", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_argument_errors_that_need_no_model_come_before_torch_is_imported(tmp_path):
    """Issue 13: a bad --drop (against a folder's config.json), repeated --layers, an unknown --calib, an existing
    --out, a bad --eps, a refused --format or --layer-by-layer combination: one line, exit 2, no torch import."""
    import json
    import subprocess
    import sys

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 6}))
    cases = [(["--drop", "0"], "between 1 and 5"), (["--select", "manual", "--layers", "5,5"], "repeat an index"),
             (["--drop", "2", "--calib", "nope"], "unknown text source"), (["--drop", "2", "--eps", "x"], "--eps"),
             (["--drop", "2", "--recover", "ghost", "--format", "vanilla"], "cannot be saved as a vanilla"),
             (["--drop", "2", "--recover", "prunecomp", "--affine"], "shape the ghost"),
             (["--drop", "2", "--recover", "ghost", "--format", "gguf"], "which a GGUF cannot hold"),
             (["--drop", "2", "--recover", "none", "--quant", "q8_0"], "--quant is for --format gguf"),
             (["--drop", "2", "--recover", "none", "--format", "gguf"], "should end in .gguf"),
             (["--drop", "2", "--recover", "replaceme", "--shrink", "diagonal"], "shape the ghost"),
             (["--drop", "2", "--shrink", "cube"], "unknown --shrink target"),
             (["--drop", "2", "--folds", "source"], "needs a --calib mixture"),
             (["--drop", "2", "--folds", "x"], "a number or source")]
    code = ("import sys\nfrom ghostlayers.cli import main\n"
            f"cases = {[argv for argv, _ in cases]!r}\n"
            f"base = ['prune', '--model', {str(folder)!r}, '--quiet', '--out', {str(tmp_path / 'out')!r}]\n"
            "print([main(base + argv) for argv in cases])\n"
            "print([main(['prune', '--model', sys.argv[1], '--drop', '2', '--out', sys.argv[1]])])\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert lines == [str([2] * len(cases)), "[2]", "[]"], out.stderr
    errors = out.stderr.strip().splitlines()
    assert len(errors) == len(cases) + 1
    for line, (_, message) in zip(errors, cases):
        assert line.startswith("ghostlayers: error:") and message in line, line
    assert "already exists" in errors[-1]
    assert not (tmp_path / "out").exists()


def test_mixture_calibration_with_folds_by_source(capsys, tmp_path, model_dir, text):
    other = tmp_path / "other.txt"
    other.write_text("Entirely different words about ships, harbours and the weather at sea. " * 120)
    out = tmp_path / "pruned"
    code, _, err = run(capsys, "prune", "--model", model_dir, "--drop", 2, "--calib", f"{text},{other}",
                       "--calib-samples", 8, "--seq-len", 32, "--eps", "cv", "--folds", "source",
                       "--shrink", "diagonal", "--refit", "none", "--out", out, "--quiet")
    assert code == 0, err
    manifest = json.loads((out / "ghostlayers.json").read_text())
    assert manifest["calibration"]["source"] == f"{text},{other}"
    assert manifest["recovery"]["folds"] == "source" and manifest["recovery"]["shrink"] == "diagonal:cv"


@pytest.mark.parametrize("extra,shrink", [([], "diagonal:cv"), (["--shrink", "none"], None),
                                          (["--shrink", "scalar:0.5"], "scalar:0.5"), (["--rank", "4"], None),
                                          (["--recover", "replaceme"], None)])
def test_prune_shrinks_the_ghost_toward_the_diagonal_by_default(extra, shrink):
    """No --shrink: the ghost is fitted with diagonal:cv (what the cross-domain grid kept best); --shrink none is
    the paper's fit; an explicit --rank, or another recovery, gets no shrinkage (and no error)."""
    from ghostlayers.cli import _prune_spec, build_parser

    args = build_parser().parse_args(["prune", "--model", "m", "--drop", "2", "--out", "o", *extra])
    spec = _prune_spec(args)
    assert (str(spec.fit.shrink) if spec.fit.shrink else None) == shrink
    from ghostlayers.select import candidate_fit

    assert candidate_fit(spec.selection.options).shrink is None  # ranked by the unshrunk residual
    assert spec.fit.needs_folds == (shrink == "diagonal:cv")


def test_layers_are_checked_against_a_gguf_header_before_the_model_loads(tmp_path):
    """Issue 22: --layers past a GGUF model's depth (and --drop as deep as it) fails in one line from the file's
    header (metadata only: the depth comes after a tokenizer array here, as in real files), before torch is imported
    and any weight is read; the header reader agrees with gguf's own."""
    import subprocess
    import sys

    import gguf

    from ghostlayers.locate import declared_depth, gguf_metadata

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list([f"tok{i}" for i in range(300)])
    writer.add_token_scores([0.5] * 300)
    writer.add_block_count(6)
    writer.add_head_count([4] * 6)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    reader = gguf.GGUFReader(path)
    ours = gguf_metadata(path)
    assert {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")} == ours
    assert declared_depth(str(path)) == 6 and declared_depth(str(tmp_path / "none.gguf")) is None
    code = ("import sys\nfrom ghostlayers.cli import main\n"
            "base = ['prune', '--model', sys.argv[1], '--quiet', '--out', sys.argv[2]]\n"
            "print([main(base + ['--select', 'manual', '--layers', '4-7']), main(base + ['--drop', '6'])])\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "out")], capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip().splitlines() == ["[2, 2]", "[]"], out.stderr
    errors = out.stderr.strip().splitlines()
    assert len(errors) == 2 and all(e.startswith("ghostlayers: error:") for e in errors), errors
    assert "6" in errors[0] and "between 1 and 5" in errors[1], errors


def test_readme_puts_the_command_on_the_path_before_its_first_use():
    """Issue 22: a new user runs the README's `make setup` and then its first quickstart line. `make setup` installs
    into the Makefile's virtual environment, whose bin/ is not on the path: the README must say how to get there
    (activate it, or call its bin/ghostlayers) before the first line that runs `ghostlayers`."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    venv = re.search(r"^VENV \?= (\S+)", (root / "Makefile").read_text(), re.M).group(1)
    lines = (root / "README.md").read_text().splitlines()
    setup = next(i for i, line in enumerate(lines) if line.startswith("make setup"))
    first = next(i for i, line in enumerate(lines) if line.startswith("ghostlayers "))
    assert setup < first
    assert any(f"source {venv}/bin/activate" in line or f"{venv}/bin/ghostlayers" in line
               for line in lines[setup:first]), lines[setup:first]


def test_compare_resumes_with_settings_beyond_the_paper(capsys, tmp_path, model_dir, text):
    """Issue 22: the settings a results folder is checked against come from one list; before, the check read a
    second, shorter list and refused to resume any run with --affine, --shrink, --rank, --token-weights or --folds
    ("affine None -> True"). A changed one is still refused, and so is leaving one out."""
    out = tmp_path / "results"
    args = ["compare", "--model", model_dir, "--drop", "1", "--select", "streamline", "--recover", "none,ghost",
            "--calib", text, "--text", text, "--calib-samples", 8, "--seq-len", 32, "--max-windows", 4,
            "--align-windows", 2, "--out", out, "--quiet", "--affine"]
    code, _, err = run(capsys, *args)
    assert code == 0, err
    before = (out / "results.jsonl").read_text()
    code, _, err = run(capsys, *args)
    assert code == 0 and (out / "results.jsonl").read_text() == before, err
    code, _, err = run(capsys, *[a for a in args if a != "--affine"])
    assert code == 2 and "affine True -> None" in err, err
    code, _, err = run(capsys, *args, "--token-weights", "clip")
    assert code == 2 and "token_weights None -> 'clip'" in err, err
