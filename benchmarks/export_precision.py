"""Does a saved model compute what the in-memory pruned model computes? Perplexity per saved dtype, SmolLM2-135M.

    python benchmarks/export_precision.py [--windows 24] [--calib-samples 32] [--seq-len 512] [--drop 6]

Prunes SmolLM2 once in float32 (streamline, ghost), measures held-out `wiki` perplexity of the in-memory model,
then saves it with `--dtype float32 | bfloat16 | float16` (operators stay float32), loads each back with
`ghostlayers.load` and measures it again on the same windows. For scale it also measures the dense model in each
dtype (the rounding of the model itself). The operator is stored in float32 but its product runs in the model's
dtype, so a 16-bit export's difference includes rounding the operator too.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ghostlayers import load, save
from ghostlayers.data import calibration_windows, eval_windows
from ghostlayers.evaluate import perplexity
from ghostlayers.models import load_model
from ghostlayers.pipeline import Selection, calibrate, recover
from ghostlayers.report import markdown_table
from ghostlayers.options import QUIET


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=24, help="held-out windows to score")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--drop", type=int, default=6)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    calib = calibration_windows(tok, "wiki", args.calib_samples, args.seq_len, seed=0)
    held = eval_windows(tok, "wiki", args.seq_len, args.windows)
    stats, plan = calibrate(model, calib, Selection("streamline", args.drop), run=QUIET)
    pruned, _ = recover(model, stats, plan, "ghost")
    ppl = lambda m: perplexity(m, held, batch_size=8, progress=False)["perplexity"]  # noqa: E731
    reference = ppl(pruned)
    rows = [["in memory", "float32", "float32", f"{reference:.4f}", "0.000%"]]

    def row(what: str, weights: str, operator: str, value: float) -> None:
        rows.append([what, weights, operator, f"{value:.4f}", f"{100 * (value / reference - 1):+.3f}%"])
        print(rows[-1], flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16", "float16"):
            started = time.perf_counter()
            out = save(pruned, tok, Path(tmp) / dtype, {}, dtype=dtype)
            loaded, _, _ = load(out)
            row("saved, loaded", dtype, "float32", ppl(loaded))
            print(f"{dtype}: {time.perf_counter() - started:.0f}s", flush=True)
    for dtype in ("float32", "bfloat16", "float16"):  # freshly loaded: the pruned model shares the dense tensors
        rows.append(["dense, for scale", dtype, "-", f"{ppl(load_model('smollm2-135m', dtype)[0]):.4f}", "-"])
    print()
    print(
        f"SmolLM2-135M, streamline drop {args.drop} (layers {list(plan.removed)}), ghost, {args.calib_samples}x"
        f"{args.seq_len} wiki calibration; held-out wiki perplexity on {len(held)} windows of {args.seq_len}\n"
    )
    print(markdown_table(["model", "weights", "operator", "perplexity", "vs in memory"], rows))


if __name__ == "__main__":
    main()
