"""Issue 14: choosing the layers by what the repaired model loses (`--select loss`, `loss-greedy`) against the
proxies (streamline, shortgpt, ghost, ghost-greedy), each with the ghost and with ghost + refit 2.

    python benchmarks/selection.py [--out docs/selection] [--selects loss,loss-greedy,ghost-greedy]
                                   [--drops 4,6,8] [--held-out 12] [--select-windows 4] [--accuracy 6,8]

SmolLM2-135M (30 layers); calibration: 32 windows of 512 tokens drawn with seed 0 from the calibration half of
`wiki` (the loss criteria draw --select-windows more in the same seeded draw, so their fit windows are these same 32,
and score candidates on the extra ones only); every row is one pruned model scored on the first --held-out windows
of held-out `wiki` and of held-out `news` (a domain the calibration never saw): the settings of
`benchmarks/refit.py`, whose rows for streamline, shortgpt and ghost selection (docs/refit/results.jsonl) this page
compares with. With --accuracy D, the ghost + refit 2 model of each criterion at drop D is also scored on the
offline zero-shot tasks (first 100 items each). Rows are appended to OUT/results.jsonl as they finish (a rerun skips
what is there) and OUT/README.md is rewritten from them and the refit rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ghostlayers.data import calibration_windows, eval_windows
from ghostlayers.evaluate import perplexity
from ghostlayers.models import load_model
from ghostlayers.options import QUIET, RefitOptions
from ghostlayers.pipeline import calibrate, fit_plan, refit_plan, split_held_out
from ghostlayers.report import _layers, markdown_table
from ghostlayers.select import Selection
from ghostlayers.select import get as criterion

TEXTS = ("wiki", "news")
TWO = RefitOptions(2, 0.1)
REFIT_ROWS = Path("docs/refit/results.jsonl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/selection")
    ap.add_argument("--selects", default="loss,loss-greedy,ghost-greedy")
    ap.add_argument("--drops", default="6,8,4")
    ap.add_argument("--held-out", type=int, default=12)
    ap.add_argument("--select-windows", type=int, default=4)
    ap.add_argument("--accuracy", default="", help="drops at which ghost + refit 2 is also scored on the offline tasks")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    if not args.report_only:
        model, tok = load_model("smollm2-135m")
        held = {t: eval_windows(tok, t, args.seq_len, args.held_out) for t in TEXTS}
        suite = None
        accuracy_drops = {int(d) for d in args.accuracy.split(",") if d}
        for drop in [int(d) for d in args.drops.split(",")]:
            for select in args.selects.split(","):
                keys = {(select, drop, v) for v in ("ghost", "ghost + refit 2")}
                scored = {tuple(r["key"]) for r in rows if "accuracy" in r}
                if keys <= {tuple(r["key"]) for r in rows} and (drop not in accuracy_drops
                                                                 or (select, drop, "ghost + refit 2") in scored):
                    continue
                selection = Selection(select, drop, select_windows=args.select_windows)
                extra = args.select_windows if criterion(select).held_out else 0
                windows = calibration_windows(tok, "wiki", 32 + extra, args.seq_len, seed=0)
                fit_windows, held_out = split_held_out(windows, selection)
                started = time.perf_counter()
                stats, plan = calibrate(model, fit_windows, selection, ("ghost",), QUIET, held_out=held_out)
                selected = time.perf_counter() - started
                print(f"{select} {drop}: removes {list(plan.removed)} ({selected:.0f}s)", flush=True)
                for name, refit in (("ghost", None), ("ghost + refit 2", TWO)):
                    key = [select, drop, name]
                    want_accuracy = refit is not None and drop in accuracy_drops
                    if tuple(key) in {tuple(r["key"]) for r in rows} and not want_accuracy:
                        continue
                    if want_accuracy and tuple(key) in scored:
                        continue
                    t0 = time.perf_counter()
                    if refit is None:
                        pruned, _ = fit_plan(model, fit_windows, stats, plan, "ghost", run=QUIET)
                    else:
                        pruned, _, _ = refit_plan(model, fit_windows, stats, plan, "ghost", refit, run=QUIET)
                    fitted = time.perf_counter() - t0
                    row = {"key": key, "removed": list(plan.removed), "fit": plan.fit,
                           "select_seconds": round(selected, 1), "fit_seconds": round(fitted, 1),
                           "scores": selection.scores,
                           **{f"ppl_{t}": perplexity(pruned, w, batch_size=8, progress=False)["perplexity"]
                              for t, w in held.items()}}
                    if want_accuracy:
                        from ghostlayers.zeroshot import accuracy, prepare

                        suite = suite or prepare(["gl_wiki_nextsent", "gl_wiki_lastword"], None, 100, None)
                        row["accuracy"] = accuracy(pruned, tok, suite, 8)
                    rows = [r for r in rows if r["key"] != key] + [row]
                    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
                    print(f"  {name}: wiki {row['ppl_wiki']:.2f}, news {row['ppl_news']:.2f} (fit {fitted:.0f}s)",
                          flush=True)
                    del pruned
    write_report(rows, out)


def _refit_rows() -> list[dict]:
    """The proxies' rows measured with the same settings by benchmarks/refit.py (its main part)."""
    if not REFIT_ROWS.is_file():
        return []
    out = []
    for r in map(json.loads, REFIT_ROWS.read_text().splitlines()):
        if len(r["key"]) != 5:
            continue
        part, select, drop, windows, name = r["key"]
        if part in ("main", "accuracy") and windows == 32 and name in ("ghost", "ghost + refit 2"):
            out.append({"key": [select, drop, name], "removed": r["removed"], "ppl_wiki": r["ppl_wiki"],
                        "ppl_news": r["ppl_news"], "source": "docs/refit",
                        **({"accuracy": r["accuracy"]} if "accuracy" in r else {})})
    return out


def write_report(rows: list[dict], out: Path) -> None:
    refit_rows = _refit_rows()
    everything = {tuple(r["key"]): r for r in refit_rows} | {tuple(r["key"]): r for r in rows}
    drops = sorted({k[1] for k in everything})
    order = ["streamline", "shortgpt", "ghost", "ghost-greedy", "loss", "loss-greedy"]
    body = []
    for drop in drops:
        for select in order:
            alone, refit = everything.get((select, drop, "ghost")), everything.get((select, drop, "ghost + refit 2"))
            if alone is None and refit is None:
                continue
            ref = refit or alone
            cell = lambda r: "–" if r is None else f"{r['ppl_wiki']:.2f} / {r['ppl_news']:.2f}"  # noqa: E731
            body.append([str(drop), select, _layers(ref["removed"]), cell(alone), cell(refit),
                         str(ref.get("select_seconds", "–"))])
    table = markdown_table(["drop", "selection", "removed", "ghost (wiki / news)", "ghost + refit 2 (wiki / news)",
                            "selection s"], body)
    acc = [[str(r["key"][1]), r["key"][0], r["key"][2], f"{100 * r['accuracy']['average']['acc']:.1f}"]
           for r in sorted(refit_rows + rows, key=lambda r: (r["key"][1], r["key"][0])) if "accuracy" in r]
    text = ("# Selection by what the repaired model loses (issue 14)\n\n"
            "Measured with `python benchmarks/selection.py` (settings in its docstring); streamline, shortgpt and ghost "
            "rows are benchmarks/refit.py's (docs/refit/results.jsonl), measured with the same settings.\n\n"
            "Held-out perplexity, SmolLM2-135M, calibrated on 32 × 512 tokens of wiki:\n\n" + table + "\n")
    if acc:
        text += ("\nOffline zero-shot accuracy (two tasks, first 100 items each, mean acc %; ±4–5 points):\n\n"
                 + markdown_table(["drop", "selection", "recovery", "acc"], acc) + "\n")
    findings = out / "findings.md"
    (out / "README.md").write_text((findings.read_text() + "\n" if findings.is_file() else "") + text)
    print(text)


if __name__ == "__main__":
    main()
