"""Issue 6: what recovers more than the paper's ghost? Held-out `wiki` perplexity on SmolLM2-135M (30 layers).

    python benchmarks/beyond_paper.py [--out docs/beyond-paper] [--drops 4,6,8] [--selects streamline,shortgpt]
                                      [--parts base,weights,sequential,selection,windows]

Every row is one pruned model scored on the same held-out windows; rows are appended to OUT/results.jsonl as they
finish (a rerun skips what is there) and OUT/README.md is rewritten from them. The paper's ghost is ε = 1e-6
(absolute), fitted on 32 windows of 512 tokens drawn with seed 0 from the calibration half of `wiki`.

parts:
  base        per (selection, drop): none, prunecomp, procrustes (folded), the paper's ghost, ε relative to
              tr(XᵀX)/C (1e-4 … 1e-1), ε by GCV and by 4-fold CV over windows, affine, ranks 32 and 128 — all from one pass
  weights     massive activations: position 0's share of Σ‖h‖², and the ghost fitted with skip-first / clip weights
  sequential  the paper's per-layer fit on the dense model vs --fit sequential, for scattered selections
  selection   --select ghost (contiguous) and ghost-greedy (+ sequential fit) against streamline and shortgpt
  windows     8, 32, 128 calibration windows, paper ε vs relative ε vs GCV (streamline and shortgpt, drop 6)
  ranks       quality against rank (8 … 512 of 576) for streamline and shortgpt at drop 6; plots rank.png
  accuracy    the offline zero-shot tasks (first 100 items each) for the dense model and the main variants at drop 6
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ghostlayers.capture import CaptureSpec, capture
from ghostlayers.data import calibration_windows, eval_windows
from ghostlayers.evaluate import perplexity
from ghostlayers.models import load_model
from ghostlayers.options import FitOptions, Ridge
from ghostlayers.pipeline import Selection, calibrate, fit_sequential, recover
from ghostlayers.report import markdown_table
from ghostlayers.options import QUIET, RunOptions

RELATIVE = (1e-4, 1e-3, 1e-2, 1e-1)
# clip's threshold is each window's median token norm (an earlier run's per-batch median rows stay in the jsonl)
PAPER_FIT = "layer"  # the rows labelled "paper" fit scattered removals per layer (the default is now sequential)
WEIGHT_KEYS = {"skip-first": "ghost skip-first", "clip": "ghost clip per window"}
RANKS = (32, 128)
WINDOWS = (8, 32, 128)


class Runner:
    def __init__(self, out: Path, held: torch.Tensor):
        self.out = out
        self.path = out / "results.jsonl"
        self.rows = [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.is_file() else []
        self.done = {tuple(r["key"]) for r in self.rows}
        self.held = held

    def row(self, key: tuple, make: Callable[[], tuple], **info) -> None:
        """Score the model `make` returns ((model, operators)) unless `key` is already done."""
        if tuple(key) in self.done:
            return
        started = time.perf_counter()
        model, ops = make()
        ppl = perplexity(model, self.held, batch_size=8, progress=False)["perplexity"]
        eps = [e for op in ops for e in op.eps]
        row = {"key": list(key), "perplexity": ppl, "eps": eps, "fit_error": [e for op in ops for e in op.errors],
               "seconds": round(time.perf_counter() - started, 1), **info}
        self.rows.append(row)
        self.done.add(tuple(key))
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{key}: {ppl:.2f} ({row['seconds']}s)", flush=True)

    def note(self, key: tuple, **info) -> None:
        if tuple(key) in self.done:
            return
        self.rows.append({"key": list(key), **info})
        self.done.add(tuple(key))
        with self.path.open("a") as f:
            f.write(json.dumps(self.rows[-1]) + "\n")


def fit_mode(plan) -> str:
    return "layer" if plan.per_layer else "block"


def base(run: Runner, model, calib, select: str, drop: int) -> None:
    sel = Selection(select, drop, fit=PAPER_FIT)
    stats, plan = calibrate(model, calib, sel, methods=("ghost", "procrustes"), run=RunOptions(progress=False, folds=4))
    removed = list(plan.removed)
    info = {"removed": removed, "per_layer": plan.per_layer}
    k = ("base", select, drop)
    run.row(k + ("none",), lambda: (recover(model, stats, plan, "none")[0], []), **info)
    for method in ("prunecomp", "procrustes"):
        run.row(k + (method,), lambda m=method: recover(model, stats, plan, m), **info)
    run.row(k + ("ghost (paper)",), lambda: recover(model, stats, plan, "ghost"), **info)
    for mode in ("gcv", "cv"):
        run.row(k + (f"ghost eps {mode}",), lambda m=mode: recover(model, stats, plan, "ghost", Ridge(m, 0)), **info)
    for r in RELATIVE:
        run.row(k + (f"ghost eps rel:{r:g}",), lambda r=r: recover(model, stats, plan, "ghost", Ridge("relative", r)), **info)
    run.row(k + ("ghost affine",), lambda: recover(model, stats, plan, "ghost", options=FitOptions(affine=True)), **info)
    for r in RANKS:
        run.row(k + (f"ghost rank {r}",), lambda r=r: recover(model, stats, plan, "ghost", options=FitOptions(rank=r)),
                **info)


def weights(run: Runner, model, calib, select: str, drop: int) -> None:
    _, plan = calibrate(model, calib, Selection(select, drop, fit=PAPER_FIT), methods=(), run=QUIET)
    removed = list(plan.removed)
    s, e = plan.blocks()[0]
    k = ("weights", select, drop)
    if k + ("share",) not in run.done:  # how much of the fit position 0 carries, at the first block's input
        acc = capture(model, calib[:, :1], CaptureSpec(grams=frozenset({s})), progress=False)
        full = capture(model, calib, CaptureSpec(grams=frozenset({s})), progress=False)
        run.note(k + ("share",), block=[s, e], sumsq_share=float(acc.sumsq[s] / full.sumsq[s]),
                 gram_trace_share=float(torch.trace(acc.gram[s]) / torch.trace(full.gram[s])))
    for weighting in ("skip-first", "clip"):
        def make(w=weighting):
            st, pl = calibrate(model, calib, Selection("manual", drop, removed, fit_mode(plan)), run=RunOptions(progress=False, token_weights=w))
            return recover(model, st, pl, "ghost")

        run.row(k + (WEIGHT_KEYS[weighting],), make, removed=removed)


def sequential(run: Runner, model, calib, select: str, drop: int) -> None:
    sel = Selection(select, drop, fit=PAPER_FIT)
    stats, plan = calibrate(model, calib, sel, run=QUIET)
    if len(plan.blocks()) == 1 and not plan.per_layer:
        return  # one contiguous block fitted as a block: sequential is the same fit
    removed = list(plan.removed)
    k = ("sequential", select, drop)
    run.row(k + ("ghost (paper, per layer)",), lambda: recover(model, stats, plan, "ghost"), removed=removed)
    seq_plan = Selection("manual", drop, removed, "sequential")
    st, pl = calibrate(model, calib, seq_plan, methods=(), run=QUIET)
    run.row(k + ("ghost sequential",), lambda: fit_sequential(model, calib, pl, "ghost", run=QUIET), removed=removed)
    run.row(k + ("ghost sequential rel:1e-2",),
            lambda: fit_sequential(model, calib, pl, "ghost", Ridge("relative", 1e-2), run=QUIET), removed=removed)


def selection(run: Runner, model, calib, drop: int) -> None:
    k = ("selection", "ghost", drop)
    sel = Selection("ghost", drop)
    stats, plan = calibrate(model, calib, sel, run=QUIET)
    run.row(k + ("ghost",), lambda: recover(model, stats, plan, "ghost"), removed=list(plan.removed))
    k = ("selection", "ghost-greedy", drop)
    if all(k + (v,) in run.done for v in ("ghost (paper, per layer)", "ghost sequential")):
        return
    sel = Selection("ghost-greedy", drop)
    stats, plan = calibrate(model, calib, sel, run=QUIET)
    removed = list(plan.removed)
    run.row(k + ("ghost (paper, per layer)",), lambda: recover(model, stats, plan, "ghost"), removed=removed,
            order=sel.scores)
    seq = Selection("manual", drop, removed, "sequential")
    _, pl = calibrate(model, calib, seq, methods=(), run=QUIET)
    run.row(k + ("ghost sequential",), lambda: fit_sequential(model, calib, pl, "ghost", run=QUIET), removed=removed)


def windows(run: Runner, model, tok, select: str, drop: int, seq_len: int) -> None:
    _, plan = calibrate(model, calibration_windows(tok, "wiki", 32, seq_len, seed=0), Selection(select, drop, fit=PAPER_FIT), methods=(), run=QUIET)
    removed = list(plan.removed)
    for n in WINDOWS:
        k = ("windows", select, drop, n)
        todo = [v for v in ("paper", "rel:1e-2", "gcv") if k + (v,) not in run.done]
        if not todo:
            continue
        calib = calibration_windows(tok, "wiki", n, seq_len, seed=0)
        stats, pl = calibrate(model, calib, Selection("manual", drop, removed, fit_mode(plan)), run=QUIET)
        for v, ridge in (("paper", Ridge()), ("rel:1e-2", Ridge("relative", 1e-2)), ("gcv", Ridge("gcv", 0))):
            run.row(k + (v,), lambda r=ridge: recover(model, stats, pl, "ghost", r), removed=removed)


ALL_RANKS = (8, 16, 32, 64, 128, 256, 384, 512)


def ranks(run: Runner, model, calib, select: str, drop: int) -> None:
    stats, plan = calibrate(model, calib, Selection(select, drop, fit=PAPER_FIT), run=QUIET)
    for r in ALL_RANKS:
        if ("base", select, drop, f"ghost rank {r}") in run.done:
            continue
        run.row(("rank", select, drop, r), lambda r=r: recover(model, stats, plan, "ghost", options=FitOptions(rank=r)))


def rank_curve(rows: list[dict], select: str, drop: int) -> list[tuple[int, float]]:
    """(rank, perplexity) for one cell, from the rank part and the base part (full rank = the paper's ghost)."""
    by = {tuple(r["key"]): r for r in rows}
    full = by.get(("base", select, drop, "ghost (paper)"))
    points = [(r, (by.get(("rank", select, drop, r)) or by.get(("base", select, drop, f"ghost rank {r}")) or {}).get("perplexity"))
              for r in ALL_RANKS]
    points = [(r, p) for r, p in points if p is not None]
    return points + ([(576, full["perplexity"])] if full else [])


def plot_ranks(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {tuple(r["key"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(6, 4))
    for select in ("streamline", "shortgpt"):
        points = rank_curve(rows, select, 6)
        if len(points) < 2:
            continue
        line = ax.plot([r for r, _ in points], [p for _, p in points], marker="o", label=f"{select} 6: ghost of rank r")
        none = by.get(("base", select, 6, "none"))
        if none:
            ax.axhline(none["perplexity"], ls=":", color=line[0].get_color(), label=f"{select} 6: no recovery")
    if ("dense",) in by:
        ax.axhline(by[("dense",)]["perplexity"], ls="--", color="gray", label="dense")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank r of M (C = 576: full rank is the paper's ghost)")
    ax.set_ylabel("held-out wiki perplexity")
    ax.set_title("SmolLM2-135M, 6 of 30 layers removed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def accuracy_part(run: Runner, model, tok, calib) -> None:
    from ghostlayers.tasks import expand
    from ghostlayers.zeroshot import accuracy, prepare

    suite = prepare(expand("offline"), limit=100)

    def score(key: tuple, make: Callable[[], tuple]) -> None:
        if key in run.done:
            return
        started = time.perf_counter()
        m, _ = make()
        result = accuracy(m, tok, suite, batch_size=8)
        run.note(key, accuracy=result, seconds=round(time.perf_counter() - started))
        print(f"{key}: {result['average']}", flush=True)

    score(("accuracy", "dense"), lambda: (model, []))
    stats, plan = calibrate(model, calib, Selection("streamline", 6), methods=("ghost", "procrustes"), run=QUIET)
    for name, make in {
        "none": lambda: (recover(model, stats, plan, "none")[0], []),
        "ghost (paper)": lambda: recover(model, stats, plan, "ghost"),
        "procrustes": lambda: recover(model, stats, plan, "procrustes"),
    }.items():
        score(("accuracy", "streamline", 6, name), make)
    stats, plan = calibrate(model, calib, Selection("shortgpt", 6, fit=PAPER_FIT), run=QUIET)
    score(("accuracy", "shortgpt", 6, "ghost (paper, per layer)"), lambda: recover(model, stats, plan, "ghost"))
    seq = Selection("manual", 6, list(plan.removed), "sequential")
    _, pl = calibrate(model, calib, seq, methods=(), run=QUIET)
    score(("accuracy", "shortgpt", 6, "ghost sequential"), lambda: fit_sequential(model, calib, pl, "ghost", run=QUIET))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/beyond-paper")
    ap.add_argument("--drops", default="4,6,8")
    ap.add_argument("--selects", default="streamline,shortgpt")
    ap.add_argument("--parts", default="base,weights,sequential,selection,windows")
    ap.add_argument("--held-out", type=int, default=12, help="held-out windows scored")
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
    calib = calibration_windows(tok, "wiki", 32, args.seq_len, seed=0)
    run = Runner(out, eval_windows(tok, "wiki", args.seq_len, args.held_out))
    parts = args.parts.split(",")
    drops = [int(d) for d in args.drops.split(",")]
    selects = args.selects.split(",")
    run.row(("dense",), lambda: (model, []))
    for select in selects:
        for drop in drops:
            if "base" in parts:
                base(run, model, calib, select, drop)
            if "weights" in parts:
                weights(run, model, calib, select, drop)
            if "sequential" in parts:
                sequential(run, model, calib, select, drop)
    if "selection" in parts:
        for drop in drops:
            selection(run, model, calib, drop)
    if "windows" in parts:
        for select in selects:
            windows(run, model, tok, select, 6, args.seq_len)
    if "ranks" in parts:
        for select in selects:
            ranks(run, model, calib, select, 6)
    if "accuracy" in parts:
        accuracy_part(run, model, tok, calib)
    write_readme(out, run.rows, args)


def write_readme(out: Path, rows: list[dict], args: argparse.Namespace) -> None:
    text = report(rows, args.held_out, args.seq_len)
    if any(len(rank_curve(rows, sel, 6)) > 3 for sel in ("streamline", "shortgpt")):
        plot_ranks(rows, out / "rank.png")
    findings = out / "findings.md"  # written by hand from the tables: what helped, what did not, what is default
    (out / "README.md").write_text((findings.read_text() + "\n" if findings.is_file() else "") + text)
    print(text)


def report(rows: list[dict], held_out: int, seq_len: int) -> str:
    """The tables of docs/beyond-paper/README.md, from the rows (whatever parts have run)."""
    by = {tuple(r["key"]): r for r in rows}
    ppl = lambda key: f"{by[key]['perplexity']:.2f}" if key in by else "-"  # noqa: E731
    cells = [(sel, d) for sel in ("streamline", "shortgpt") for d in (4, 6, 8)]
    heads = [f"{sel} {d}" for sel, d in cells]
    out = [f"Held-out `wiki` perplexity of SmolLM2-135M (30 layers), {held_out} windows of {seq_len} tokens; dense "
           f"{ppl(('dense',))}. Calibration: 32 windows of {seq_len} from the calibration half of `wiki`, seed 0.", ""]
    removed = [", ".join(map(str, by[("base", sel, d, "none")]["removed"])) if ("base", sel, d, "none") in by else "-"
               for sel, d in cells]
    variants = list(dict.fromkeys(k[3] for k in by if k[0] == "base"))
    body = [["removed layers", *removed]] + [[v, *(ppl(("base", sel, d, v)) for sel, d in cells)] for v in variants]
    out += ["## One calibration pass, every fit", "", markdown_table(["variant", *heads], body), ""]
    shares = [(k, r) for k, r in by.items() if k[0] == "weights" and k[3] == "share"]
    if shares:
        body = [[f"{k[1]} {k[2]}", f"[{r['block'][0]}, {r['block'][1]})", f"{100 * r['sumsq_share']:.1f}%",
                 f"{100 * r['gram_trace_share']:.1f}%"] for k, r in shares]
        out += ["## Massive activations", "", markdown_table(
            ["cell", "first block", "position 0's share of Σ‖X‖²", "of tr XᵀX"], body), ""]
        labels = {"uniform (paper)": "ghost (paper)", "skip-first": WEIGHT_KEYS["skip-first"],
                  "clip, τ = 4 × the batch's median norm": "ghost clip", "clip, τ = 4 × the window's median norm":
                  WEIGHT_KEYS["clip"]}
        body = [[v, *(ppl(("base" if k == "ghost (paper)" else "weights", sel, d, k)) for sel, d in cells)]
                for v, k in labels.items()]
        out += [markdown_table(["token weights", *heads], body), ""]
    seq = [k for k in by if k[0] == "sequential"]
    if seq:
        body = [[v, *(ppl(("sequential", sel, d, v)) for sel, d in cells)]
                for v in dict.fromkeys(k[3] for k in seq)]
        out += ["## Sequential fitting (selections fitted per layer)", "", markdown_table(["fit", *heads], body), ""]
    sel_rows = [k for k in by if k[0] == "selection"]
    if sel_rows:
        body = []
        for d in (4, 6, 8):
            body.append([str(d), ppl(("base", "streamline", d, "ghost (paper)")), ppl(("selection", "ghost", d, "ghost")),
                         ", ".join(map(str, by.get(("selection", "ghost", d, "ghost"), {}).get("removed", []))),
                         ppl(("base", "shortgpt", d, "ghost (paper)")),
                         ppl(("selection", "ghost-greedy", d, "ghost (paper, per layer)")),
                         ppl(("selection", "ghost-greedy", d, "ghost sequential")),
                         ", ".join(map(str, by.get(("selection", "ghost-greedy", d, "ghost sequential"), {}).get("removed", [])))])
        out += ["## Recovery-aware selection (ghost, paper ε)", "", markdown_table(
            ["drop", "streamline", "--select ghost", "ghost removes", "shortgpt", "ghost-greedy, fit from the dense pass",
             "ghost-greedy, sequential", "ghost-greedy removes"], body), ""]
    curves = {sel: rank_curve(rows, sel, 6) for sel in ("streamline", "shortgpt")}
    if any(len(c) > 3 for c in curves.values()):
        ranks_seen = sorted({r for c in curves.values() for r, _ in c})
        body = [[f"{sel} 6", *(next((f"{p:.2f}" for r2, p in c if r2 == r), "-") for r in ranks_seen)]
                for sel, c in curves.items()]
        out += ["## Quality against rank (drop 6; parameters per operator 2·576·r, full: 576² = 331,776)", "",
                markdown_table(["cell", *map(str, ranks_seen)], body), "", "![perplexity against rank](rank.png)", ""]
    acc = [(k, r) for k, r in by.items() if k[0] == "accuracy"]
    if acc:
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
        body = [[" ".join(map(str, k[1:])), *(f"{pct(r['accuracy']['tasks'][t]['acc'])} / "
                                              f"{pct(r['accuracy']['tasks'][t]['acc_norm'])}"
                                              for t in ("gl_wiki_nextsent", "gl_wiki_lastword")),
                 pct(r["accuracy"]["average"]["acc"])] for k, r in acc]
        out += ["## Offline zero-shot accuracy (first 100 items per task; ± 4–5 points per cell)", "", markdown_table(
            ["model", "gl_wiki_nextsent acc / acc_norm", "gl_wiki_lastword acc / acc_norm", "avg acc"], body), ""]
    win = [k for k in by if k[0] == "windows"]
    if win:
        body = [[f"{k[1]} {k[2]}", str(k[3]), ppl(k[:4] + ("paper",)), ppl(k[:4] + ("rel:1e-2",)), ppl(k[:4] + ("gcv",))]
                for k in dict.fromkeys(k[:4] for k in win)]
        out += ["## Calibration windows", "", markdown_table(
            ["cell", "windows", "paper ε 1e-6", "ε rel:1e-2", "ε gcv"], body), ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
