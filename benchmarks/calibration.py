"""Calibration time and peak memory on SmolLM2-135M against a plain forward pass over the same windows.

    python benchmarks/calibration.py [--windows 8,16,32,64] [--seq-len 512] [--drop 6] [--select streamline]

Each (mode, windows) cell runs in a fresh child process so peak memory is not polluted by earlier cells. Memory is
the process's resident set size sampled every 2 ms: "peak" is the highest reading during the measured step, "step"
is that minus the reading just before the step (the model and tokenizer are already loaded then).

Modes:
  forward      model(input_ids) over the windows, batch 8 (logits included): what "running the model" costs
  decoder      the decoder stack only (no LM head), batch 8: the part calibration actually runs
  calibrate    ghostlayers calibration: one pass with the float64 sums for selection and fit, then selection and
               the ghost fit (everything `ghostlayers prune` does before saving)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from ghostlayers.bench import PeakRSS
from ghostlayers.options import RunOptions


def child(mode: str, windows: int, seq_len: int, drop: int, select: str) -> dict:
    import torch

    from ghostlayers.data import calibration_windows
    from ghostlayers.models import adapter, load_model
    from ghostlayers.recovery import fit
    from ghostlayers.pipeline import Selection, calibrate

    model, tokenizer = load_model("smollm2-135m")
    ids = calibration_windows(tokenizer, "wiki", windows, seq_len, seed=0)
    with torch.inference_mode():  # warm-up on one window: first-call allocations and kernel selection
        model(input_ids=ids[:1], use_cache=False)
    with PeakRSS() as mem:
        started = time.perf_counter()
        if mode == "calibrate":
            stats, plan = calibrate(model, ids, Selection(select, drop), run=RunOptions(batch_size=8, progress=False))
            fit("ghost", stats, plan)
        else:
            run = model if mode == "forward" else adapter(model).backbone
            with torch.inference_mode():
                for start in range(0, len(ids), 8):
                    run(input_ids=ids[start : start + 8], use_cache=False)
        seconds = time.perf_counter() - started
    return {"mode": mode, "windows": windows, "seconds": seconds, "peak_mb": mem.peak, "step_mb": mem.peak - mem.start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", default="8,16,32,64")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--drop", type=int, default=6)
    parser.add_argument("--select", default="streamline")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, windows = args.child.split(":")
        print(json.dumps(child(mode, int(windows), args.seq_len, args.drop, args.select)))
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    for windows in [int(w) for w in args.windows.split(",")]:
        for mode in ("forward", "decoder", "calibrate"):
            cmd = [sys.executable, __file__, "--child", f"{mode}:{windows}", "--seq-len", str(args.seq_len),
                   "--drop", str(args.drop), "--select", args.select]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"  {mode:9s} {windows:3d} windows: {rows[-1]['seconds']:6.1f} s", file=sys.stderr)

    print(f"\nSmolLM2-135M, {args.select} drop {args.drop}, windows of {args.seq_len} tokens, "
          f"torch threads {os.cpu_count()} cores\n")
    print("| windows | forward s | decoder s | calibrate s | calibrate / forward | calibrate / decoder "
          "| peak MB forward | peak MB calibrate | step MB calibrate |")
    print("|---|---|---|---|---|---|---|---|---|")
    for windows in sorted({r["windows"] for r in rows}):
        cell = {r["mode"]: r for r in rows if r["windows"] == windows}
        f, d, c = cell["forward"], cell["decoder"], cell["calibrate"]
        print(f"| {windows} | {f['seconds']:.1f} | {d['seconds']:.1f} | {c['seconds']:.1f} | "
              f"{c['seconds'] / f['seconds']:.2f}x | {c['seconds'] / d['seconds']:.2f}x | "
              f"{f['peak_mb']:.0f} | {c['peak_mb']:.0f} | {c['step_mb']:.0f} |")


if __name__ == "__main__":
    main()
