"""Does a short distillation of the repair (`--heal`) help, in and out of the calibration's domain? (issue 25)

    pip install -e '.[lora]'   (peft, for the LoRA comparison)
    python benchmarks/heal.py [--cells streamline:6,ghost:8,manual:20-25] [--variants default,heal50,heal200,lora200]
                              [--windows 8] [--work /tmp/heal] [--out docs/heal]
    python benchmarks/heal.py report

Each cell is pruned once with the default repair (`ghostlayers prune`, shrunk ghost + refit 2, calibrated on 32 ×
512 tokens of wiki, seed 0) and saved; each variant starts from that folder:
  default   as it is
  healN     `ghostlayers heal --steps N`: only what the repair owns trains (the boundary operator, the refitted
            projections), KL(dense ‖ pruned) on the 32 calibration windows, early stopping on 4 more
  lawN      the same with --heal-layers 1 (the whole first kept layer after each boundary too)
  loraN     the same loop, budget and stopping rule, training LoRA adapters (peft, rank 8, every linear map of every
            kept layer) instead: is the choice of parameters justified?
  any of these with @LR (e.g. heal200@2e-3): the same at relative learning rate LR instead of the default
Scored on --windows held-out windows of 512 tokens of wiki (the calibration's domain), news and the Usenet sample
(neither seen): perplexity, KL(dense ‖ pruned), top-1 agreement; and the time per step on this machine. Rows are
appended to results.jsonl as they finish (a cut-off run resumes); README.md is rewritten from it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transfer_third import usenet_posts  # noqa: E402

from ghostlayers.cli import main as cli  # noqa: E402
from ghostlayers.data import calibration_windows, eval_windows  # noqa: E402
from ghostlayers.divergence import against_stored, store_base  # noqa: E402
from ghostlayers.export import load  # noqa: E402
from ghostlayers.heal import heal, owned  # noqa: E402
from ghostlayers.models import load_model  # noqa: E402
from ghostlayers.options import HealOptions  # noqa: E402
from ghostlayers.report import markdown_table  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "heal"
TEXTS = ("wiki", "news", "usenet")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _prune(cell: str, folder: Path) -> None:
    select, what = cell.split(":")
    how = ["--select", "manual", "--layers", what] if select == "manual" else ["--select", select, "--drop", what]
    cli(["prune", "--model", "smollm2-135m", *how, "--calib", "wiki", "--calib-samples", "32", "--seq-len", "512",
         "--seed", "0", "--format", "exact", "--out", str(folder), "--quiet"])


def _lora(model) -> dict:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    inject_adapter_in_model(config, model)
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def run(args: argparse.Namespace) -> None:
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {(r["cell"], r["variant"]) for r in _rows(results)}
    scored = {(r["cell"], r["variant"]) for r in _rows(results) if "accuracy" in r}
    torch.manual_seed(0)
    dense, tok = load_model("smollm2-135m")
    posts = work / "usenet.jsonl"
    posts.write_text("".join(json.dumps({"text": p}) + "\n" for p in usenet_posts()))
    sources = {"wiki": "wiki", "news": "news", "usenet": str(posts)}
    windows = {t: eval_windows(tok, s, 512, args.windows) for t, s in sources.items()}
    bases = {}
    for t, w in windows.items():
        bases[t] = work / f"dense-{t}-{args.windows}.npy"
        if not bases[t].is_file():
            store_base(dense, w, bases[t], progress=False)
    suite = None
    if args.accuracy:  # the two offline tasks (held-out wiki articles), lm-eval
        from ghostlayers.tasks import expand
        from ghostlayers.zeroshot import accuracy, prepare

        suite = prepare(expand("offline"), None, args.accuracy, None)
    calib = calibration_windows(tok, "wiki", 32 + 4, 512, 0)
    train, held = calib[:32], calib[32:]
    for cell in args.cells.split(","):
        folder = work / cell.replace(":", "-")
        if not folder.is_dir():
            started = time.perf_counter()
            _prune(cell, folder)
            print(f"{cell}: pruned in {time.perf_counter() - started:.0f}s", flush=True)
        for variant in args.variants.split(","):
            if (cell, variant) in done and not (suite is not None and (cell, variant) not in scored):
                continue
            model, _, manifest = load(str(folder))
            row = {"cell": cell, "variant": variant, "removed": manifest["removed_layers"], "windows": args.windows}
            if variant != "default":
                match = re.fullmatch(r"(heal|law|lora)(\d+)(?:@([0-9.e-]+))?", variant)
                if match is None:
                    raise SystemExit(f"unknown variant {variant}: use default, healN, lawN or loraN, each with @LR")
                kind, steps = match[1], int(match[2])
                lr = float(match[3]) if match[3] else HealOptions(steps=steps).lr
                refits = manifest["recovery"]["refit"]["matrices"] if manifest["recovery"].get("refit") else []
                params = (_lora(model) if kind == "lora"
                          else owned(model, manifest["removed_layers"], refits, 1 if kind == "law" else 0))
                healed = heal(dense, model, train, held, params, HealOptions(steps=steps, lr=lr), progress=False,
                              log=lambda line: print(f"  {line}", flush=True))
                row.update(steps=steps, lr=lr, steps_run=healed.steps_run, best_step=healed.best_step,
                           trainable=healed.trainable, seconds=round(healed.seconds, 1),
                           seconds_per_step=round(healed.seconds / max(healed.steps_run, 1), 2),
                           held_out_kl=[healed.kl_before, healed.kl_after],
                           estimate=healed.estimate.get("seconds_per_step"),
                           history=[h for h in healed.history if h["held_out_kl"] == h["held_out_kl"]])
            for t in TEXTS:
                row[t] = against_stored(bases[t], model, windows[t], progress=False).as_dict()
            if suite is not None:
                row["accuracy"] = accuracy(model, tok, suite)
            with results.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(cell, variant, " ".join(f"{t} ppl {row[t]['perplexity']:.2f} KL {row[t]['kl_mean']:.3f}"
                                          for t in TEXTS), f"{row.get('seconds', 0)}s", flush=True)
    report(out)


def report(out: Path) -> None:
    rows = _rows(out / "results.jsonl")
    rows = list({(r["cell"], r["variant"]): r for r in rows}.values())  # a rerun (e.g. with --accuracy) replaces
    base = {r["cell"]: r for r in rows if r["variant"] == "default"}

    def cell(r: dict, t: str) -> str:
        b = base.get(r["cell"])
        change = "" if b is None or r is b else f" ({100 * (r[t]['perplexity'] / b[t]['perplexity'] - 1):+.1f}%)"
        return f"{r[t]['perplexity']:.2f}{change}"

    table = [[r["cell"].replace(":", " "), r["variant"], *(cell(r, t) for t in TEXTS),
              *(f"{r[t]['kl_mean']:.3f}" for t in TEXTS), f"{r['wiki']['top1_agreement']:.1f}",
              f"{r['steps_run']} (best {r['best_step']})" if "steps_run" in r else "-",
              f"{r['trainable'] / 1e6:.2f}M" if "trainable" in r else "-",
              f"{r['seconds_per_step']:.1f}" if "seconds_per_step" in r else "-",
              f"{100 * r['accuracy']['average']['acc']:.1f}" if "accuracy" in r else "-"] for r in rows]
    header = ["cell", "variant", "ppl wiki", "ppl news", "ppl Usenet", "KL wiki", "KL news", "KL Usenet",
              "top-1 % wiki", "steps run", "trained", "s / step",
              "offline acc %"]
    dense = rows[0]["wiki"]["perplexity_dense"] if rows else float("nan")
    findings = (out / "findings.md").read_text() if (out / "findings.md").is_file() else ""
    (out / "README.md").write_text(
        "# Healing the repair: a short distillation (`--heal`)\n\n"
        "`python benchmarks/heal.py` (SmolLM2-135M, 2 CPU cores). Each cell: `ghostlayers prune` with the default "
        "repair, calibrated on 32 × 512 tokens of wiki; `healN`: then `ghostlayers heal --steps N` (batch 2 × 512, "
        "relative lr 5e-3, early stopping on 4 held-out calibration windows every 10 steps, patience 3, the best "
        "kept); `lawN`: the same with `--heal-layers 1`; `loraN`: the same loop and budget training LoRA (rank 8, "
        f"every linear map of every kept layer) instead. {rows[0]['windows'] if rows else '?'} held-out windows of 512 "
        f"tokens of each text; dense perplexity wiki {dense:.2f}, news "
        f"{rows[0]['news']['perplexity_dense'] if rows else float('nan'):.2f}, Usenet "
        f"{rows[0]['usenet']['perplexity_dense'] if rows else float('nan'):.2f}. In brackets: the change against "
        "the cell's default.\n\n" + markdown_table(header, table) + "\n\n" + findings)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="run", choices=["run", "report"])
    ap.add_argument("--cells", default="streamline:6,manual:20-25,ghost:8")
    ap.add_argument("--variants", default="default,heal50,heal200,lora200")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--accuracy", type=int, default=0, metavar="N",
                    help="also the offline zero-shot accuracy, N items of each task (default: 0, not measured)")
    ap.add_argument("--work", default="/tmp/heal")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    run(args) if args.what == "run" else report(Path(args.out))


if __name__ == "__main__":
    main()
