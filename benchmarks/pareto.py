"""Where layer pruning (with the repair) stands against quantisation, and how the two combine, in llama.cpp itself.

    python benchmarks/pareto.py run [--drops 2,4,6,8] [--quants f16,q8_0,q4_k_m,q4_0] [--windows 8] [--work DIR]
    python benchmarks/pareto.py report              (rewrites docs/pareto/README.md and the plot from results.jsonl)

SmolLM2-135M (the bundled Q4_1 GGUF, dequantised to float32 in transformers: the reference) and the same model
pruned by each of --drops layers with the repair a GGUF can hold (`ghostlayers prune --recover none --format gguf`:
the default selection and the default refit of the kept layers after the boundary; the ghost operator itself is not
in the base architecture), each written by llama.cpp's own quantiser (llama-cpp-python) at every --quants type, and
llama.cpp's own `--prune-layers` (no repair) of the same layers where the installed llama.cpp has it. Every file is
run in llama.cpp: file size, prompt and decode tokens/s (a 256-token prompt then 64 greedy tokens, median of
--rounds rounds taken in turn), and on --windows held-out windows of 512 tokens of `wiki` (the calibration domain)
and of `news` (not): KL(dense ‖ file) per token (mean, median, 99th percentile), top-1 agreement, perplexity.
One row per file is appended to results.jsonl as it is measured; a cut-off run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "docs" / "pareto"
TEXTS = ("wiki", "news")
REFERENCE = "dense, bundled Q4_1"


def _done(results: Path) -> dict[str, dict]:
    if not results.is_file():
        return {}
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return {r["label"]: r for r in rows}


def run(args: argparse.Namespace) -> None:
    import torch

    from ghostlayers import llamacpp
    from ghostlayers.cli import main as cli
    from ghostlayers.data import eval_windows
    from ghostlayers.divergence import store_base
    from ghostlayers.models import load_model, smollm2_gguf

    llamacpp.require()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = _done(results)
    torch.manual_seed(0)
    dense, tok = load_model("smollm2-135m")
    windows = {t: eval_windows(tok, t, 512, args.windows) for t in TEXTS}
    bases = {}
    for text, w in windows.items():
        bases[text] = work / f"dense-{text}-{args.windows}.npy"
        if not bases[text].is_file():
            store_base(dense, w, bases[text], batch_size=2, progress=False)
    del dense
    speed_prompt = windows["wiki"][0, :256].tolist()

    # the files: the bundled dense one, and each prune written by ghostlayers at f32 for llama.cpp to quantise
    sources = {"dense": (smollm2_gguf(), 0, None)}
    for drop in args.drops:
        path = work / f"pruned-{drop}-f32.gguf"
        if not path.is_file():
            started = time.perf_counter()
            cli(["prune", "--model", "smollm2-135m", "--drop", str(drop), "--recover", "none", "--format", "gguf",
                 "--quant", "f32", "--calib", "wiki", "--calib-samples", str(args.calib_samples), "--seq-len", "512",
                 "--seed", "0", "--out", str(path), "--quiet"])
            print(f"pruned {drop} in {time.perf_counter() - started:.0f}s", flush=True)
        removed = _removed(path)
        sources[f"pruned {drop}"] = (path, drop, removed)
    files: dict[str, dict] = {}
    for name, (path, drop, removed) in sources.items():
        for quant in args.quants:
            label = f"{name}, {quant}"
            target = work / f"{name.replace(' ', '-')}-{quant}.gguf"
            if not target.is_file():
                llamacpp.quantize(path, target, quant, allow_requantize=True)
            files[label] = {"path": target, "drop": drop, "quant": quant, "repair": "refit" if drop else "dense",
                            "removed": removed}
        if name == "dense":
            files[REFERENCE] = {"path": path, "drop": 0, "quant": "q4_1 (bundled)", "repair": "dense",
                                            "removed": None}
    if llamacpp.can_prune_layers():  # llama.cpp's own removal, no repair, of the layers ghostlayers chose
        for name, (_, drop, removed) in sources.items():
            if not drop:
                continue
            for quant in ("q8_0",):
                label = f"llama.cpp --prune-layers {drop}, {quant}"
                target = work / f"cpp-prune-{drop}-{quant}.gguf"
                if not target.is_file():
                    llamacpp.quantize(smollm2_gguf(), target, quant, allow_requantize=True, prune_layers=removed)
                files[label] = {"path": target, "drop": drop, "quant": quant, "repair": "none (llama.cpp)",
                                "removed": removed}

    for label, f in files.items():
        if label in done:
            continue
        row = {"label": label, "drop": f["drop"], "quant": f["quant"], "repair": f["repair"], "removed": f["removed"],
               "mb": round(f["path"].stat().st_size / 1e6, 1), "windows": args.windows}
        started = time.perf_counter()
        for text in TEXTS:
            row[text] = llamacpp.divergence(f["path"], bases[text], windows[text]).as_dict()
        row["seconds"] = round(time.perf_counter() - started, 1)
        with results.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(label, f"{row['mb']} MB", " ".join(f"{t} KL {row[t]['kl_mean']:.4f} ppl {row[t]['perplexity']:.2f}"
                                              for t in TEXTS), flush=True)
    speeds_file = out / "speeds.json"
    if not speeds_file.is_file():
        speeds = llamacpp.speeds({k: f["path"] for k, f in files.items()}, speed_prompt, new=64, rounds=args.rounds)
        speeds_file.write_text(json.dumps({"cpu": platform.processor() or platform.machine(),
                                           "llama_cpp_python": llamacpp.version(), "prompt_tokens": len(speed_prompt),
                                           "new_tokens": 64, "rounds": args.rounds,
                                           "speeds": {k: {"prompt": p, "decode": d} for k, (p, d) in speeds.items()}},
                                          indent=1))
    report(out)


def _removed(path: Path) -> list[int]:
    from ghostlayers.locate import gguf_metadata

    return [int(i) for i in gguf_metadata(path).get("ghostlayers.removed_layers", [])]


def _frontier(points: list[tuple[float, float, str]], higher_better: bool) -> set[str]:
    """Labels not dominated: no other point has a lower KL and a better x (smaller size / higher speed)."""
    keep = set()
    for x, kl, label in points:
        if not any((x2 > x if higher_better else x2 < x) and kl2 <= kl or (x2 == x and kl2 < kl)
                   for x2, kl2, l2 in points if l2 != label):
            keep.add(label)
    return keep


def report(out: Path) -> None:
    from ghostlayers.report import markdown_table

    rows = list(_done(out / "results.jsonl").values())
    speeds_file = out / "speeds.json"
    info = json.loads(speeds_file.read_text()) if speeds_file.is_file() else {"speeds": {}}
    speeds = info["speeds"]
    for r in rows:
        s = speeds.get(r["label"], {})
        r["prompt_tps"], r["decode_tps"] = s.get("prompt", math.nan), s.get("decode", math.nan)
    # the bundled Q4_1 file is the reference's own weights (the reference is their dequantisation): its KL is
    # llama.cpp's arithmetic, not a loss, so it is shown but is no point of the frontier
    ranked = [r for r in rows if r["label"] != REFERENCE]
    by_size = _frontier([(r["mb"], r["wiki"]["kl_mean"], r["label"]) for r in ranked], higher_better=False)
    by_speed = _frontier([(r["decode_tps"], r["wiki"]["kl_mean"], r["label"]) for r in ranked if
                          not math.isnan(r["decode_tps"])], higher_better=True)
    dense_decode = speeds.get("dense, f16", {}).get("decode", math.nan)
    table = [[r["label"], str(30 - r["drop"]), f"{r['mb']:.0f}",
              f"{r['prompt_tps']:.0f}", f"{r['decode_tps']:.0f} ({r['decode_tps'] / dense_decode:.2f}x)",
              *(f"{r[t]['kl_mean']:.3f} / {r[t]['kl_p99']:.2f}" for t in TEXTS),
              *(f"{r[t]['top1_agreement']:.1f}" for t in TEXTS),
              *(f"{r[t]['perplexity']:.2f}" for t in TEXTS),
              "(the reference's file)" if r["label"] == REFERENCE else
              ("size" if r["label"] in by_size else "") + (" speed" if r["label"] in by_speed else "")]
             for r in sorted(rows, key=lambda r: (r["drop"], -r["mb"]))]
    header = ["file", "layers", "MB", "prompt tok/s", "decode tok/s", "KL wiki mean / p99", "KL news mean / p99",
              "top-1 % wiki", "top-1 % news", "ppl wiki", "ppl news", "on the frontier (wiki KL against)"]
    _plot(rows, by_size, by_speed, out)
    text = (out / "findings.md").read_text() if (out / "findings.md").is_file() else ""
    windows = rows[0]["windows"] if rows else 0
    (out / "README.md").write_text(
        "# Pruning against quantisation, in llama.cpp\n\n"
        f"`python benchmarks/pareto.py run` (then `report`), llama-cpp-python {info.get('llama_cpp_python', '?')} "
        f"built with GGML_NATIVE=OFF, 2 cores. SmolLM2-135M: the bundled Q4_1 GGUF, dequantised to float32 in "
        "transformers, is the reference every KL is taken against; `pruned N`: `ghostlayers prune --drop N "
        "--recover none --format gguf` (default selection, the default refit of the 2 kept layers after the "
        "boundary, calibrated on 32 × 512 tokens of wiki), then each file quantised by llama.cpp's own quantiser. "
        f"KL(dense ‖ file), top-1 agreement and perplexity over {windows} held-out windows of 512 tokens of wiki (the "
        f"calibration's domain) and of news (not), every token's logits from llama.cpp; speed: a "
        f"{info.get('prompt_tokens', 256)}-token prompt then {info.get('new_tokens', 64)} greedy tokens, median of "
        f"{info.get('rounds', '?')} rounds in which the files take turns.\n\n"
        + markdown_table(header, table) + "\n\n![KL against decode speed and size](pareto.png)\n\n" + text)


def _plot(rows: list[dict], by_size: set[str], by_speed: set[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    colours = {0: "black", 2: "tab:blue", 4: "tab:green", 6: "tab:orange", 8: "tab:red"}
    for ax, key, front, xlabel in ((axes[0], "decode_tps", by_speed, "decode tokens/s in llama.cpp (2 cores)"),
                                   (axes[1], "mb", by_size, "file size (MB)")):
        for r in rows:
            marker = "x" if "llama.cpp" in r["label"] else "o"
            ax.scatter(r[key], r["wiki"]["kl_mean"], c=colours.get(r["drop"], "grey"), marker=marker, s=40)
            ax.annotate(r["label"].replace("pruned ", "−").replace("dense, ", "").replace("llama.cpp --prune-layers ",
                        "cpp−"), (r[key], r["wiki"]["kl_mean"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
        pts = sorted((r[key], r["wiki"]["kl_mean"]) for r in rows if r["label"] in front)
        if pts:
            ax.plot(*zip(*pts), "k--", lw=0.8, label="frontier")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("KL(dense ‖ file) per token, held-out wiki")
        ax.legend(handles=[plt.Line2D([], [], color=c, marker="o", ls="", label=("dense" if d == 0 else f"−{d} layers"))
                           for d, c in colours.items()]
                  + [plt.Line2D([], [], color="grey", marker="x", ls="", label="llama.cpp --prune-layers (no repair)"),
                     plt.Line2D([], [], color="k", ls="--", label="frontier")],
                  fontsize=7)
    fig.suptitle("SmolLM2-135M: layer pruning (repaired) and quantisation in llama.cpp")
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["run", "report"])
    ap.add_argument("--drops", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 6, 8])
    ap.add_argument("--quants", type=lambda s: s.split(","), default=["f16", "q8_0", "q4_k_m", "q4_0"])
    ap.add_argument("--windows", type=int, default=8, help="held-out windows of 512 tokens per text")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", default="/tmp/pareto", help="where the GGUF files and dense log-probabilities go")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    run(args) if args.what == "run" else report(Path(args.out))


if __name__ == "__main__":
    sys.exit(main())
