"""The planner (`prune --dry-run`, `--memory-budget`): its counts against the real thing."""

import json
import resource
import subprocess
import sys

import pytest
import torch

from conftest import FAMILIES, PROSE, byte_tokenizer, random_windows, tiny_model
from ghostlayers.forecast import GB, forecast, read_shape
from ghostlayers.models import num_parameters
from ghostlayers.options import QUIET
from ghostlayers.pipeline import calibrate
from ghostlayers.select import Selection


@pytest.mark.parametrize("family", FAMILIES)
def test_the_shape_read_from_config_counts_every_parameter(family, tmp_path):
    model = tiny_model(family, layers=4, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    shape = read_shape(str(tmp_path))
    assert shape.layers == 4 and shape.parameters == num_parameters(model)


@pytest.mark.parametrize("criterion,recover", [("ghost", "ghost"), ("streamline", "ghost"), ("shortgpt", "none")])
def test_the_forecast_counts_the_float64_sums_the_calibration_holds(criterion, recover, tmp_path):
    """Without the refit (so the pass also captures the fit sums of every candidate), the forecast's sums are the
    bytes of the C × C tables the calibration returns."""
    model = tiny_model("llama", layers=6, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    stats, _ = calibrate(model, random_windows(4, 16), Selection(criterion, 2), (recover,), QUIET)
    held = sum(t.numel() * t.element_size() for table in (stats.gram, stats.cross, stats.mlp_cross)
               for t in table.values() if t.dim() == 2)
    f = forecast(read_shape(str(tmp_path)), criterion, 2, recover, refit_layers=None, samples=4, seq_len=16)
    assert f.phases["calibrate"].get("float64 sums of the candidates", 0) == held


def _peak_of(argv: list[str]) -> tuple[float, str]:
    """Peak resident memory (bytes) of `ghostlayers ARGV` run alone in a child process, and its output."""
    code = ("import resource, subprocess, sys; r = subprocess.run([sys.executable, '-m', 'ghostlayers', *sys.argv[1:]],"
            " capture_output=True, text=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);"
            " print(r.returncode, r.stdout, r.stderr[-2000:], file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0]) * 1024, out.stderr


@pytest.mark.parametrize("extra", [[], ["--layer-by-layer"], ["--layer-by-layer", "--recover", "none",
                                                               "--format", "vanilla"]])
def test_the_forecast_peak_is_within_a_quarter_of_the_measured_peak(extra, tmp_path):
    model = tiny_model("llama", layers=6, dtype=torch.float32)
    model.save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    (tmp_path / "prose.txt").write_text(PROSE * 30)
    argv = ["prune", "--model", str(tmp_path / "m"), "--select", "manual", "--layers", "2,3", "--calib",
            str(tmp_path / "prose.txt"), "--calib-samples", "8", "--seq-len", "64", "--quiet", *extra]
    dry = subprocess.run([sys.executable, "-m", "ghostlayers", *argv, "--out", str(tmp_path / "o"), "--dry-run"],
                         capture_output=True, text=True)
    assert dry.returncode == 0 and not (tmp_path / "o").exists(), dry.stderr  # nothing read, nothing written
    forecast_peak = float(next(line.split()[-1] for line in dry.stdout.splitlines() if line.startswith("  peak")))
    measured, log = _peak_of([*argv, "--out", str(tmp_path / "o")])
    assert (tmp_path / "o").exists(), log
    assert abs(forecast_peak * GB - measured) <= 0.25 * measured, (forecast_peak, measured / GB)
    manifest = json.loads((tmp_path / "o" / "ghostlayers.json").read_text())
    assert manifest["removed_layers"] == [2, 3]


def test_a_budget_too_small_is_refused_before_loading_and_one_that_needs_groups_says_so(tmp_path, capsys):
    from ghostlayers.cli import main

    model = tiny_model("llama", layers=8, dtype=torch.float32)
    model.save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    (tmp_path / "prose.txt").write_text(PROSE * 30)
    base = ["prune", "--model", str(tmp_path / "m"), "--drop", "2", "--calib", str(tmp_path / "prose.txt"),
            "--calib-samples", "4", "--seq-len", "32", "--refit", "none", "--out", str(tmp_path / "o")]
    capsys.readouterr()
    assert main([*base, "--memory-budget", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "forecast to need" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    # the runtime and the weights leave a budget for two candidates' sums (2 C² float64 each, C = 16)
    shape = read_shape(str(tmp_path / "m"))
    f = forecast(shape, "ghost", 2, "ghost", refit_layers=None, samples=4, seq_len=32, folds=4)
    budget = f.peak - f.phases["calibrate"]["float64 sums of the candidates"] + 4 * 16 * 16 * 8
    assert main([*base, "--memory-budget", str(budget / GB)]) == 0
    err = capsys.readouterr().err
    assert "scoring them in 4 passes" in err, err
