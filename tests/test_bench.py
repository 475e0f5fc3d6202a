"""`ghostlayers bench` on tiny models: switching operators off is exact and undone, measurements are well-formed,
the CLI's JSON has the three rows. No assertion on any timing: speed targets live in benchmark output."""

import json
import math

import pytest
import torch

from conftest import PROSE, byte_tokenizer, random_windows, tiny_model
from ghostlayers import bench as bench_module
from ghostlayers.bench import (
    Settings,
    Variant,
    bench,
    memory_in_child,
    operator_overhead,
    operators_disabled,
    peak_memory,
    time_rows,
)
from ghostlayers.cli import main
from ghostlayers.surgery import ghost_modules, prune

TINY = Settings(batch_size=2, seq_len=8, new_tokens=3, prompt_len=4, repeats=2, warmup=1)


def test_operators_disabled_is_the_same_pruning_without_operators_and_is_restored():
    dense = tiny_model("llama", layers=6)
    weight = torch.eye(16, dtype=torch.float64) + 0.1 * torch.randn(16, 16, dtype=torch.float64)
    ghosted = prune(dense, [2, 3], operators={4: weight, 6: torch.rand(16, dtype=torch.float64) + 0.5})
    bare = prune(dense, [2, 3])
    ids = random_windows(2, 12)
    with torch.no_grad():
        with_ops, without_ops = ghosted(ids).logits, bare(ids).logits
        assert not torch.allclose(with_ops, without_ops)
        classes = {name: type(ghosted.get_submodule(name)) for name in ghost_modules(ghosted)}
        with operators_disabled(ghosted):
            assert torch.equal(ghosted(ids).logits, without_ops)
        assert torch.equal(ghosted(ids).logits, with_ops)
        with pytest.raises(RuntimeError, match="boom"):
            with operators_disabled(ghosted):
                raise RuntimeError("boom")
        assert {name: type(ghosted.get_submodule(name)) for name in ghost_modules(ghosted)} == classes
        assert torch.equal(ghosted(ids).logits, with_ops)


def test_measurements_have_the_requested_counts_and_positive_finite_numbers():
    model = prune(tiny_model("llama", layers=4, dtype=torch.float32), [1], operators={2: torch.eye(16)})
    memory = peak_memory(model, TINY)
    assert memory["peak_memory_mb"] > 0 and memory["memory_kind"] == "peak RSS"
    rows = time_rows([(Variant("a", "-", operators=False), model), (Variant("b", "-"), model)], TINY)
    for row in rows:
        for kind, tokens in (("prefill", TINY.seq_len), ("decode", TINY.new_tokens)):
            seconds = row[f"{kind}_seconds"]
            assert len(seconds["runs"]) == TINY.repeats
            assert all(t > 0 and math.isfinite(t) for t in seconds["runs"])
            assert seconds["min"] <= seconds["median"] <= seconds["max"]
            assert row[f"{kind}_tokens_per_s"] == pytest.approx(TINY.batch_size * tokens / seconds["median"])
    inside = operator_overhead(model, TINY)
    assert len(inside["operator_seconds"]) == TINY.repeats and all(t > 0 for t in inside["operator_seconds"])
    assert 0 < inside["operator_overhead"] < math.inf
    assert ghost_modules(model)  # the rows without operators put them back


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    tiny_model("llama", layers=6, dtype=torch.float32).save_pretrained(root / "dense")
    byte_tokenizer().save_pretrained(root / "dense")
    (root / "prose.txt").write_text(PROSE * 30)
    code = main(["prune", "--model", str(root / "dense"), "--drop", "2", "--calib", str(root / "prose.txt"),
                 "--calib-samples", "8", "--seq-len", "32", "--out", str(root / "pruned"), "--quiet"])
    assert code == 0
    return root / "pruned"


def test_cli_json_has_dense_without_and_with_operators(capsys, monkeypatch, pruned_dir):
    # peak memory in this process: the child process per row is tested once below, it costs an interpreter start
    monkeypatch.setattr(bench_module, "memory_in_child", bench_module.memory_row)
    code = main(["bench", str(pruned_dir), "--batch-size", "2", "--seq-len", "8", "--new-tokens", "2",
                 "--repeats", "1", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["dense", "pruned_without_operators", "pruned_with_operators"]
    assert [rows[k]["layers"] for k in rows] == [6, 4, 4]
    assert rows["pruned_with_operators"]["operators"] == 1 and rows["pruned_without_operators"]["operators"] == 0
    assert rows["pruned_with_operators"]["parameters"] == rows["pruned_without_operators"]["parameters"] + 16 * 16
    assert rows["pruned_with_operators"]["layer_ratio"] == 1.5 and rows["dense"]["prefill_speedup"] == 1.0
    for key in ("ghost_overhead_percent", "ghost_overhead_timed_inside_percent"):
        assert math.isfinite(result[key])


def test_peak_memory_in_a_child_process(pruned_dir):
    row = memory_in_child(Variant("pruned_with_operators", str(pruned_dir)), TINY)
    assert row["layers"] == 4 and row["dtype"] == "float32" and row["peak_memory_mb"] > row["rss_before_mb"] > 0


def test_bad_input_is_one_line(capsys, pruned_dir):
    assert main(["bench", str(pruned_dir), "--repeats", "0"]) == 2
    assert "--repeats must be at least 1" in capsys.readouterr().err
    assert main(["bench", "/no/such/model"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["bench", str(pruned_dir), "--dtype", "float8"]) == 2
    assert "unknown dtype" in capsys.readouterr().err


def test_dense_that_cannot_load_is_skipped_with_a_note(pruned_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(bench_module, "memory_in_child", bench_module.memory_row)
    copy = tmp_path / "pruned"
    copy.mkdir()
    for f in pruned_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((copy / "ghostlayers.json").read_text())
    manifest["base_model"] = str(tmp_path / "gone")
    (copy / "ghostlayers.json").write_text(json.dumps(manifest))
    result = bench(str(copy), settings=TINY)
    assert [r["variant"] for r in result["rows"]] == ["pruned_without_operators", "pruned_with_operators"]
    assert "not measured" in result["notes"][0]
