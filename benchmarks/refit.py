"""Issue 12: does refitting the kept layers after each boundary (`--refit`) help, where, and how much?

    python benchmarks/refit.py [--out docs/refit] [--parts main,k,rho,before,windows,accuracy] [--drops 4,6,8]
                               [--selects streamline,shortgpt,ghost] [--held-out 12]

SmolLM2-135M (30 layers), calibration: 32 windows of 512 tokens drawn with seed 0 from the calibration half of
`wiki`; every row is one pruned model scored on the first --held-out windows of held-out `wiki` (the domain
calibrated on) and of held-out `news` (a domain the calibration never saw). Rows are appended to OUT/results.jsonl
as they finish (a rerun skips what is there) and OUT/README.md is rewritten from them (with OUT/findings.md, written
by hand from the tables, on top).

parts:
  main      per (selection, drop): none, procrustes, ghost, each alone, + refit of 2 kept layers after each
            boundary, and (ghost; all three at drop 6) + refit of every kept layer after the first boundary (ρ = 0.1)
  k         ghost + refit of K = 1, 2, 4 layers after each boundary (drop 6)
  rho       refit 2 with ρ = 0.01, 1 and cv (chosen per matrix by 4-fold cross-validation over windows), and
            refit all with ρ = 1 (drop 6)
  before    refit 2 + --refit-before: layer s − 1's down_proj refitted to deliver the block's end (drop 6)
  windows   128 calibration windows instead of 32 (drop 6)
  (run in this order: --parts main,k,rho --drops 6; --parts main --drops 8,4; --selects ghost --drops 8;
  --parts accuracy,windows,before --selects streamline,shortgpt)
  accuracy  the offline zero-shot tasks (first 100 items each): ghost, ghost + refit 2, none + refit 2 (drop 6)
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ghostlayers.data import calibration_windows, eval_windows
from ghostlayers.evaluate import perplexity
from ghostlayers.models import load_model
from ghostlayers.pipeline import Selection, calibrate, fit_plan, refit_plan
from ghostlayers.options import RefitOptions
from ghostlayers.report import _layers, markdown_table
from ghostlayers.options import QUIET, RunOptions

TEXTS = ("wiki", "news")


class Runner:
    def __init__(self, out: Path, held: dict[str, torch.Tensor]):
        self.path = out / "results.jsonl"
        self.rows = [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.is_file() else []
        self.done = {tuple(r["key"][1:]) for r in self.rows}  # a variant measured under one part serves every part
        self.scored = {tuple(r["key"][1:]) for r in self.rows if "accuracy" in r}  # ... but accuracy needs its own
        self.held = held

    def row(self, key: tuple, make: Callable[[], tuple], suite=None, tokenizer=None, **info) -> None:
        """Score the model `make` returns ((model, operators, refits)) unless `key` is already done (with accuracy,
        when `suite` asks for it; such a row replaces the one without in the report)."""
        if tuple(key[1:]) in (self.done if suite is None else self.scored):
            return
        started = time.perf_counter()
        model, ops, refits = make()
        fitted = time.perf_counter() - started
        ppl = {t: perplexity(model, w, batch_size=8, progress=False)["perplexity"] for t, w in self.held.items()}
        row = {"key": list(key), **{f"ppl_{t}": v for t, v in ppl.items()}, "fit_seconds": round(fitted, 1),
               "refits": [r.as_dict() for r in refits], **info}
        if suite is not None:
            from ghostlayers.zeroshot import accuracy

            row["accuracy"] = accuracy(model, tokenizer, suite, 8)
            row["accuracy_settings"] = "offline tasks, first 100 items each"
        self.rows.append(row)
        self.done.add(tuple(key[1:]))
        if suite is not None:
            self.scored.add(tuple(key[1:]))
        with self.path.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        print(f"{key}: " + ", ".join(f"{t} {v:.2f}" for t, v in ppl.items()) + f" (fit {fitted:.0f}s)", flush=True)


class Cells:
    """One calibration pass per (selection, drop, windows), reused by every variant of that cell."""

    def __init__(self, model, tok, seq_len: int):
        self.model, self.tok, self.seq_len = model, tok, seq_len
        self.cache: dict[tuple, tuple] = {}

    def get(self, select: str, drop: int, windows: int = 32):
        key = (select, drop, windows)
        if key not in self.cache:
            calib = calibration_windows(self.tok, "wiki", windows, self.seq_len, seed=0)
            stats, plan = calibrate(self.model, calib, Selection(select, drop),
                                    methods=("ghost", "procrustes"), run=RunOptions(progress=False, folds=4))
            self.cache = {key: (calib, stats, plan)}  # one at a time: the sums of every candidate are large
        return self.cache[key]


def variant(cells: Cells, select: str, drop: int, method: str, refit: RefitOptions | None, windows: int = 32):
    def make():
        calib, stats, plan = cells.get(select, drop, windows)
        folds = 4 if refit is not None and refit.ridge == "cv" else 1
        if refit is None:
            model, ops = fit_plan(cells.model, calib, stats, plan, method, run=QUIET)
            return model, ops, []
        return refit_plan(cells.model, calib, stats, plan, method, refit, run=RunOptions(progress=False, folds=folds))

    return make


def label(method: str, refit: RefitOptions | None) -> str:
    if refit is None:
        return method
    what = "all" if refit.layers is None else str(refit.layers)
    return f"{method} + refit {what}" + (f" ρ={refit.ridge}" if refit.ridge != 0.1 else "") + (
        " + before" if refit.before else "")


def run_cell(run: Runner, cells: Cells, part: str, select: str, drop: int, method: str, refit: RefitOptions | None,
             windows: int = 32, **extra) -> None:
    key = (part, select, drop, windows, label(method, refit))
    if key[1:] in (run.done if extra.get("suite") is None else run.scored):
        return
    make = variant(cells, select, drop, method, refit, windows)
    plan = cells.get(select, drop, windows)[2]
    run.row(key, make, removed=list(plan.removed), **extra)


ALL = RefitOptions(None, 0.1)
TWO = RefitOptions(2, 0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/refit")
    ap.add_argument("--drops", default="6,4,8")
    ap.add_argument("--selects", default="streamline,shortgpt,ghost")
    ap.add_argument("--parts", default="main,k,rho,before,windows,accuracy")
    ap.add_argument("--held-out", type=int, default=12, help="held-out windows scored per text")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--report-only", action="store_true", help="rewrite OUT/README.md from results.jsonl, run nothing")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        write_readme(out, [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()], args)
        return
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    run = Runner(out, {t: eval_windows(tok, t, args.seq_len, args.held_out) for t in TEXTS})
    cells = Cells(model, tok, args.seq_len)
    parts = args.parts.split(",")
    drops = [int(d) for d in args.drops.split(",")]
    selects = args.selects.split(",")
    run.row(("dense",), lambda: (model, [], []))
    for part in parts:
        for drop in drops if part == "main" else [6]:
            for select in selects:
                if part == "main":
                    for method in ("none", "procrustes", "ghost"):
                        for refit in (None, TWO, ALL) if method == "ghost" or drop == 6 else (None, TWO):
                            run_cell(run, cells, part, select, drop, method, refit)
                elif part == "k":
                    for k in (1, 2, 4):
                        run_cell(run, cells, part, select, drop, "ghost", RefitOptions(k, 0.1))
                elif part == "rho":
                    for rho in (0.01, 1.0, "cv"):
                        run_cell(run, cells, part, select, drop, "ghost", RefitOptions(2, rho))
                    run_cell(run, cells, part, select, drop, "ghost", RefitOptions(None, 1.0))
                elif part == "before" and select != "ghost":
                    for method in ("none", "ghost"):
                        run_cell(run, cells, part, select, drop, method, RefitOptions(2, 0.1, before=True))
                elif part == "windows" and select != "ghost":
                    for method, refit in (("ghost", None), ("ghost", TWO), ("none", TWO)):
                        run_cell(run, cells, part, select, drop, method, refit, windows=128)
                elif part == "accuracy" and select != "ghost":
                    from ghostlayers.zeroshot import prepare

                    suite = prepare(["gl_wiki_nextsent", "gl_wiki_lastword"], None, 100, None)
                    for method, refit in (("ghost", None), ("ghost", TWO), ("none", TWO)):
                        run_cell(run, cells, part, select, drop, method, refit, suite=suite, tokenizer=tok)
        write_readme(out, run.rows, args)
    write_readme(out, run.rows, args)


def write_readme(out: Path, rows: list[dict], args: argparse.Namespace) -> None:
    findings = out / "findings.md"
    text = report(rows, args.held_out, args.seq_len)
    (out / "README.md").write_text((findings.read_text() + "\n" if findings.is_file() else "") + text)


def report(rows: list[dict], held_out: int, seq_len: int) -> str:
    dense = next((r for r in rows if r["key"] == ["dense"]), None)
    lines = ["# Refit results (generated by `python benchmarks/refit.py`)", "",
             f"Perplexity on the first {held_out} held-out windows of {seq_len} tokens of `wiki` (the calibration "
             "domain) and of `news` (never seen in calibration); calibration 32 × 512 tokens of `wiki` (seed 0) unless "
             "the heading says 128. ρ = 0.1 unless a label says otherwise. Δ: against the ghost alone in the same cell "
             "(negative is better). acc: mean accuracy of the two offline tasks, first 100 items each (±4–5 points).",
             ""]
    if dense:
        lines.append(f"Dense: wiki {dense['ppl_wiki']:.2f}, news {dense['ppl_news']:.2f}.\n")
    latest = {tuple(r["key"][1:]): r for r in rows if r["key"] != ["dense"]}  # a rerun's row replaces the earlier
    cells = sorted({k[:3] for k in latest}, key=lambda c: (c[2], c[0], c[1]))
    for select, drop, windows in cells:
        group = [r for k, r in latest.items() if k[:3] == (select, drop, windows)]
        group.sort(key=lambda r: (r["key"][4].split(" ")[0], r["key"][4]))
        ghost = latest.get((select, drop, windows, "ghost"))
        removed = _layers(group[0].get("removed", []))
        lines += [f"## {select}, {drop} layers removed ({removed}), {windows} calibration windows", ""]
        body = []
        for r in group:
            delta = lambda t: f"{r[f'ppl_{t}'] - ghost[f'ppl_{t}']:+.2f}" if ghost else "-"  # noqa: E731
            acc = (r.get("accuracy") or {}).get("average", {}).get("acc")
            body.append([r["key"][4], f"{r['ppl_wiki']:.2f}", delta("wiki"), f"{r['ppl_news']:.2f}", delta("news"),
                         "-" if acc is None else f"{100 * acc:.1f}", str(r.get("fit_seconds", "-"))])
        lines += [markdown_table(["recovery", "wiki", "Δ wiki", "news", "Δ news", "acc", "fit s"], body), ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
