"""llama.cpp in a child process: a crash is a message; a GGUF's KL against the dense model in transformers."""

import signal

import pytest
import torch

from conftest import random_windows
from ghostlayers import llamacpp
from ghostlayers.errors import GhostlayersError

needs_llama_cpp = pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python is not installed: "
                                     "`make gguf-check` builds it from source and runs these tests")


def test_the_child_returns_its_value_and_turns_an_exception_into_a_message():
    assert llamacpp.in_child(max, 3, 4) == 4
    with pytest.raises(GhostlayersError, match="ValueError"):
        llamacpp.in_child(int, "not a number")


def test_an_engine_killed_by_illegal_instruction_reaches_the_user_as_a_message_naming_the_fix():
    with pytest.raises(GhostlayersError, match="SIGILL.*GGML_NATIVE=OFF"):
        llamacpp.in_child(signal.raise_signal, signal.SIGILL)


def test_an_unknown_quantisation_type_is_refused(tmp_path):
    if not llamacpp.available():
        with pytest.raises(GhostlayersError, match="not installed.*GGML_NATIVE=OFF"):
            llamacpp.quantize(tmp_path / "a.gguf", tmp_path / "b.gguf", "q8_0")
    else:
        with pytest.raises(GhostlayersError, match="unknown llama.cpp type 'q3'"):
            llamacpp.quantize(tmp_path / "a.gguf", tmp_path / "b.gguf", "q3")


@needs_llama_cpp
def test_a_gguf_run_in_llama_cpp_has_almost_no_divergence_from_itself_in_transformers(tmp_path):
    from test_gguf import gguf_model, manifest, merge_tokenizer

    from ghostlayers.divergence import against_stored, store_base
    from ghostlayers.gguf_export import save_gguf
    from ghostlayers.models import load_model

    model = gguf_model("llama")
    path = save_gguf(model, merge_tokenizer(), tmp_path / "m.gguf", manifest(removed=(), method="none"), quant="f32",
                     progress=False).path
    ours = load_model(str(path))[0]
    windows = random_windows(3, 24, seed=4)
    base = store_base(ours, windows, tmp_path / "dense.npy", progress=False)
    cpp = llamacpp.divergence(path, base, windows).as_dict()
    hf = against_stored(base, ours, windows, progress=False).as_dict()
    assert cpp["tokens"] == hf["tokens"] == 3 * 23
    assert cpp["kl_mean"] < 1e-3 and cpp["top1_agreement"] >= 90
    assert cpp["perplexity"] == pytest.approx(hf["perplexity"], rel=1e-2)
    q8 = llamacpp.quantize(path, tmp_path / "m-q8_0.gguf", "q8_0")
    assert q8.is_file() and q8.stat().st_size < path.stat().st_size
    assert llamacpp.divergence(q8, base, windows).as_dict()["kl_mean"] > cpp["kl_mean"]
    speeds = llamacpp.speeds({"f32": path, "q8_0": q8}, windows[0].tolist(), new=4, rounds=1)
    assert set(speeds) == {"f32", "q8_0"} and all(p > 0 and d > 0 for p, d in speeds.values())
    torch.manual_seed(0)
    assert len(llamacpp.greedy(path, [windows[0, :8].tolist()], 6)[0]) == 6


@needs_llama_cpp
def test_llama_cpps_own_prune_layers_removes_what_recover_none_removes(tmp_path):
    from test_gguf import REMOVED, gguf_model, logits, manifest, merge_tokenizer, pruned

    from ghostlayers.gguf_export import save_gguf
    from ghostlayers.locate import gguf_metadata
    from ghostlayers.models import load_model

    tok = merge_tokenizer()
    dense = save_gguf(gguf_model("llama"), tok, tmp_path / "dense.gguf", manifest(removed=(), method="none"),
                      quant="f32", progress=False).path
    theirs = llamacpp.quantize(dense, tmp_path / "cpp.gguf", "f32", prune_layers=REMOVED)
    ours = save_gguf(pruned("llama", "none"), tok, tmp_path / "ours.gguf", manifest(method="none"), quant="f32",
                     progress=False).path
    assert gguf_metadata(theirs)["llama.block_count"] == 6 - len(REMOVED)
    windows = random_windows(2, 16, seed=5)
    torch.testing.assert_close(logits(load_model(str(theirs))[0], windows), logits(load_model(str(ours))[0], windows))


@needs_llama_cpp
def test_eval_llama_cpp_reports_the_gguf_run_in_llama_cpp(tmp_path, capsys):
    import json

    from test_gguf import gguf_model, manifest, merge_tokenizer, pruned

    from conftest import PROSE
    from ghostlayers.cli import main
    from ghostlayers.gguf_export import save_gguf

    tok = merge_tokenizer()
    dense = save_gguf(gguf_model("llama"), tok, tmp_path / "dense.gguf", manifest(removed=(), method="none"),
                      quant="f32", progress=False).path
    small = save_gguf(pruned("llama", "prunecomp"), tok, tmp_path / "pruned.gguf", manifest(method="prunecomp"),
                      quant="f32", progress=False).path
    (tmp_path / "prose.txt").write_text(PROSE * 20)
    assert main(["eval", str(small), "--against", str(dense), "--llama-cpp", "--text", str(tmp_path / "prose.txt"),
                 "--seq-len", "24", "--max-windows", "3", "--prompts", "2", "--json", "--quiet"]) == 0
    row = json.loads(capsys.readouterr().out)["against"]
    assert row["llama_cpp"]["tokens"] == row["tokens"] == 3 * 23
    assert row["llama_cpp"]["kl_mean"] == pytest.approx(row["kl_mean"], rel=0.1, abs=1e-3)
    assert row["generation"]["windows_llama_cpp"]["prompts"] == 2
    assert main(["eval", "--model", str(tmp_path / "folder"), "--against", str(dense), "--llama-cpp"]) == 2
    assert "--llama-cpp runs a GGUF file" in capsys.readouterr().err
