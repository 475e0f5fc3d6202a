"""What users notice: the README's default repairs measured by KL to the dense model, top-1 agreement and whether
short factual prompts still get their answer (issue 24).

    python benchmarks/divergence.py [--cells streamline:4,streamline:6,...] [--windows 8] [--out docs/divergence]

Each cell is `ghostlayers prune --select S --drop N` with every other setting the default (shrunk ghost + refit 2,
calibrated on 32 × 512 tokens of wiki, seed 0), and, for contrast, the same layers removed with no repair
(`--recover none --refit none`). Scored on --windows held-out windows of 512 tokens of wiki (the calibration domain),
news and the Usenet sample (neither seen): KL(dense ‖ pruned) per token (mean, median, 99th percentile), top-1
agreement, perplexity; and greedy continuations of 16 factual prompts cut from held-out wiki and news
(`data.factual_prompts`): how often each model's continuation starts with the answer. Rows are appended to
results.jsonl as they finish; README.md is rewritten from it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transfer_third import usenet_posts  # noqa: E402

from ghostlayers.cli import main as cli  # noqa: E402
from ghostlayers.data import eval_windows, factual_prompts  # noqa: E402
from ghostlayers.divergence import against_stored, agreement, store_base  # noqa: E402
from ghostlayers.export import load  # noqa: E402
from ghostlayers.models import load_model  # noqa: E402
from ghostlayers.report import markdown_table  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "divergence"
CELLS = "streamline:4,streamline:6,streamline:8,shortgpt:8,ghost:8"
TEXTS = ("wiki", "news", "usenet")
VARIANTS = {"default": [], "none": ["--recover", "none", "--refit", "none"]}  # --variants picks


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {(r["select"], r["drop"], r["repair"]) for r in _rows(results)}
    dense, tok = load_model("smollm2-135m")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        posts = Path(tmp) / "usenet.jsonl"
        posts.write_text("".join(json.dumps({"text": p}) + "\n" for p in usenet_posts()))
        sources = {"wiki": "wiki", "news": "news", "usenet": str(posts)}
        windows = {t: eval_windows(tok, s, 512, args.windows) for t, s in sources.items()}
        bases = {t: store_base(dense, w, Path(tmp) / f"{t}.npy", progress=False) for t, w in windows.items()}
        facts = [f for t in ("wiki", "news") for f in factual_prompts(t, args.facts // 2)]
        prompts = [torch.tensor(tok(p).input_ids) for p, _ in facts]
        answers = [tok(" " + a, add_special_tokens=False).input_ids for _, a in facts]
        for cell in args.cells.split(","):
            select, drop = cell.split(":")
            for repair in args.variants.split(","):
                extra = VARIANTS[repair]
                if (select, int(drop), repair) in done:
                    continue
                # kept in --work under the name benchmarks/heal.py gives the same default prune, which reuses it
                folder = work / (f"{select}-{drop}" + ("" if repair == "default" else f"-{repair}"))
                if not folder.is_dir():
                    cli(["prune", "--model", "smollm2-135m", "--select", select, "--drop", drop, "--calib", "wiki",
                         "--calib-samples", "32", "--seq-len", "512", "--seed", "0", "--format", "exact", "--out",
                         str(folder), "--quiet", *extra])
                model, _, manifest = load(str(folder))
                row = {"select": select, "drop": int(drop), "repair": repair, "removed": manifest["removed_layers"],
                       "windows": args.windows}
                for text in TEXTS:
                    row[text] = against_stored(bases[text], model, windows[text], progress=False).as_dict()
                gen = agreement(dense, model, prompts, 16, answers)
                row["facts"] = {k: v for k, v in gen.items() if k != "examples"}
                row["examples"] = [{"prompt": tok.decode(e["prompt"]), "dense": tok.decode(e["dense"]),
                                    "pruned": tok.decode(e["pruned"])} for e in gen["examples"]
                                   if e["dense_right"] and not e["pruned_right"]][:3]
                with results.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(cell, repair, " ".join(f"{t} KL {row[t]['kl_mean']:.3f} top1 {row[t]['top1_agreement']:.1f} "
                                             f"ppl {row[t]['perplexity']:.2f}" for t in TEXTS),
                      f"facts {gen['dense_right']:.0f}% -> {gen['pruned_right']:.0f}%", flush=True)
    report(out)


def report(out: Path) -> None:
    rows = _rows(out / "results.jsonl")
    table = [[f"{r['select']}, {r['drop']}", r["repair"],
              *(f"{r[t]['kl_mean']:.3f}" for t in TEXTS), *(f"{r[t]['top1_agreement']:.1f}" for t in TEXTS),
              *(f"{r[t]['perplexity']:.2f}" for t in TEXTS),
              f"{r['facts']['dense_right']:.0f} → {r['facts']['pruned_right']:.0f} ({r['facts']['lost']} lost)"]
             for r in rows]
    header = ["selection, layers", "repair", "KL wiki", "KL news", "KL Usenet", "top-1 % wiki", "top-1 % news",
              "top-1 % Usenet", "ppl wiki", "ppl news", "ppl Usenet", "facts answered %, dense → pruned"]
    dense = rows[0]["wiki"]["perplexity_dense"] if rows else float("nan")
    examples = "\n".join(f"- {r['select']} {r['drop']}, {r['repair']}: `{e['prompt']}` dense `{e['dense']!r}`, pruned "
                         f"`{e['pruned']!r}`" for r in rows if r["repair"] == "default" for e in r["examples"][:1])
    findings = (out / "findings.md").read_text() if (out / "findings.md").is_file() else ""
    (out / "README.md").write_text(
        "# What users notice: KL to the dense model, top-1 agreement, answers kept\n\n"
        "`python benchmarks/divergence.py` (SmolLM2-135M; `ghostlayers prune --select S --drop N`, every other "
        "setting the default, calibrated on 32 × 512 tokens of wiki; `none`: the same layers, `--recover none "
        f"--refit none`). {rows[0]['windows'] if rows else '?'} held-out windows of 512 tokens of each text; KL(dense "
        "‖ pruned) is the mean per predicted token (the median and 99th percentile are in results.jsonl); facts: 16 "
        "short factual prompts cut from held-out wiki and news before the name or year that ends a sentence, and how "
        f"often the greedy continuation starts with it. Dense perplexity: wiki {dense:.2f}.\n\n"
        + markdown_table(header, table) + "\n\nFacts the dense model said and the pruned one lost (one per cell):\n\n"
        + examples + "\n\n" + findings)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="run", choices=["run", "report"])
    ap.add_argument("--cells", default=CELLS)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--facts", type=int, default=16)
    ap.add_argument("--variants", default="default", help="default and/or none (the same layers, no repair)")
    ap.add_argument("--work", default="/tmp/heal", help="where the pruned folders are kept")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    run(args) if args.what == "run" else report(Path(args.out))


if __name__ == "__main__":
    main()
