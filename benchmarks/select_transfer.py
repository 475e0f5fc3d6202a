"""Issue 26: which selection rule transfers to text unlike the calibration? Every rule × drop × calibration text,
each chosen block pruned with the default repair and scored on every held-out text.

    apt install debian-handbook            (the `handbook` text: technical documentation)
    python benchmarks/select_transfer.py [--calibs handbook,wiki,news,wiki+news] [--drops 4,6,8]
                                         [--rules streamline,shortgpt,ghost,ghost-cv,ghost-shrunk,...]
                                         [--windows 8] [--work /tmp/select] [--out docs/selection/transfer]
    python benchmarks/select_transfer.py report

SmolLM2-135M (30 layers). For each calibration text (32 windows of 512 tokens, seed 0; `wiki+news` is the mixture
`--calib wiki,news`) one pass captures what every rule needs at every drop, with the sums of the 4 folds that
`prune` uses (so each rule chooses exactly what `prune --select RULE --calib TEXT` chooses; checked for ghost
below). Choices go to choices.jsonl. Each distinct block (per calibration text) is then pruned as `prune` would
with the default repair (shrunk ghost + refit 2, 4 folds; shortgpt's scattered layers fitted sequentially, as
`--select shortgpt` fits them) and scored on --windows held-out windows of 512 tokens of wiki, news, handbook and
the Usenet sample (`transfer_third.usenet_posts`; never calibrated on): perplexity, KL(dense ‖ pruned), top-1.
Rows go to results.jsonl as they finish (a cut-off run resumes); README.md is rewritten from both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transfer_third import usenet_posts  # noqa: E402

from ghostlayers.api import PruneSpec, prune  # noqa: E402
from ghostlayers.data import calibration_windows, eval_windows  # noqa: E402
from ghostlayers.divergence import against_stored, store_base  # noqa: E402
from ghostlayers.models import adapter, load_model  # noqa: E402
from ghostlayers.options import FitOptions, RunOptions  # noqa: E402
from ghostlayers.pipeline import capture_sums  # noqa: E402
from ghostlayers.plan import SCATTERED_AUTO  # noqa: E402
from ghostlayers.recovery.ghost import Ghost  # noqa: E402
from ghostlayers.report import markdown_table  # noqa: E402
from ghostlayers.select import SelectOptions, Selection, candidate_scores, get  # noqa: E402
from ghostlayers.spec import CaptureSpec  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "selection" / "transfer"
TEXTS = ("wiki", "news", "handbook", "usenet")
RULES = ("streamline", "shortgpt", "ghost", "ghost-cv", "ghost-shrunk", "ghost-blend", "streamline-ghost")
FOLDS = 4  # prune's default --folds


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _append(path: Path, row: dict) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def _source(calib: str) -> str:
    return calib.replace("+", ",")


def choose(model, tok, calib: str, drops: list[int], rules: list[str], out: Path) -> None:
    """One pass for every rule at every drop; each rule's choice and scores to choices.jsonl."""
    done = {(r["calib"], r["drop"], r["rule"]) for r in _rows(out / "choices.jsonl")}
    todo = [(d, r) for d in drops for r in rules if (calib, d, r) not in done]
    if not todo:
        return
    n = adapter(model).num_layers
    options = SelectOptions(ghost=Ghost().default_fit(FitOptions()))  # what prune passes: its fit, shrunk
    spec = CaptureSpec()
    for drop, rule in todo:
        crit = get(rule)
        spec = spec | crit.needs(n, drop, options) | CaptureSpec(cosine=frozenset(crit.pairs(n, drop, options)))
    windows = calibration_windows(tok, _source(calib), 32, 512, 0)
    started = time.perf_counter()
    stats = capture_sums(model, windows, spec, RunOptions(progress=False, folds=FOLDS))
    print(f"{calib}: one pass for {len(todo)} choices in {time.perf_counter() - started:.0f}s", flush=True)
    for drop, rule in todo:
        started = time.perf_counter()
        scores = candidate_scores(rule, stats, drop, options)
        removed = get(rule).pick(scores, drop)
        _append(out / "choices.jsonl", {"calib": calib, "drop": drop, "rule": rule, "removed": removed,
                                        "scores": {str(k): v for k, v in scores.items()},
                                        "seconds": round(time.perf_counter() - started, 2)})
        print(f"  {calib} drop {drop} {rule}: {removed}", flush=True)


def blocks(calibs: list[str], out: Path) -> list[tuple[str, tuple[int, ...], bool]]:
    """Every distinct (calibration, removed layers, fitted as a block) the choices name: the contiguous rules'
    blocks of every calibration first, shortgpt's picks after (fitted sequentially, as `--select shortgpt` fits
    them, even where they are adjacent: so a block both kinds pick is pruned twice)."""
    found = {(r["calib"], tuple(r["removed"]), get(r["rule"]).contiguous): None
             for r in _rows(out / "choices.jsonl") if r["calib"] in calibs}
    return sorted(found, key=lambda x: (not x[2], calibs.index(x[0])))


def evaluate(tok, calib: str, removed: tuple[int, ...], contiguous: bool, windows: dict, bases: dict,
             out: Path) -> None:
    """Prune `removed` as `prune` would, with the default repair, calibrated on `calib`; score it on every text."""
    started = time.perf_counter()
    # shortgpt's picks are fitted as --select shortgpt fits scattered layers, even where they are adjacent
    selection = Selection("manual", len(removed), list(removed), fit="auto" if contiguous else SCATTERED_AUTO)
    dense, _ = load_model("smollm2-135m")
    result = prune(dense, calibration_windows(tok, _source(calib), 32, 512, 0), PruneSpec(selection, progress=False))
    row = {"calib": calib, "removed": list(removed), "sequential": result.manifest["recovery"].get("sequential"),
           "seconds": round(time.perf_counter() - started, 1)}
    for t in TEXTS:
        row[t] = against_stored(bases[t], result.model, windows[t], progress=False).as_dict()
    _append(out / "results.jsonl", row)
    print(f"  {calib} {list(removed)}: " + " ".join(f"{t} {row[t]['perplexity']:.2f}" for t in TEXTS)
          + f" ({row['seconds']}s)", flush=True)


def run(args: argparse.Namespace) -> None:
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    posts = work / "usenet.jsonl"
    posts.write_text("".join(json.dumps({"text": p}) + "\n" for p in usenet_posts()))
    sources = {"wiki": "wiki", "news": "news", "handbook": "handbook", "usenet": str(posts)}
    windows = {t: eval_windows(tok, s, 512, args.windows) for t, s in sources.items()}
    bases = {}
    for t, w in windows.items():
        bases[t] = work / f"dense-{t}-{args.windows}.npy"
        if not bases[t].is_file():
            store_base(model, w, bases[t], progress=False)
    calibs, drops, rules = args.calibs.split(","), [int(d) for d in args.drops.split(",")], args.rules.split(",")
    for calib in calibs:
        choose(model, tok, calib, drops, rules, out)
    done = {(r["calib"], tuple(r["removed"]), not r["sequential"]) for r in _rows(out / "results.jsonl")}
    for calib, removed, contiguous in blocks(calibs, out):
        if (calib, removed, contiguous) not in done:
            evaluate(tok, calib, removed, contiguous, windows, bases, out)
            report(out)
    report(out)


def report(out: Path) -> None:
    choices = _rows(out / "choices.jsonl")
    scored = {(r["calib"], tuple(r["removed"]), not r["sequential"]): r for r in _rows(out / "results.jsonl")}
    if not choices:
        return
    calibs = list(dict.fromkeys(r["calib"] for r in choices))
    drops = sorted({r["drop"] for r in choices})
    rules = list(dict.fromkeys(r["rule"] for r in choices))
    pick = {(r["calib"], r["drop"], r["rule"]): (tuple(r["removed"]), get(r["rule"]).contiguous) for r in choices}

    def span(removed: tuple[int, ...]) -> str:
        contiguous = list(removed) == list(range(removed[0], removed[-1] + 1))
        return f"{removed[0]}-{removed[-1]}" if contiguous else ",".join(map(str, removed))

    def ppl(calib: str, drop: int, rule: str, text: str) -> float | None:
        removed, contiguous = pick.get((calib, drop, rule), ((), True))
        row = scored.get((calib, removed, contiguous))
        return None if row is None else row[text]["perplexity"]

    parts = ["# Which selection transfers? (issue 26)\n",
             "`python benchmarks/select_transfer.py` (SmolLM2-135M, 2 CPU cores). Each calibration text: 32 × 512 "
             "tokens, seed 0 (`wiki+news`: `--calib wiki,news`). Each rule's block is pruned with the default repair "
             "(shrunk ghost + refit 2) and scored on 8 held-out windows of 512 tokens of each text (perplexity; "
             "**bold**: the calibration's own domain; the Usenet sample is never calibrated on). Dense: "]
    any_row = next(iter(scored.values()), None)
    if any_row:
        parts[-1] += " / ".join(f"{t} {any_row[t]['perplexity_dense']:.2f}" for t in TEXTS) + ".\n"
    for drop in drops:
        parts.append(f"\n## {drop} layers\n")
        head = ["rule", *(f"calib {c}: block" for c in calibs)]
        body = []
        for rule in rules:
            cells = []
            for c in calibs:
                removed = pick.get((c, drop, rule), (None,))[0]
                if removed is None:
                    cells.append("-")
                    continue
                values = [ppl(c, drop, rule, t) for t in TEXTS]
                own = [t in c.split("+") for t in TEXTS]
                text = " / ".join("-" if v is None else (f"**{v:.2f}**" if o else f"{v:.2f}") for v, o in zip(values, own))
                cells.append(f"{span(removed)}: {text}")
            body.append([rule, *cells])
        parts.append(f"Perplexity {' / '.join(TEXTS)}.\n\n" + markdown_table(head, body) + "\n")
    # the decision: each rule against the best rule of each cell (calibration × drop × text)
    parts.append("\n## Each rule against the best of each cell\n\nA cell is one calibration × drop × scored text; "
                 "the gap is the rule's perplexity over the best rule's in that cell (of the rules measured there). In domain: the text calibrated "
                 "on; out of domain: every other text.\n")
    head = ["rule", "cells", "within 1%", "mean gap", "worst gap (in domain)", "worst gap (out of domain)", "worst cell"]
    body = []
    for rule in rules:
        gaps = []
        for c in calibs:
            for drop in drops:
                for t in TEXTS:
                    values = {r: v for r in rules if (v := ppl(c, drop, r, t)) is not None}
                    if rule not in values:
                        continue
                    best = min(values.values())  # of the rules measured there
                    gaps.append((values[rule] / best - 1, t in c.split("+"), f"{c} {drop} on {t}"))
        if not gaps:
            continue
        inside = [g for g, own, _ in gaps if own]
        outside = [g for g, own, _ in gaps if not own]
        worst = max(gaps)
        body.append([rule, str(len(gaps)), str(sum(g <= 0.01 for g, _, _ in gaps)),
                     f"{100 * sum(g for g, _, _ in gaps) / len(gaps):.2f}%",
                     f"{100 * max(inside, default=0):.2f}%", f"{100 * max(outside, default=0):.2f}%",
                     f"{worst[2]} ({100 * worst[0]:+.2f}%)" if worst[0] > 0 else "-"])
    parts.append(markdown_table(head, body) + "\n")
    findings = out / "findings.md"
    if findings.is_file():
        parts.append("\n" + findings.read_text())
    (out / "README.md").write_text("\n".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="run", choices=["run", "report"])
    ap.add_argument("--calibs", default="handbook,wiki,news,wiki+news")
    ap.add_argument("--drops", default="4,6,8")
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--work", default="/tmp/select")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    run(args) if args.what == "run" else report(Path(args.out))


if __name__ == "__main__":
    main()
