"""Exports: exact and vanilla round trips for every method and family, the fresh-process trust_remote_code load,
saved dtypes, interrupted writes, and corrupted or unsafe folders refused with a message that says what is wrong."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, byte_tokenizer, dense_operator, random_parts, random_windows, tiny_model
from ghostlayers import load, save
from ghostlayers.capture import capture
from ghostlayers.errors import GhostlayersError
from ghostlayers.export import describe
from ghostlayers.outputs import check_format
from ghostlayers.hadamard import hadamard
from ghostlayers.models import load_model
from ghostlayers.recovery import spec_for
from ghostlayers.alignment import alignment_spec
from ghostlayers.pipeline import recover
from ghostlayers.runtime import ghostlayers_classes
from ghostlayers.plan import make_plan
from ghostlayers.surgery import ghost_modules, prune

METHODS = ["none", "prunecomp", "linearpatch-d", "linearpatch-r", "replaceme", "ghost"]
FOLDING = ["none", "prunecomp", "replaceme"]
PLANS = {"contiguous": [2, 3], "scattered": [1, 2, 4]}
_STATS: dict = {}


def pruned_by(family, removed, method, dtype=torch.float32):
    """The tiny model of `family` with `removed` dropped and `method` fitted on random windows."""
    key = (family, tuple(removed), dtype)
    model = tiny_model(family, dtype=dtype)
    plan = make_plan(6, removed)
    if key not in _STATS:
        methods = tuple(m for m in METHODS if m != "none" and not (m == "replaceme" and family == "gemma3_text"))
        spec = spec_for(methods, plan) | alignment_spec(plan)
        _STATS[key] = capture(model, random_windows(4, 20), spec, progress=False, rotation=hadamard(16))
    pruned, _ = recover(model, _STATS[key], plan, method)
    return pruned


def greedy(model, prompt, use_cache):
    return model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=use_cache, pad_token_id=0)


def assert_same_model(loaded, pruned):
    windows = random_windows(2, 16, seed=1)
    prompt = random_windows(1, 5, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(windows).logits, pruned(windows).logits, rtol=0, atol=0)
    cached = greedy(loaded, prompt, True)
    assert torch.equal(cached, greedy(loaded, prompt, False))
    assert torch.equal(cached, greedy(pruned, prompt, True))


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_exact_and_vanilla_round_trips(family, method, plan, tmp_path, tokenizer):
    if method == "replaceme" and family == "gemma3_text":
        pytest.skip("ReplaceMe is refused on Gemma 3 (its MLP output is normalised before the residual)")
    pruned = pruned_by(family, PLANS[plan], method)
    manifest = {"recovery": {"method": method}, "kept_layers": [i for i in range(6) if i not in PLANS[plan]]}
    save(pruned, tokenizer, tmp_path / "exact", manifest)
    loaded, _, got = load(tmp_path / "exact")
    assert got["export"] == "exact" and got["ghost_modules"] == sorted(ghost_modules(pruned))
    assert type(loaded).__name__ == "GhostlayersForCausalLM" and loaded.config.num_hidden_layers == 6 - len(PLANS[plan])
    assert_same_model(loaded, pruned)
    if method in FOLDING:
        save(pruned, tokenizer, tmp_path / "vanilla", manifest, format="vanilla")
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "vanilla")  # no remote code, no ghostlayers
        assert type(plain) is type(pruned) and not (tmp_path / "vanilla" / "modeling_ghostlayers.py").exists()
        assert_same_model(plain, pruned)
        assert load(tmp_path / "vanilla")[2]["export"] == "vanilla"
    else:
        with pytest.raises(GhostlayersError, match="none, prunecomp, replaceme"):
            save(pruned, tokenizer, tmp_path / "vanilla", manifest, format="vanilla")
        assert not (tmp_path / "vanilla").exists()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied,dtype", [(True, torch.float32), (False, torch.float32), (True, torch.bfloat16)])
def test_round_trip_keeps_ties_and_dtype(family, tied, dtype, tmp_path, tokenizer):
    model = tiny_model(family, layers=6, dtype=dtype, tied=tied)
    w = torch.eye(16, dtype=torch.float64) + 0.1 * torch.randn(16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pruned = prune(model, [3, 4, 5], {6: w})  # operator before the final norm
    save(pruned, tokenizer, tmp_path / "out", {"removed_layers": [3, 4, 5]})
    loaded, tok, manifest = load(tmp_path / "out")
    assert manifest["removed_layers"] == [3, 4, 5]
    assert loaded.dtype == dtype and loaded.model.norm.ghost.weight.dtype == torch.float32  # operators never 16-bit
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    assert_same_model(loaded, pruned)
    assert tok("abc").input_ids == tokenizer("abc").input_ids


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_saved_dtype_casts_weights_but_not_operators(dtype, tmp_path, tokenizer):
    pruned = pruned_by("llama", [1, 2, 4], "ghost")
    save(pruned, tokenizer, tmp_path / "out", {}, dtype=dtype)
    loaded, _, manifest = load(tmp_path / "out")
    assert str(loaded.dtype) == f"torch.{dtype}" and manifest["dtype"] == dtype
    saved = loaded.state_dict()
    for name, tensor in pruned.state_dict().items():
        want = tensor if ".ghost." in name else tensor.to(loaded.dtype)
        assert saved[name].dtype == want.dtype and torch.equal(saved[name], want), name
    assert load(tmp_path / "out", dtype="float32")[0].model.layers[1].ghost.weight.dtype == torch.float32


FRESH = textwrap.dedent(
    """
    import json, sys
    class NoGhostlayers:  # prove the export needs nothing from the package
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "ghostlayers":
                raise ImportError("ghostlayers must not be imported")
    sys.meta_path.insert(0, NoGhostlayers())
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    folders, ids, out = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2])), sys.argv[3]
    logits, report = {}, {}
    for name, folder in folders.items():
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        with torch.no_grad():
            logits[name] = model(ids).logits.float().contiguous()
        args = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
        cached = model.generate(ids[:1, :5], use_cache=True, **args)
        report[name] = {"cache_agrees": bool(torch.equal(cached, model.generate(ids[:1, :5], use_cache=False, **args))),
                        "tokens": cached[0].tolist(), "class": type(model).__name__,
                        "operator_dtypes": sorted({str(p.dtype) for n, p in model.named_parameters() if ".ghost." in n})}
    generator = pipeline("text-generation", model=folders["llama"], trust_remote_code=True)
    report["pipeline"] = generator("The river", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    try:
        AutoModelForCausalLM.from_pretrained(folders["llama"])
        report["plain_load"] = "loaded"
    except Exception as err:
        report["plain_load"] = type(err).__name__ + ": " + str(err)
    report["ghostlayers_imported"] = any(m.split(".")[0] == "ghostlayers" for m in sys.modules)
    save_file(logits, out)
    print("\\nREPORT " + json.dumps(report))  # after transformers' own prompt text
    """
)


def test_fresh_process_loads_with_trust_remote_code_only(tmp_path, tokenizer):
    """AutoModelForCausalLM and pipeline load the exports in a process that cannot import ghostlayers."""
    folders, expected = {}, {}
    for family in FAMILIES:
        method = "linearpatch-d" if family == "qwen3" else "ghost"  # a diagonal operator too
        pruned = pruned_by(family, [1, 2, 5], method)  # operators inside the stack and before the final norm
        folders[family] = str(save(pruned, tokenizer, tmp_path / family, {}, dtype="bfloat16" if family == "qwen2" else "auto"))
        expected[family] = load(folders[family])[0]
    # low-rank + bias inside the stack, affine diagonal before the final norm, in a bfloat16 export
    affine = prune(tiny_model("llama", dtype=torch.float32), [1, 2, 5], {3: random_parts("low-rank+bias", 3), 6: random_parts("diagonal+bias", 6)})
    folders["llama_affine"] = str(save(affine, tokenizer, tmp_path / "llama_affine", {}, dtype="bfloat16"))
    expected["llama_affine"] = load(folders["llama_affine"])[0]
    assert sorted(expected["llama_affine"].model.layers[1].ghost.state_dict()) == ["bias", "down", "up"]
    ids = random_windows(2, 16, seed=3)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    done = subprocess.run(
        [sys.executable, "-c", FRESH, json.dumps(folders), json.dumps(ids.tolist()), str(tmp_path / "logits.safetensors")],
        capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, cwd=tmp_path, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.split("\nREPORT ")[-1])
    logits = load_file(str(tmp_path / "logits.safetensors"))
    assert not report["ghostlayers_imported"]
    for family, model in expected.items():
        with torch.no_grad():
            torch.testing.assert_close(logits[family], model(ids).logits.float(), rtol=0, atol=0)
        assert report[family]["cache_agrees"] and report[family]["class"] == "GhostlayersForCausalLM"
        assert report[family]["tokens"] == greedy(model, ids[:1, :5], True)[0].tolist()
        assert report[family]["operator_dtypes"] == ["torch.float32"]
    assert report["pipeline"].startswith("The river") and len(report["pipeline"]) > len("The river")
    assert report["plain_load"] != "loaded" and "trust_remote_code" in report["plain_load"], report["plain_load"]


def test_plain_load_without_remote_code_refuses(tmp_path, tokenizer):
    out = save(pruned_by("llama", [2, 3], "ghost"), tokenizer, tmp_path / "out", {})
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)


def test_interrupted_export_leaves_nothing_and_keeps_the_old_one(tmp_path, tokenizer, monkeypatch):
    pruned = pruned_by("llama", [2, 3], "ghost")
    (tmp_path / "taken").mkdir()
    with pytest.raises(GhostlayersError, match="already exists"):
        save(pruned, tokenizer, tmp_path / "taken", {})
    old = save(pruned, tokenizer, tmp_path / "old", {"note": "first"})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tokenizer), "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save(pruned, tokenizer, tmp_path / "new", {})
    with pytest.raises(KeyboardInterrupt):
        save(pruned, tokenizer, old, {"note": "second"}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "taken"]
    assert load(old)[2]["note"] == "first"


def test_vanilla_refusal_names_the_folding_methods(tokenizer):
    pruned = pruned_by("qwen2", [2, 3], "linearpatch-r")
    with pytest.raises(GhostlayersError, match="'linearpatch-r' keeps operators.*none, prunecomp, replaceme"):
        check_format("vanilla", bool(ghost_modules(pruned)), "recovery 'linearpatch-r'")
    with pytest.raises(GhostlayersError, match="unknown format"):
        check_format("safetensors", False)


def _export(tmp_path, tokenizer):
    return save(pruned_by("llama", [1, 2, 4], "ghost"), tokenizer, tmp_path / "out", {"num_layers_pruned": 3})


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _edit_weights(folder, edit):
    weights = load_file(str(folder / "model.safetensors"))
    edit(weights)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda d: _edit_weights(d, lambda w: w.pop("model.layers.1.ghost.weight")), "operator model.layers.1 is missing"),
        (lambda d: _edit_weights(d, lambda w: w.update({"model.layers.1.ghost.weight": torch.eye(8)})), r"shape \(8, 8\)"),
        (lambda d: _edit_weights(d, lambda w: w.update({"model.layers.0.ghost.weight": torch.eye(16)})), "does not declare"),
        (lambda d: _edit_json(d / "ghostlayers.json", ghost_modules=["model.layers.1"]), "the manifest lists operators"),
        (lambda d: _edit_json(d / "ghostlayers.json", num_layers_pruned=4), "the manifest says 4 layers"),
        (lambda d: _edit_json(d / "ghostlayers.json", format_version=1), "export format 1"),
        (lambda d: _edit_json(d / "ghostlayers.json", export="vanilla"), "says vanilla"),
        (lambda d: (d / "ghostlayers.json").write_text("{"), "not valid JSON"),
        (lambda d: (d / "modeling_ghostlayers.py").unlink(), "modeling_ghostlayers.py is missing"),
        (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]), "truncated"),
        (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    ],
    ids=["missing-op", "wrong-shape", "extra-op", "manifest-ops", "manifest-layers", "old-format", "manifest-format",
         "bad-json", "no-code", "truncated", "no-weights"],
)
def test_corrupted_exports_are_refused(corrupt, message, tmp_path, tokenizer):
    out = _export(tmp_path, tokenizer)
    corrupt(out)
    with pytest.raises(GhostlayersError, match=message):
        load(out)


def test_remote_class_refuses_weights_without_operators(tmp_path, tokenizer):
    """The export's own code (used with trust_remote_code) also refuses a missing operator instead of using identity."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = _export(tmp_path, tokenizer)
    _edit_weights(out, lambda w: w.pop("model.norm.ghost.weight", None) or w.pop("model.layers.1.ghost.weight"))
    _, model_cls = ghostlayers_classes(LlamaConfig, LlamaForCausalLM)
    with pytest.raises(ValueError, match="lack the operators"):
        model_cls.from_pretrained(out)


def test_pickle_only_folder_is_refused(tmp_path, tokenizer):
    model = tiny_model("llama", dtype=torch.float32)
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(GhostlayersError, match="only pickle weights.*pytorch_model.bin"):
        load_model(str(tmp_path))


AFFINE = {  # dense boundary -> operator kind, for an export with every kind of part
    "affine": {3: "dense+bias", 6: "diagonal+bias"},
    "low-rank": {3: "low-rank", 5: "low-rank+bias", 6: "dense"},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kinds", AFFINE)
def test_affine_and_low_rank_operators_round_trip_exactly(kinds, dtype, tmp_path, tokenizer):
    operators = {b: random_parts(kind, seed=b) for b, kind in AFFINE[kinds].items()}
    pruned = prune(tiny_model("llama", dtype=dtype), [1, 2, 4], operators)
    out = save(pruned, tokenizer, tmp_path / "out", {})
    config = json.loads((out / "config.json").read_text())
    names = {3: "model.layers.1", 5: "model.layers.2", 6: "model.norm"}
    assert config["ghost_operators"] == {names[b]: {k: list(v.shape) for k, v in parts.items()} for b, parts in operators.items()}
    loaded, _, _ = load(out)
    assert_same_model(loaded, pruned)
    ghosts = ghost_modules(loaded)
    for b, parts in operators.items():
        for part, tensor in parts.items():
            got = getattr(ghosts[names[b]], part)
            assert got.dtype == torch.float32 and torch.equal(got, tensor.float()), (b, part)  # never 16-bit
    info = describe(out)
    assert info["parameters"]["operators"] == sum(t.numel() for parts in operators.values() for t in parts.values())
    for op in info["operators"]:
        parts = operators[{v: k for k, v in names.items()}[op["module"]]]
        assert op["parts"] == {k: list(v.shape) for k, v in parts.items()} and op["dtype"] == "F32"
        assert op["parameters"] == sum(t.numel() for t in parts.values())
        assert op["shape"] == ([16] if parts.get("weight", torch.eye(2)).dim() == 1 else [16, 16])
        linear = dense_operator(torch.eye(16, dtype=torch.float64), {k: v.float() for k, v in parts.items() if k != "bias"})
        m = (linear - torch.eye(16, dtype=torch.float64)) if op["shape"] == [16, 16] else None
        if m is not None:
            assert op["distance_from_identity"] == pytest.approx(float(m.norm() / 4), rel=1e-9)
        assert ("bias_norm" in op) == ("bias" in parts)
        if "bias" in parts:
            assert op["bias_norm"] == pytest.approx(float(parts["bias"].float().double().norm()), rel=1e-12)
        if "down" in parts:
            assert op["kind"] == "low-rank" and op["rank"] == 4 and op["effective_rank"] <= 4 + 1e-6


def _legacy(folder):
    """Rewrite config.json as exports were written before operators had parts: {module: shape}."""
    config = json.loads((folder / "config.json").read_text())
    config["ghost_operators"] = {k: v["weight"] for k, v in config["ghost_operators"].items()}
    (folder / "config.json").write_text(json.dumps(config))


def test_legacy_config_without_parts_still_loads(tmp_path, tokenizer):
    """Format-2 exports written before affine and low-rank operators declare {module: [C, C]} (or [C])."""
    from transformers import LlamaConfig, LlamaForCausalLM

    operators = {3: random_parts("dense", 3), 6: random_parts("diagonal", 6)}
    pruned = prune(tiny_model("llama", dtype=torch.float32), [1, 2, 4], operators)
    out = save(pruned, tokenizer, tmp_path / "out", {})
    _legacy(out)
    assert json.loads((out / "config.json").read_text())["ghost_operators"] == {"model.layers.1": [16, 16], "model.norm": [16]}
    loaded, _, _ = load(out)
    assert_same_model(loaded, pruned)
    assert [op["parts"] for op in describe(out)["operators"]] == [{"weight": [16, 16]}, {"weight": [16]}]
    _, model_cls = ghostlayers_classes(LlamaConfig, LlamaForCausalLM)  # the export's own code (trust_remote_code)
    assert_same_model(model_cls.from_pretrained(out), pruned)
    again = save(loaded, tokenizer, tmp_path / "again", {})  # saving it again writes the parts form
    assert json.loads((again / "config.json").read_text())["ghost_operators"]["model.norm"] == {"weight": [16]}


def _low_rank_export(tmp_path, tokenizer):
    operators = {3: random_parts("low-rank+bias", 3), 6: random_parts("dense", 6)}
    pruned = prune(tiny_model("llama", dtype=torch.float32), [1, 2, 4], operators)
    return save(pruned, tokenizer, tmp_path / "out", {"num_layers_pruned": 3})


def _declare(folder, module, parts):
    config = json.loads((folder / "config.json").read_text())
    config["ghost_operators"][module] = parts
    (folder / "config.json").write_text(json.dumps(config))


L1 = "model.layers.1.ghost."


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda d: _edit_weights(d, lambda w: w.pop(L1 + "up")), r"operator model.layers.1 part up \(declared \(4, 16\)\) is missing"),
        (lambda d: _edit_weights(d, lambda w: w.update({L1 + "up": torch.zeros(5, 16)})), r"part up has shape \(5, 16\), config.json declares \(4, 16\)"),
        (lambda d: (_edit_weights(d, lambda w: w.update({L1 + "up": torch.zeros(5, 16)})),
                    _declare(d, "model.layers.1", {"down": [16, 4], "up": [5, 16], "bias": [16]})),
         r"down has shape \(16, 4\) and up \(5, 16\)"),
        (lambda d: _edit_weights(d, lambda w: w.pop(L1 + "bias")), "part bias .* is missing from the weights"),
        (lambda d: _edit_weights(d, lambda w: w.update({"model.norm.ghost.bias": torch.zeros(16)})),
         "the weights hold a part bias .* of operator model.norm that config.json does not declare"),
        (lambda d: (_edit_weights(d, lambda w: w.pop(L1 + "up")), _declare(d, "model.layers.1", {"down": [16, 4], "bias": [16]})),
         "down without up"),
        (lambda d: (_edit_weights(d, lambda w: w.update({L1 + "down": torch.zeros(16, 17), L1 + "up": torch.zeros(17, 16)})),
                    _declare(d, "model.layers.1", {"down": [16, 17], "up": [17, 16], "bias": [16]})), "1 ≤ r ≤ 16"),
        (lambda d: _declare(d, "model.layers.1", "low-rank"), "declares operator model.layers.1 as 'low-rank'"),
    ],
    ids=["missing-up", "wrong-rank-up", "ranks-disagree", "missing-bias", "extra-bias", "up-undeclared", "rank-too-high",
         "bad-declaration"],
)
def test_corrupted_low_rank_exports_are_refused(corrupt, message, tmp_path, tokenizer):
    out = _low_rank_export(tmp_path, tokenizer)
    corrupt(out)
    with pytest.raises(GhostlayersError, match=message):
        load(out)
    with pytest.raises(GhostlayersError, match=message):
        describe(out)


@pytest.mark.parametrize("edit,message", [
    (lambda w: w.pop(L1 + "up"), "lack the operators.*model.layers.1.ghost.up"),
    (lambda w: w.update({"model.norm.ghost.bias": torch.zeros(16)}), "hold operators.*model.norm.ghost.bias.*does not declare"),
], ids=["missing-part", "extra-part"])
def test_remote_class_refuses_missing_or_undeclared_parts(edit, message, tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    out = _low_rank_export(tmp_path, tokenizer)
    _edit_weights(out, edit)
    _, model_cls = ghostlayers_classes(LlamaConfig, LlamaForCausalLM)
    with pytest.raises(ValueError, match=message):
        model_cls.from_pretrained(out)


def test_every_export_has_a_model_card_with_hub_front_matter(tmp_path):
    """README.md: YAML front matter naming the base model, the tags and the licence the source declares; then how
    it was made."""
    import yaml

    import ghostlayers
    from ghostlayers.select import Selection

    model = tiny_model("llama", layers=6, dtype=torch.float32)
    (tmp_path / "dense").mkdir()
    model.save_pretrained(tmp_path / "dense")
    (tmp_path / "dense" / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a model\n")
    result = ghostlayers.prune(model, random_windows(4, 20), ghostlayers.PruneSpec(Selection("manual", 2, [2, 3]),
                               "none", progress=False), base_model=str(tmp_path / "dense"))
    for format in ("exact", "vanilla"):
        out = result.save(tmp_path / format, byte_tokenizer(), format=format)
        text = (out / "README.md").read_text()
        front = yaml.safe_load(text.split("---")[1])
        assert front["base_model"] == str(tmp_path / "dense") and front["license"] == "apache-2.0"
        assert {"ghostlayers", "layer-pruning"} <= set(front["tags"]) and front["pipeline_tag"] == "text-generation"
        assert "layers removed: 2-3" in text and ("trust_remote_code" in text) == (format == "exact")
        refit = result.manifest["recovery"]["refit"]["matrices"][0]  # the refit's measured errors are on the card
        assert f"refit of layer {refit['layer']}'s {refit['matrix']}: error {refit['error_before']:.3f}" in text
