"""Peak memory and time of calibration on SmolLM2-135M: normal, layer by layer, and storing activations.

    python benchmarks/memory.py [--windows 16,32,64,128] [--stored 16,32] [--seq-len 512] [--drop 6]

SmolLM2 (the bundled GGUF, dequantised) is saved once as a float32 safetensors folder; every cell then runs in a
fresh child process that loads from it, so peak memory (resident set size sampled every 2 ms, whole process:
Python, torch, model and calibration) is not polluted by earlier cells. `prune` is what `ghostlayers prune` does
before saving: streamline selection over every candidate block and the ghost fit, from one pass.

Modes:
  normal        load the model, one pass with the float64 sums (what `ghostlayers prune` does)
  layer-by-layer  the model's layers stay in the safetensors file; one layer at a time over the cached hidden
                states of every window (`prune --layer-by-layer`)
  stored        what the reference code does: keep X and Y of the chosen block for every calibration token (float32,
                on the CPU), then solve; memory grows as C × tokens × 4 bytes × 2 per boundary
  refit-2, refit-all  normal, then `--refit 2` / `--refit all` on the ghost (the walk caches three copies of the
                residual stream of every window: dense state, pruned state, dense mid-state)

    python benchmarks/memory.py --windows 16,64 --modes normal,refit-2,refit-all --stored 0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from ghostlayers.bench import PeakRSS
from ghostlayers.options import QUIET, RunOptions


def child(mode: str, windows: int, folder: str, seq_len: int, drop: int) -> dict:
    from ghostlayers.data import calibration_windows
    from ghostlayers.recovery import fit
    from ghostlayers.pipeline import Selection, calibrate

    with PeakRSS() as mem:
        started = time.perf_counter()
        if mode == "layer-by-layer":
            from transformers import AutoTokenizer

            from ghostlayers.offload import Offloaded

            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = Offloaded(folder)
        else:
            from ghostlayers.models import load_model

            model, tokenizer = load_model(folder)
        loaded = time.perf_counter()
        ids = calibration_windows(tokenizer, "wiki", windows, seq_len, seed=0)
        if mode == "stored":
            stored_fit(model, ids, drop)
        else:
            stats, plan = calibrate(model, ids, Selection("streamline", drop), run=RunOptions(batch_size=8, progress=False))
            if mode.startswith("refit-"):
                from ghostlayers.pipeline import refit_plan
                from ghostlayers.options import parse_refit

                refit_plan(model, ids, stats, plan, "ghost", parse_refit(mode.removeprefix("refit-")), run=QUIET)
            else:
                fit("ghost", stats, plan)
        done = time.perf_counter()
    return {"mode": mode, "windows": windows, "tokens": int(ids.numel()), "load_s": loaded - started,
            "calibrate_s": done - loaded, "peak_mb": mem.peak, "start_mb": mem.start}


def stored_fit(model, ids, drop: int) -> None:
    """The reference code's way: hidden states of every token at the block's two ends, kept, then solved."""
    import torch

    from ghostlayers.models import adapter

    ad = adapter(model)
    s = 13  # streamline's block for drop 6 on SmolLM2 is [13, 19); the memory does not depend on which
    xs, ys = [], []
    with torch.inference_mode():
        for start in range(0, len(ids), 8):
            hs = model(input_ids=ids[start : start + 8], output_hidden_states=True, use_cache=False).hidden_states
            xs.append(hs[s].reshape(-1, ad.hidden_size).float().cpu())
            ys.append(hs[s + drop].reshape(-1, ad.hidden_size).float().cpu())
            del hs
        x, y = torch.cat(xs), torch.cat(ys)
        del xs, ys
        torch.linalg.lstsq(x, y - x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", default="16,32,64,128")
    parser.add_argument("--stored", default="16,32", help="window counts at which storing activations is measured")
    parser.add_argument("--modes", default="normal,layer-by-layer", help="modes measured at every --windows count")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--drop", type=int, default=6)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, windows = args.child.rsplit(":", 1)
        print(json.dumps(child(mode, int(windows), args.folder, args.seq_len, args.drop)))
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ghostlayers.models import load_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = load_model("smollm2-135m")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
        del model
        cells = [(m, w) for w in map(int, args.windows.split(",")) for m in args.modes.split(",")]
        cells += [("stored", w) for w in map(int, args.stored.split(",")) if w]
        for mode, windows in cells:
            cmd = [sys.executable, __file__, "--child", f"{mode}:{windows}", "--folder", tmp,
                   "--seq-len", str(args.seq_len), "--drop", str(args.drop)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"  {mode:15s} {windows:4d} windows: load {r['load_s']:5.1f} s, calibrate {r['calibrate_s']:6.1f} s, "
                  f"peak {r['peak_mb']:6.0f} MB", file=sys.stderr, flush=True)

    print(f"\nSmolLM2-135M (C = {hidden}, {layers} layers, float32), streamline drop {args.drop}, windows of "
          f"{args.seq_len} tokens, {os.cpu_count()} cores; peak = the whole process's resident memory\n")
    print("| windows | tokens | normal: peak MB | s | layer by layer: peak MB | s | stored activations: measured peak MB "
          "| s | computed X, Y of one block (C × tokens × 4 B × 2) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for windows in sorted({r["windows"] for r in rows}):
        cell = {r["mode"]: r for r in rows if r["windows"] == windows}
        tokens = next(iter(cell.values()))["tokens"]
        fmt = lambda m, k, f: f.format(cell[m][k]) if m in cell else "-"  # noqa: E731
        print(f"| {windows} | {tokens} | {fmt('normal', 'peak_mb', '{:.0f}')} | {fmt('normal', 'calibrate_s', '{:.1f}')} "
              f"| {fmt('layer-by-layer', 'peak_mb', '{:.0f}')} | {fmt('layer-by-layer', 'calibrate_s', '{:.1f}')} "
              f"| {fmt('stored', 'peak_mb', '{:.0f}')} | {fmt('stored', 'calibrate_s', '{:.1f}')} "
              f"| {hidden * tokens * 4 * 2 / 2**20:.0f} MB |")
    refits = [r for r in rows if r["mode"].startswith("refit-")]
    if refits:
        print("\n| mode | windows | tokens | peak MB | s (calibrate + fit + refit) | computed cached states (3 × C × tokens × 4 B) |")
        print("|---|---|---|---|---|---|")
        for r in sorted(refits, key=lambda r: (r["mode"], r["windows"])):
            print(f"| {r['mode']} | {r['windows']} | {r['tokens']} | {r['peak_mb']:.0f} | {r['calibrate_s']:.1f} "
                  f"| {3 * hidden * r['tokens'] * 4 / 2**20:.0f} MB |")


if __name__ == "__main__":
    main()
