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
from .hadamard import hadamard
from .operators import DEFAULT_EPS, Operator, check_method, fit, needs
from .select import CRITERIA, Plan, last, make_plan, scores, select, selection_spec
from .surgery import ghost_modules, prune


@dataclass
class Selection:
    criterion: str
    drop: int
    layers: list[int] | None = None  # for manual
    fit: str = "auto"  # auto | block | layer (see select.make_plan)
    angular_last_token: bool = True
    paper: bool = False  # reproduce the reference code: cosine over the sequence axis, start index 0 never scored
    scores: dict[str, float] = field(default_factory=dict)


def calibrate(
    model: PreTrainedModel,
    windows: Tensor,
    selection: Selection,
    batch_size: int = 8,
    progress: bool = True,
    methods: tuple[str, ...] = ("ghost",),
    extra: CaptureSpec | None = None,
) -> tuple[Stats, Plan]:
    """One pass of the dense model over `windows` that yields the selection and the sums every method in `methods`
    needs to be fitted.

    For criteria whose blocks are known only after the pass, the pass captures the sums of every candidate block,
    so no second pass is needed (except for sums of blocks the criterion does not visit, e.g. ReplaceMe after
    ShortGPT, whose MLP sums depend on where its runs end, or --fit block after ShortGPT, or --fit layer after a
    contiguous criterion: those get a second pass over the same windows).
    `extra` adds sums to the pass (e.g. every pair's cosine, for a similarity map).
    """
    ad = adapter(model)
    n = ad.num_layers
    if ghost_modules(model):
        raise GhostlayersError("this model already carries ghost operators: prune the dense model instead")
    if selection.criterion not in CRITERIA:
        raise GhostlayersError(f"unknown selection {selection.criterion!r}: use one of {', '.join(CRITERIA)}")
    for method in methods:
        check_method(method, ad.mlp_adds_to_residual, model.config.model_type)
    rotation = hadamard(ad.hidden_size) if "linearpatch-r" in methods else None

    def run(spec: CaptureSpec) -> Stats:
        return capture(model, windows, spec, batch_size, progress=progress, rotation=rotation)

    if selection.criterion in ("manual", "last"):
        if selection.criterion == "manual" and not selection.layers:
            raise GhostlayersError("--select manual needs --layers, e.g. --layers 12-17 or --layers 3,9,14")
        removed = selection.layers if selection.criterion == "manual" else last(n, selection.drop)
        plan = make_plan(n, removed or [], selection.fit)
        return run(method_spec(methods, plan) | (extra or CaptureSpec())), plan

    spec = selection_spec(selection.criterion, selection.drop, n, selection.paper)
    candidates = sorted(spec.cosine)  # every block (or layer) the criterion may pick
    contiguous = selection.criterion != "shortgpt"  # its candidates are blocks; shortgpt's are single layers
    for method in methods:
        spec = spec | needs(method, candidates, candidates if contiguous else [])
    stats = run(spec | (extra or CaptureSpec()))
    removed = select(selection.criterion, stats, selection.drop, selection.angular_last_token, selection.paper)
    selection.scores = scores(selection.criterion, stats, selection.drop, selection.angular_last_token, selection.paper)
    # ShortGPT is a scattered criterion: `auto` fits it per layer (as the paper does) even when its picks happen to be
    # adjacent, so the per-layer sums of this one pass always suffice.
    fit_mode = "layer" if selection.fit == "auto" and not contiguous else selection.fit
    plan = make_plan(n, removed, fit_mode)
    needed = method_spec(methods, plan)
    if not needed.covered_by(stats):
        stats.update(run(needed))
    return stats, plan


def method_spec(methods: tuple[str, ...], plan: Plan) -> CaptureSpec:
    """The sums needed to fit every method in `methods` for `plan`."""
    pairs = [p for b in plan.blocks() for p in plan.fit_pairs(b)]
    spec = CaptureSpec()
    for method in methods:
        spec = spec | needs(method, pairs, plan.blocks())
    return spec


def alignment_spec(plan: Plan) -> CaptureSpec:
    """The sums that score every method's alignment error at each removed block [s, e)."""
    blocks = plan.blocks()
    return CaptureSpec(grams=frozenset(s for s, _ in blocks), cross=frozenset(blocks)) | needs("replaceme", [], blocks)


def recover(
    model: PreTrainedModel, stats: Stats, plan: Plan, method: str, eps: float = DEFAULT_EPS
) -> tuple[PreTrainedModel, list[Operator]]:
    """The pruned model with `method`'s recovery installed or folded; the dense model is left as it was."""
    operators = fit(method, stats, plan, eps)
    pruned = prune(
        model,
        plan.removed,
        operators={op.boundary: w for op in operators if (w := op.runtime_weight()) is not None},
        scales={op.boundary: op.scale for op in operators if op.scale is not None},
        transforms={op.block[0] - 1: op.transform for op in operators if op.transform is not None},
    )
    return pruned, operators


def _kind(op: Operator) -> str:
    if op.matrix is not None:
        return "matrix module (C x C) at the boundary"
    if op.diag is not None:
        return "diagonal module (C) at the boundary"
    if op.scale is not None:
        return "scale folded into o_proj/down_proj after the boundary"
    return f"transform folded into down_proj of layer {op.block[0] - 1}"


def manifest(
    *,
    base_model: str,
    plan: Plan,
    selection: Selection,
    recovery: str,
    eps: float,
    operators: list[Operator],
    calibration: dict[str, Any],
    dense_parameters: int | None = None,
) -> dict[str, Any]:
    """How a pruned model was made, in original (dense) layer numbering."""
    kept = [i for i in range(plan.num_layers) if i not in plan.removed]
    return {
        "base_model": base_model,
        "dense_parameters": dense_parameters,
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
        "recovery": {
            "method": recovery,
            "eps": eps if recovery in ("ghost", "replaceme") else None,
            "per_layer": plan.per_layer,
        },
        "operators": [
            {
                "block": list(op.block),
                "boundary_dense": op.boundary,
                "boundary_pruned": kept.index(op.boundary) if op.boundary in kept else len(kept),
                "kind": _kind(op),
                "scale": op.scale,
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
