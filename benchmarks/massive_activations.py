"""How much the first token's massive activation weighs in the alignment objective, on SmolLM2.

    python benchmarks/massive_activations.py [--drop 6] [--windows 32] [--held-out 8]

Prints the share of Σ‖h_s‖² carried by position 0 of each window at the removed block's input, and each recovery
method's held-out alignment error ‖ĥ − Y‖/‖X − Y‖ over all tokens and over tokens 1… only (position 0 excluded from
the sums, not from attention). The operators themselves are fitted as usual, on every token.
"""

from __future__ import annotations

import argparse

import torch

from ghostlayers import capture as capture_module
from ghostlayers.capture import capture
from ghostlayers.data import calibration_windows, eval_windows
from ghostlayers.hadamard import hadamard
from ghostlayers.models import load_model
from ghostlayers.operators import RECOVERY, alignment_errors, fit
from ghostlayers.pipeline import Selection, alignment_spec, calibrate


def held_out_stats(model, windows, spec, rotation, skip_first: bool):
    original = capture_module._Accumulator.start_batch

    def start_batch(self, mask):
        mask = mask.clone()
        mask[:, 0] = 0  # leave position 0 out of the sums; the model still sees it
        original(self, mask)

    if skip_first:
        capture_module._Accumulator.start_batch = start_batch
    try:
        return capture(model, windows, spec, progress=False, rotation=rotation)
    finally:
        capture_module._Accumulator.start_batch = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drop", type=int, default=6)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--held-out", type=int, default=8)
    args = parser.parse_args()
    model, tok = load_model("smollm2-135m")
    calib = calibration_windows(tok, "wiki", args.windows, 512, seed=0)
    held = eval_windows(tok, "wiki", 512, max_windows=args.held_out)
    methods = tuple(m for m in RECOVERY if m != "none")
    stats, plan = calibrate(model, calib, Selection("streamline", args.drop), progress=False, methods=methods)
    (s, e), = plan.blocks()
    rotation = hadamard(model.config.hidden_size)
    spec = alignment_spec(plan)
    all_tokens = held_out_stats(model, held, spec, rotation, skip_first=False)
    later = held_out_stats(model, held, spec, rotation, skip_first=True)
    share = 1 - float(later.sumsq[s] / all_tokens.sumsq[s])
    print(f"streamline drop {args.drop}: block [{s}, {e}); position 0 carries {share:.1%} of Σ‖h_{s}‖² "
          f"on {args.held_out} held-out windows of 512 tokens")
    print("| method | alignment error, all tokens | alignment error, tokens 1… |")
    print("|---|---|---|")
    for method in ("none", *methods):
        ops = fit(method, stats, plan)
        a = alignment_errors(all_tokens, ops, plan.blocks())[0]
        b = alignment_errors(later, ops, plan.blocks())[0]
        print(f"| {method} | {a:.3f} | {b:.3f} |")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
