"""The data flow, as library calls: calibrate the dense model once -> select -> fit -> prune.

    stats, plan, scores = calibrate(model, windows, "streamline", drop=6)
    pruned, ops = recover(model, stats, plan, "ghost")
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch
import transformers
from torch import Tensor
from transformers import PreTrainedModel

from . import __version__
from .capture import CaptureSpec, Stats, capture
from .errors import GhostlayersError
from .models import adapter
from .operators import DEFAULT_EPS, Operator, fit
from .select import CRITERIA, Plan, last, make_plan, scores, select, selection_spec
from .surgery import ghost_modules, prune


@dataclass
class Selection:
    criterion: str
    drop: int
    layers: list[int] | None = None  # for manual
    fit: str = "auto"  # auto | block | layer (see select.make_plan)
    angular_last_token: bool = True
    scores: dict[str, float] = field(default_factory=dict)


def calibrate(
    model: PreTrainedModel,
    windows: Tensor,
    selection: Selection,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[Stats, Plan]:
    """One pass of the dense model over `windows` that yields both the selection and the sums to fit it.

    For criteria whose blocks are known only after the pass, the pass captures the sums of every candidate block,
    so no second pass is needed (except when the fit mode asks for pairs the criterion does not visit).
    """
    n = adapter(model).num_layers
    if ghost_modules(model):
        raise GhostlayersError("this model already carries ghost operators: prune the dense model instead")
    if selection.criterion not in CRITERIA:
        raise GhostlayersError(f"unknown selection {selection.criterion!r}: use one of {', '.join(CRITERIA)}")
    if selection.criterion == "manual":
        if not selection.layers:
            raise GhostlayersError("--select manual needs --layers, e.g. --layers 12-17 or --layers 3,9,14")
        plan = make_plan(n, selection.layers, selection.fit)
        return capture(model, windows, plan.capture_spec(), batch_size, progress=progress), plan
    if selection.criterion == "last":
        plan = make_plan(n, last(n, selection.drop), selection.fit)
        return capture(model, windows, plan.capture_spec(), batch_size, progress=progress), plan

    spec = selection_spec(selection.criterion, selection.drop, n)
    if selection.fit == "layer":  # per-layer fits need every adjacent pair
        spec = spec | CaptureSpec(grams=frozenset(range(n)), cross=frozenset((i, i + 1) for i in range(n)))
    stats = capture(model, windows, spec, batch_size, progress=progress)
    removed = select(selection.criterion, stats, selection.drop, selection.angular_last_token)
    selection.scores = scores(selection.criterion, stats, selection.drop, selection.angular_last_token)
    plan = make_plan(n, removed, selection.fit)
    needed = plan.capture_spec()
    if not needed.covered_by(stats):  # e.g. shortgpt with --fit block: a second pass for the chosen blocks
        extra = capture(model, windows, needed, batch_size, progress=progress)
        stats.gram.update(extra.gram)
        stats.cross.update(extra.cross)
    return stats, plan


def recover(
    model: PreTrainedModel, stats: Stats, plan: Plan, method: str, eps: float = DEFAULT_EPS
) -> tuple[PreTrainedModel, list[Operator]]:
    """The pruned model with `method`'s operators installed; the dense model is left as it was."""
    operators = fit(method, stats, plan, eps)
    pruned = prune(model, plan.removed, {op.boundary: op.weight for op in operators})
    return pruned, operators


def manifest(
    *,
    base_model: str,
    plan: Plan,
    selection: Selection,
    recovery: str,
    eps: float,
    operators: list[Operator],
    calibration: dict[str, Any],
) -> dict[str, Any]:
    """How a pruned model was made, in original (dense) layer numbering."""
    kept = [i for i in range(plan.num_layers) if i not in plan.removed]
    return {
        "base_model": base_model,
        "num_layers_dense": plan.num_layers,
        "num_layers_pruned": len(kept),
        "removed_layers": list(plan.removed),
        "kept_layers": kept,
        "selection": {
            "criterion": selection.criterion,
            "drop": len(plan.removed),
            "angular_last_token": selection.angular_last_token if selection.criterion == "angular" else None,
            "scores": selection.scores,
        },
        "recovery": {"method": recovery, "eps": eps if recovery == "ghost" else None, "per_layer": plan.per_layer},
        "operators": [
            {
                "boundary_dense": op.boundary,
                "boundary_pruned": kept.index(op.boundary) if op.boundary in kept else len(kept),
                "fitted_on": [list(p) for p in op.pairs],
                "relative_fit_error": op.errors,
            }
            for op in operators
        ],
        "calibration": calibration,
        "versions": {
            "ghostlayers": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
