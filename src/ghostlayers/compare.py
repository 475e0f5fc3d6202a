"""Every recovery method side by side: one calibration pass per (drop, selection), reused by every method.

Rows go to `results.jsonl` as each cell finishes, so a run that is interrupted and started again skips what it has.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .capture import CaptureSpec, capture
from .errors import GhostlayersError
from .divergence import against_stored, store_base
from .evaluate import perplexity
from .models import adapter, num_parameters
from .options import DEFAULT_EPS, DEFAULT_RHO, FitOptions, RefitOptions, Ridge, RunOptions, as_fit_options
from .alignment import alignment_errors, alignment_spec, delivered_alignment_errors
from .pipeline import Selection, calibrate, repair
from .recovery import check, get
from .select import get as criterion
from .report import method_label
from .zeroshot import Suite, accuracy

RESULTS = "results.jsonl"
SIMILARITY = "similarity.json"
DENSE_LOGPROBS = "dense-logprobs.npy"  # the dense log-probabilities of the held-out windows (float16; divergence)


@dataclass
class Grid:
    drops: list[int]
    selects: list[str]
    methods: list[str]
    eps: float | Ridge = DEFAULT_EPS
    fit: str = "auto"
    angular_last_token: bool = True
    paper: bool = False
    batch_size: int = 8
    info: dict[str, Any] = field(default_factory=dict)  # model, calib, text, … copied into every row
    tasks: Suite | None = None  # zero-shot tasks for lm-eval (None: perplexity only)
    ghost: FitOptions | None = None  # the ghost's fit beyond the paper (ridge, affine, rank); None: `eps` only
    token_weights: str = "uniform"
    folds: int = 1
    refit_folds: int = 1  # folds for --refit-ridge cv
    refits: list[RefitOptions | None] = field(default_factory=lambda: [None])  # None: no refit
    held_out: int = 0  # the last windows of `calib` that only the loss criteria see (scoring), never fitted on
    stride: bool = False  # folds = the sources of an interleaved --calib mixture (--folds source)


def refit_label(refit: RefitOptions | None) -> str | None:
    """How a refit variant is named in rows: None (no refit), "4", "all" (+ " ρ=cv", " before" when not default)."""
    if refit is None:
        return None
    text = "all" if refit.layers is None else str(refit.layers)
    text += f" ρ={refit.ridge:g}" if isinstance(refit.ridge, float) and refit.ridge != DEFAULT_RHO else ""
    text += " ρ=cv" if refit.ridge == "cv" else ""
    return text + (" before" if refit.before else "")


def cell_key(row: dict[str, Any]) -> tuple:
    refit = row.get("refit")
    return (row.get("drop"), row.get("select"), row.get("recover"), None if refit == "none" else refit)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of an earlier run; a line cut short by an interruption is ignored."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def run(
    model: PreTrainedModel,
    calib: Tensor,
    held_out: Tensor,
    align: Tensor,
    grid: Grid,
    out: Path,
    progress: bool = True,
    log: Callable[[str], None] = lambda _: None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> list[dict[str, Any]]:
    """Fill `out/results.jsonl` with one row per (drop, select, recover) cell plus the dense model's row.

    With `grid.tasks` (which needs `tokenizer`), every row also gets lm-eval zero-shot accuracy."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS
    rows = read_rows(path)
    if path.is_file():  # drop a row cut short by an interruption, so appended rows start on a line of their own
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = {cell_key(r) for r in rows}
    n = adapter(model).num_layers

    def scores(m: PreTrainedModel) -> dict[str, Any]:
        if not grid.tasks:
            return {}
        return {"accuracy": accuracy(m, tokenizer, grid.tasks, grid.batch_size)}

    def emit(row: dict[str, Any]) -> None:
        row = {**grid.info, **row}
        rows.append(row)
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    base_file = out / DENSE_LOGPROBS  # the dense log-probabilities of the held-out windows, for every row's KL
    if not base_file.is_file():
        store_base(model, held_out, base_file, grid.batch_size, progress)

    def divergence(m: PreTrainedModel) -> dict[str, Any]:
        d = against_stored(base_file, m, held_out, grid.batch_size, progress).as_dict()
        return {"kl_mean": d["kl_mean"], "kl_median": d["kl_median"], "kl_p99": d["kl_p99"],
                "top1_agreement": d["top1_agreement"]}

    if (0, None, "dense", None) not in done:
        result = perplexity(model, held_out, grid.batch_size, progress, desc="dense")
        emit({"drop": 0, "select": None, "recover": "dense", "removed": [], "layers": n,
              "parameters": num_parameters(model), **result, **scores(model), "fit_error": None, "align_error": None})

    need_similarity = not (out / SIMILARITY).is_file()
    fit_calib = calib[: len(calib) - grid.held_out]  # every criterion's fit windows
    usable = []
    for method in grid.methods:  # a method this model cannot take gets rows that say why, not an aborted grid
        try:
            check(method, adapter(model))
            usable.append(method)
        except GhostlayersError as err:
            for drop in grid.drops:
                for select in grid.selects:
                    for refit in grid.refits:
                        if (drop, select, method, refit_label(refit)) not in done:
                            emit({"drop": drop, "select": select, "recover": method, "refit": refit_label(refit),
                                  "error": str(err)})
            log(f"{method}: {err}")
    methods = tuple(m for m in usable if get(m).placement != "nothing")
    for drop in grid.drops:
        for select in grid.selects:
            todo = [(m, r) for m in usable for r in grid.refits if (drop, select, m, refit_label(r)) not in done]
            if not todo:
                continue
            log(f"{select}, drop {drop}: calibrating for {', '.join(dict.fromkeys(m for m, _ in todo))}")
            selection = Selection(select, drop, None, grid.fit, grid.angular_last_token, grid.paper, ghost=grid.ghost,
                                  select_windows=grid.held_out or 4)
            held = calib[len(calib) - grid.held_out:] if criterion(select).held_out else None
            extra = CaptureSpec(cosine=frozenset((i, j) for i in range(n + 1) for j in range(i + 1, n + 1)))
            run_options = RunOptions(grid.batch_size, progress, grid.token_weights, grid.folds, grid.stride)
            stats, plan = calibrate(model, fit_calib, selection, methods, run_options,
                                    extra=extra if need_similarity else CaptureSpec(), held_out=held)
            if need_similarity:
                matrix = [[stats.mean_cos((i, j)) if i < j else (1.0 if i == j else stats.mean_cos((j, i)))
                           for j in range(n + 1)] for i in range(n + 1)]
                (out / SIMILARITY).write_text(json.dumps({"mean_cos": matrix}) + "\n")
                need_similarity = False
            held = capture(model, align, alignment_spec(plan), grid.batch_size, progress=progress)
            for method, refit in todo:
                started = time.perf_counter()
                base = {"drop": drop, "select": select, "recover": method, "refit": refit_label(refit),
                        "removed": list(plan.removed), "layers": n - len(plan.removed),
                        "scores": selection.scores or None, "scored_with": selection.score_with}
                name = method_label(base)
                options = grid.ghost if grid.ghost is not None and "shape" in get(method).uses else grid.eps
                try:
                    passes = (run_options if refit is None
                              else replace(run_options, folds=max(grid.folds, grid.refit_folds)))
                    pruned, operators, refits = repair(model, fit_calib, stats, plan, method, as_fit_options(options),
                                                       refit, passes)
                except GhostlayersError as err:  # e.g. replaceme on a block at layer 0: a row that says why
                    emit({**base, "error": str(err)})
                    log(f"  {name}: {err}")
                    continue
                result = perplexity(pruned, held_out, grid.batch_size, progress, desc=method)
                errors = [e for op in operators for e in op.errors]
                # each fit scored on the input it was fitted for: a sequential fit (or a refit walk) on what the
                # pruned model delivers, a fit from the dense pass (none and replaceme always) on the dense input
                if (plan.sequential and get(method).at_boundary) or refit is not None:
                    align_err = delivered_alignment_errors(model, pruned, align, plan, operators, grid.batch_size)
                else:
                    align_err = alignment_errors(held, operators, plan.blocks())
                emit({**base, "parameters": num_parameters(pruned), **result, **divergence(pruned), **scores(pruned),
                      "fit_error": max(errors) if errors else None, "align_error": align_err,
                      "refit_error": [[r.error_before, r.error_after] for r in refits] or None,
                      "seconds": round(time.perf_counter() - started, 1)})
                log(f"  {name}: perplexity {result['perplexity']:.2f}, KL to dense {rows[-1]['kl_mean']:.4f}, top-1 "
                    f"agreement {rows[-1]['top1_agreement']:.1f}%, held-out alignment error "
                    f"{', '.join(f'{e:.3f}' for e in align_err)}")
                del pruned
    return rows
