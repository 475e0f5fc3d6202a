"""Does a recovery fitted on one domain keep its edge on another? The cross-domain grid of issue 16, SmolLM2-135M.

    python benchmarks/transfer.py [--calibs wiki,news,wiki+news] [--drops 6,8,4] [--selects streamline,shortgpt,ghost]
                                  [--methods ...] [--out docs/transfer] [--report-only]

For each calibration source (`wiki`, `news`, or the mixture `wiki+news`, i.e. `--calib wiki,news`), each drop and
selection: one calibration pass (32 × 512 tokens, seed 0), then every recovery fitted from it and scored on the
held-out parts of *both* texts: perplexity, and each block's alignment error ‖ĥ − Y‖/‖X − Y‖ on held-out windows of
each text (for a boundary fit from the dense pass; a sequential fit is scored on what the pruned model delivers).
Rows go to results.jsonl as they finish (an interrupted run resumes); README.md is the table.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ghostlayers.capture import capture
from ghostlayers.data import calibration_windows, eval_windows
from ghostlayers.evaluate import perplexity
from ghostlayers.models import load_model
from ghostlayers.operators import Moments
from ghostlayers.options import DEFAULT_RHO, FitOptions, RefitOptions, RunOptions, parse_rank, parse_ridge, parse_shrink
from ghostlayers.alignment import alignment_errors, alignment_spec, delivered_alignment_errors
from ghostlayers.pipeline import calibrate, fit_plan, refit_plan
from ghostlayers.recovery import get
from ghostlayers.recovery.ghost import solve_ghost
from ghostlayers.report import markdown_table
from ghostlayers.select import Selection

TEXTS = ("wiki", "news")
@dataclass(frozen=True)
class Variant:
    method: str
    eps: str | None = None  # --eps (None: the method's own default)
    refit: int | None = None  # --refit K
    shrink: str | None = None  # --shrink
    rank: str | None = None  # --rank
    by_source: bool = False  # --folds source: cross-validated choices leave one source out (mixtures only)
    rho: float | str = DEFAULT_RHO  # --refit-ridge

    def refit_options(self) -> RefitOptions | None:
        return None if self.refit is None else RefitOptions(self.refit, self.rho)

    def options(self) -> FitOptions | None:
        if self.eps is None:
            return None
        return FitOptions(parse_ridge(self.eps), rank=parse_rank(self.rank), shrink=parse_shrink(self.shrink))

    def prune(self, model, windows, stats, plan, run: RunOptions) -> tuple:
        """(pruned model, operators): the fit alone, or the fit and the refit."""
        if self.refit is None:
            return fit_plan(model, windows, stats, plan, self.method, self.options(), run)
        pruned, operators, _ = refit_plan(model, windows, stats, plan, self.method, self.refit_options(),
                                          self.options(), run)
        return pruned, operators


METHODS = {
    "none": Variant("none"),
    "prunecomp": Variant("prunecomp"),
    "linearpatch-d": Variant("linearpatch-d"),
    "linearpatch-r": Variant("linearpatch-r"),
    "replaceme": Variant("replaceme"),
    "ghost": Variant("ghost", "1e-6"),
    "ghost rel:1e-2": Variant("ghost", "rel:1e-2"),
    "ghost cv": Variant("ghost", "cv"),
    "ghost cv by source": Variant("ghost", "cv", by_source=True),
    "ghost rank cv": Variant("ghost", "1e-6", rank="cv"),
    "ghost shrink diagonal": Variant("ghost", "1e-6", shrink="diagonal:cv"),
    "ghost shrink diagonal by source": Variant("ghost", "1e-6", shrink="diagonal:cv", by_source=True),
    "ghost shrink scalar": Variant("ghost", "1e-6", shrink="scalar:cv"),
    "ghost + refit 2": Variant("ghost", "1e-6", refit=2),
    "ghost shrink diagonal + refit 2": Variant("ghost", "1e-6", refit=2, shrink="diagonal:cv"),
    "ghost shrink diagonal + refit 2 ρ=1": Variant("ghost", "1e-6", refit=2, shrink="diagonal:cv", rho=1.0),
    "ghost shrink diagonal + refit 2 ρ=cv": Variant("ghost", "1e-6", refit=2, shrink="diagonal:cv", rho="cv"),
}
FOLDS = 4
# folds k, k + 4, …: a mixture's windows alternate between its 2 sources, so folds 0 and 2 are one source, 1 and 3
# the other (the two summed: leave-one-source-out, BY_SOURCE_RUN)
RUN = RunOptions(8, False, "uniform", FOLDS, stride=True)
BY_SOURCE_RUN = RunOptions(8, False, "uniform", 2, stride=True)


def fitted_kinds(labels: list[str]) -> tuple[str, ...]:
    """The recovery methods whose sums the calibration pass must capture for these variants."""
    return tuple(dict.fromkeys(METHODS[m].method for m in labels if get(METHODS[m].method).placement != "nothing"))
BLOCK_FIT = "ghost, blocks fitted from the dense pass"  # for a scattered selection, against the sequential fit


def key(row: dict) -> tuple:
    return row["calib"], row["drop"], row["select"], row["method"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibs", default="wiki,news,wiki+news")
    ap.add_argument("--drops", default="6,8,4")
    ap.add_argument("--selects", default="streamline,shortgpt,ghost")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=8, help="held-out windows of each text")
    ap.add_argument("--align-windows", type=int, default=4, help="held-out windows of each text for alignment errors")
    ap.add_argument("--out", default="docs/transfer")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    if not args.report_only:
        run(args, path, rows)
    write_page(out, rows, args)


def run(args: argparse.Namespace, path: Path, rows: list[dict]) -> None:
    done = {key(r) for r in rows}
    model, tok = load_model("smollm2-135m")
    # the evaluation windows come after those used for alignment errors: the two never overlap
    both = {t: eval_windows(tok, t, args.seq_len, args.eval_windows + args.align_windows) for t in TEXTS}
    evals = {t: w[: args.eval_windows] for t, w in both.items()}
    aligns = {t: w[args.eval_windows:] for t, w in both.items()}

    def emit(row: dict) -> None:
        rows.append(row)
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k not in ("removed",)}), flush=True)

    if ("-", 0, "-", "dense") not in done:
        emit({"calib": "-", "drop": 0, "select": "-", "method": "dense",
              **{f"ppl_{t}": perplexity(model, w, progress=False)["perplexity"] for t, w in evals.items()}})
    methods = [m for m in args.methods.split(",")]
    for drop in map(int, args.drops.split(",")):
        for select in args.selects.split(","):
            for calib in args.calibs.split(","):
                mixed = "+" in calib
                todo = [m for m in methods if (calib, drop, select, m) not in done and (mixed or not METHODS[m].by_source)]
                if not todo:
                    continue
                started = time.perf_counter()
                windows = calibration_windows(tok, calib.replace("+", ","), args.calib_samples, args.seq_len, seed=0)
                run_options = RUN
                stats, plan = calibrate(model, windows, Selection(select, drop), fitted_kinds(todo), run_options)
                held = {t: capture(model, w, alignment_spec(plan), 8, progress=False) for t, w in aligns.items()}
                print(f"{calib} {select} {drop}: removes {list(plan.removed)} ({plan.fit}), "
                      f"{time.perf_counter() - started:.0f}s", flush=True)
                by_source_stats = replace(stats, folds=[stats.folds[0] + stats.folds[2], stats.folds[1] + stats.folds[3]])
                for label in todo:
                    variant = METHODS[label]
                    method, refit_layers, options = variant.method, variant.refit, variant.options()
                    fit_stats, fit_run = (by_source_stats, BY_SOURCE_RUN) if variant.by_source else (stats, run_options)
                    t0 = time.perf_counter()
                    pruned, operators = variant.prune(model, windows, fit_stats, plan, fit_run)
                    row = {"calib": calib, "drop": drop, "select": select, "method": label,
                           "removed": list(plan.removed), "fit": plan.fit,
                           "eps": [op.eps for op in operators if op.eps is not None] or None}
                    if (variant.shrink or variant.rank) and not plan.sequential:  # what each boundary chose
                        fits = [solve_ghost(Moments.of(fit_stats, i, j), options,
                                            [Moments.of(f, i, j) for f in fit_stats.folds])
                                for block in plan.blocks() for i, j in plan.fit_pairs(block)]
                        row["alpha"] = [f.alpha for f in fits] if variant.shrink else None
                        row["rank"] = [len(f.m) if f.factors is None else f.factors[1].shape[0] for f in fits]
                    for t in TEXTS:
                        row[f"ppl_{t}"] = perplexity(pruned, evals[t], progress=False)["perplexity"]
                        if (plan.sequential and get(method).at_boundary) or refit_layers is not None:
                            row[f"align_{t}"] = delivered_alignment_errors(model, pruned, aligns[t], plan, operators)
                        else:
                            row[f"align_{t}"] = alignment_errors(held[t], operators, plan.blocks())
                    row["seconds"] = round(time.perf_counter() - t0, 1)
                    emit(row)
                    del pruned
                if plan.sequential and len(plan.blocks()) > 1 and (calib, drop, select, BLOCK_FIT) not in done:
                    # does the sequential fit amplify the domain gap? the same layers, each block fitted from the
                    # dense pass (on the dense model's states) instead of on what the pruned model delivers
                    t0 = time.perf_counter()
                    dense_stats, dense_plan = calibrate(model, windows, Selection("manual", drop, list(plan.removed),
                                                                                  fit="block"), ("ghost",), run_options)
                    pruned, operators = fit_plan(model, windows, dense_stats, dense_plan, "ghost", None, run_options)
                    held_dense = {t: capture(model, w, alignment_spec(dense_plan), 8, progress=False)
                                  for t, w in aligns.items()}
                    row = {"calib": calib, "drop": drop, "select": select, "method": BLOCK_FIT,
                           "removed": list(plan.removed), "fit": dense_plan.fit}
                    for t in TEXTS:
                        row[f"ppl_{t}"] = perplexity(pruned, evals[t], progress=False)["perplexity"]
                        row[f"align_{t}"] = alignment_errors(held_dense[t], operators, dense_plan.blocks())
                    row["seconds"] = round(time.perf_counter() - t0, 1)
                    emit(row)
                    del pruned


def write_page(out: Path, rows: list[dict], args: argparse.Namespace) -> None:
    dense = next((r for r in rows if r["method"] == "dense"), None)
    cells = sorted({(r["drop"], r["select"]) for r in rows if r["drop"]}, key=lambda c: (c[0], c[1]))
    calibs = [c for c in args.calibs.split(",")]
    methods = [m for m in [*METHODS, BLOCK_FIT] if any(r["method"] == m for r in rows)]
    lines = ["# Recovery across domains (issue 16)", "",
             f"`python benchmarks/transfer.py` (SmolLM2-135M, calibration {args.calib_samples} × {args.seq_len} tokens with seed 0 from `wiki`, "
             f"`news` or the mixture `wiki+news` (`--calib wiki,news`: {args.calib_samples // 2} windows of each), held-out perplexity on "
             f"{args.eval_windows} windows of {args.seq_len} tokens of each text; a cell is wiki / news perplexity, **bold** the "
             "best recovery of its column)."]
    if dense:
        lines += ["", f"Dense: {dense['ppl_wiki']:.2f} / {dense['ppl_news']:.2f}."]
    lines += ["", "What the grid shows and what became the default: [findings.md](findings.md). The same fits on a third "
              "domain no calibration saw (Usenet posts): [third.md](third.md) (`benchmarks/transfer_third.py`). "
              "`ghost` is the paper's fit; `ghost shrink diagonal + refit 2` is what `prune` does by default."]
    by = {key(r): r for r in rows}
    for drop, select in cells:
        present = [c for c in calibs if any(by.get((c, drop, select, m)) for m in methods)]
        removed = {c: next((by[(c, drop, select, m)]["removed"] for m in methods if (c, drop, select, m) in by), None)
                   for c in present}
        lines += ["", f"## {select}, {drop} layers", "",
                  "removed: " + "; ".join(f"{c}: {removed[c]}" for c in present), ""]
        head = ["recovery"] + [f"calib {c}: wiki / news" for c in present]
        best = {}
        for c in present:
            for t in TEXTS:
                values = [by[(c, drop, select, m)][f"ppl_{t}"] for m in methods
                          if (c, drop, select, m) in by and m != "none"]
                best[(c, t)] = min(values) if values else None
        body = []
        for m in methods:
            cells_m = []
            for c in present:
                r = by.get((c, drop, select, m))
                if r is None:
                    cells_m.append("-")
                    continue
                parts = []
                for t in TEXTS:
                    v = r[f"ppl_{t}"]
                    parts.append(f"**{v:.2f}**" if m != "none" and v == best[(c, t)] else f"{v:.2f}")
                cells_m.append(" / ".join(parts))
            body.append([m] + cells_m)
        lines.append(markdown_table(head, body))
    # alignment errors, in and out of the calibration domain
    lines += ["", "## Alignment error in and out of domain", "",
              "Mean over blocks of ‖ĥ − Y‖/‖X − Y‖ on held-out windows of each text (1 = no better than no recovery; "
              "a sequential or refitted model scored on what it delivers)."]
    for drop, select in cells:
        present = [c for c in calibs if any(by.get((c, drop, select, m)) for m in methods)]
        body = []
        for m in methods:
            if m in ("none",):
                continue
            cells_m = []
            for c in present:
                r = by.get((c, drop, select, m))
                mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
                cells_m.append("-" if r is None or "align_wiki" not in r else
                               f"{mean(r['align_wiki']):.3f} / {mean(r['align_news']):.3f}")
            body.append([m] + cells_m)
        lines += ["", f"### {select}, {drop} layers", "",
                  markdown_table(["recovery"] + [f"calib {c}: wiki / news" for c in present], body)]
    # which recovery is best, or within 1% of the best, in how many cells
    lines += ["", "## Best or within 1% of the best", "",
              "Count of (calibration, drop, selection, text) cells where each recovery's perplexity is the lowest of "
              "the recoveries in that cell or within 1% of it; in domain = the text is (part of) the calibration."]
    def tallied(pool: list[str]) -> list[list[str]]:
        tally: dict[str, list[int]] = {m: [0, 0, 0, 0] for m in pool}
        for drop, select in cells:
            for c in calibs:
                for t in TEXTS:
                    values = {m: by[(c, drop, select, m)][f"ppl_{t}"] for m in pool if (c, drop, select, m) in by}
                    if not values:
                        continue
                    best = min(values.values())
                    inside = t in c.split("+")
                    for m, v in values.items():
                        tally[m][0 if inside else 2] += 1
                        tally[m][1 if inside else 3] += v <= 1.01 * best
        return [[m, f"{a[1]}/{a[0]}", f"{a[3]}/{a[2]}"] for m, a in tally.items()]

    lines += ["", "All recoveries:", "",
              markdown_table(["recovery", "in domain", "out of domain"], tallied([m for m in methods if m != "none"])),
              "", "At the boundary only (no refit, no second pass): does the ghost keep its edge over the constrained "
              "baselines?", "",
              markdown_table(["recovery", "in domain", "out of domain"],
                             tallied([m for m in methods if m != "none" and "refit" not in m and m != BLOCK_FIT]))]
    (out / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
