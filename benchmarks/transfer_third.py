"""A third domain no calibration here sees: Usenet posts (issue 16). Does what the wiki / news grid chose hold there?

    python benchmarks/transfer_third.py [--cells streamline:6,shortgpt:8] [--calibs wiki,news,wiki+news]
                                        [--methods ...] [--out docs/transfer]

The same calibrations and fits as benchmarks/transfer.py (SmolLM2-135M, 32 × 512 tokens, seed 0), each pruned model
scored on --eval-windows windows of 512 tokens of the 200 posts of `alt.atheism` and `sci.space` that gensim ships
as test data (`mini_newsgroup`, headers removed, quoted lines kept: informal discussion, unlike both Wikipedia and
the news articles). Rows go to OUT/third.jsonl (resumable); the table is printed and written to OUT/third.md.
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import tempfile
import time
import zlib
from pathlib import Path

from transfer import METHODS, RUN, fitted_kinds  # the same variants and passes as the two-domain grid

from ghostlayers.data import calibration_windows, eval_windows
from ghostlayers.evaluate import perplexity
from ghostlayers.models import load_model
from ghostlayers.pipeline import calibrate
from ghostlayers.report import markdown_table
from ghostlayers.select import Selection


def usenet_posts() -> list[str]:
    """The bodies of gensim's 20-newsgroups sample (a pickled scikit-learn Bunch, read without scikit-learn)."""
    import gensim
    import numpy

    class Bunch(dict):
        pass

    class Reader(pickle.Unpickler):
        def find_class(self, module: str, name: str):  # only what the pickle holds: a dict of lists and arrays
            if name == "Bunch":
                return Bunch
            if module in ("copy_reg", "copyreg") and name == "_reconstructor":
                import copyreg
                return copyreg._reconstructor
            if module in ("__builtin__", "builtins") and name in ("dict", "list", "object", "str"):
                import builtins
                return getattr(builtins, name)
            if module.startswith("numpy"):
                from numpy._core import multiarray
                return getattr(multiarray, name, None) or getattr(numpy, name)
            raise pickle.UnpicklingError(f"unexpected {module}.{name} in mini_newsgroup")

    path = Path(gensim.__file__).parent / "test" / "test_data" / "mini_newsgroup"
    bunch = Reader(io.BytesIO(zlib.decompress(path.read_bytes())), encoding="latin1").load()
    return [post.split("\n\n", 1)[-1].strip() for post in bunch["data"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default="streamline:6,shortgpt:8")
    ap.add_argument("--calibs", default="wiki,news,wiki+news")
    ap.add_argument("--methods", default="none,replaceme,ghost,ghost shrink diagonal,ghost + refit 2,"
                                         "ghost shrink diagonal + refit 2,ghost shrink diagonal + refit 2 ρ=1,"
                                         "ghost shrink diagonal + refit 2 ρ=cv")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--out", default="docs/transfer")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    for m in args.methods.split(","):
        if m not in METHODS or METHODS[m].by_source:  # by-source folds need the grid's per-source stats
            ap.error(f"--methods: {m!r} is not one of {', '.join(k for k, v in METHODS.items() if not v.by_source)}")
    out = Path(args.out)
    path = out / "third.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    if not args.report_only:
        run(args, path, rows)
    report(args, out, rows)


def run(args: argparse.Namespace, path: Path, rows: list[dict]) -> None:
    done = {(r["calib"], r["drop"], r["select"], r["method"]) for r in rows}
    model, tok = load_model("smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:  # the posts as a .jsonl text source, one document each
        posts = Path(tmp) / "usenet.jsonl"
        posts.write_text("".join(json.dumps({"text": p}) + "\n" for p in usenet_posts()))
        held = eval_windows(tok, str(posts), 512, args.eval_windows)

    def emit(row: dict) -> None:
        rows.append(row)
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    if ("-", 0, "-", "dense") not in done:
        emit({"calib": "-", "drop": 0, "select": "-", "method": "dense",
              "ppl_usenet": perplexity(model, held, progress=False)["perplexity"]})
    methods = args.methods.split(",")
    for cell in args.cells.split(","):
        select, drop = cell.split(":")[0], int(cell.split(":")[1])
        for calib in args.calibs.split(","):
            todo = [m for m in methods if (calib, drop, select, m) not in done]
            if not todo:
                continue
            windows = calibration_windows(tok, calib.replace("+", ","), 32, 512, seed=0)
            stats, plan = calibrate(model, windows, Selection(select, drop), fitted_kinds(todo), RUN)
            for label in todo:
                t0 = time.perf_counter()
                pruned, _ = METHODS[label].prune(model, windows, stats, plan, RUN)
                emit({"calib": calib, "drop": drop, "select": select, "method": label, "removed": list(plan.removed),
                      "ppl_usenet": perplexity(pruned, held, progress=False)["perplexity"],
                      "seconds": round(time.perf_counter() - t0, 1)})
                del pruned


def report(args: argparse.Namespace, out: Path, rows: list[dict]) -> None:
    by = {(r["calib"], r["drop"], r["select"], r["method"]): r for r in rows}
    dense = by.get(("-", 0, "-", "dense"))
    calibs = args.calibs.split(",")
    lines = ["# A third domain: Usenet posts (issue 16)", "",
             f"`python benchmarks/transfer_third.py --cells {args.cells}` (calibration as in [README.md](README.md); "
             f"perplexity on {args.eval_windows} windows of 512 tokens of gensim's 20-newsgroups sample, a domain "
             "no calibration here saw; **bold**: the best recovery of the column)."]
    if dense:
        lines += ["", f"Dense: {dense['ppl_usenet']:.2f}."]
    for cell in args.cells.split(","):
        select, drop = cell.split(":")[0], int(cell.split(":")[1])
        methods = [m for m in args.methods.split(",") if any((c, drop, select, m) in by for c in calibs)]
        best = {c: min((by[(c, drop, select, m)]["ppl_usenet"] for m in methods
                        if m != "none" and (c, drop, select, m) in by), default=None) for c in calibs}
        body = []
        for m in methods:
            cells = []
            for c in calibs:
                r = by.get((c, drop, select, m))
                v = None if r is None else r["ppl_usenet"]
                cells.append("-" if v is None else f"**{v:.2f}**" if m != "none" and v == best[c] else f"{v:.2f}")
            body.append([m, *cells])
        lines += ["", f"## {select}, {drop} layers", "", markdown_table(["recovery", *[f"calib {c}" for c in calibs]], body)]
    (out / "third.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
