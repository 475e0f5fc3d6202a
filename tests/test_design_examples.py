"""docs/design.md's three worked examples (a recovery method, a selection criterion, a model family) stay true:
their code, read from the page itself, still registers and does what the page says (issue 22)."""

from __future__ import annotations

import math
import re
import types
from pathlib import Path

import pytest
import torch

from conftest import random_windows, tiny_model
from ghostlayers import recovery, select
from ghostlayers.capture import CaptureSpec, capture
from ghostlayers.options import QUIET
from ghostlayers.pipeline import Selection, calibrate
from ghostlayers.select import SelectOptions, candidate_scores

PAGE = Path(__file__).resolve().parents[1] / "docs" / "design.md"


def example(heading: str) -> str:
    """The first ```python block after `## {heading}` on the page."""
    text = PAGE.read_text()
    section = text[text.index(f"## {heading}"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_recovery_method_example_registers_and_fits_its_definition():
    code = example("How to add a recovery method")
    assert "# src/ghostlayers/recovery/diagonal_ls.py" in code
    module = types.ModuleType("ghostlayers.recovery.diagonal_ls")
    module.__package__ = "ghostlayers.recovery"  # the page's relative imports, as the file would have them
    exec(compile(code, "docs/design.md", "exec"), module.__dict__)
    try:
        assert "diagonal-ls" in recovery.names()
        model = tiny_model("llama", layers=6)
        windows = random_windows(6, 24)
        stats, plan = calibrate(model, windows, Selection("manual", 2, [2, 3]), methods=("diagonal-ls",), run=QUIET)
        (op,) = recovery.fit("diagonal-ls", stats, plan)
        with torch.no_grad():
            hidden = model(windows, output_hidden_states=True).hidden_states
        x, y = (hidden[i].reshape(-1, hidden[i].shape[-1]).double() for i in (2, 4))
        d = (x * y).sum(0) / x.square().sum(0)  # the page's definition, d_c = Σ x_c y_c / Σ x_c²
        torch.testing.assert_close(op.linear_map(), torch.diag(d))
    finally:
        recovery.REGISTRY.pop("diagonal-ls", None)


def test_the_selection_criterion_example_registers_and_picks_by_its_definition():
    code = example("How to add a selection criterion")
    namespace = dict(vars(select))  # the page's class lives in select.py: its names are in scope there
    namespace.update(math=math, CaptureSpec=CaptureSpec)
    exec(compile(code, "docs/design.md", "exec"), namespace)
    try:
        assert "norm-ratio" in select.CRITERIA_REGISTRY
        model = tiny_model("qwen2", layers=6)
        windows = random_windows(6, 24)
        stats = capture(model, windows, CaptureSpec(), progress=False)
        rated = candidate_scores("norm-ratio", stats, 2, SelectOptions())
        explicit = {s: abs(math.log(float(stats.sumsq[s + 2]) / float(stats.sumsq[s]))) for s in range(5)}
        assert rated == pytest.approx(explicit)
        _, plan = calibrate(model, windows, Selection("norm-ratio", 2), methods=(), run=QUIET)
        best = min(explicit, key=explicit.get)
        assert plan.removed == (best, best + 1)
    finally:
        select.CRITERIA_REGISTRY.pop("norm-ratio", None)


def test_the_model_family_example_is_the_entry_in_the_family_table():
    from ghostlayers import models

    line = example("How to add a model family").strip()
    assert line in (Path(models.__file__).read_text())  # the page quotes the table as it is
    assert models.FAMILIES["smollm3"].per_layer_config == ("layer_types", "no_rope_layers")
