"""How much the first token's massive activation weighs in the alignment objective, on SmolLM2.

    python benchmarks/massive_activations.py [--drop 6] [--windows 32] [--held-out 8]

Prints, for every layer input h_i, the norm of position 0 against the median norm of the other positions; the share
of Σ‖h_s‖² carried by position 0 at the removed block's input; each recovery method's held-out alignment error
‖ĥ − Y‖/‖X − Y‖ over all tokens and over tokens 1… only (position 0 left out of the sums, not of attention); and the
held-out perplexity of the ghost fitted on all tokens against the ghost fitted without position 0.
"""

from __future__ import annotations

import argparse

import torch

from ghostlayers import capture as capture_module
from ghostlayers.capture import capture
from ghostlayers.data import calibration_windows, eval_windows
from ghostlayers.evaluate import perplexity
from ghostlayers.hadamard import hadamard
from ghostlayers.models import load_model
from ghostlayers.recovery import RECOVERY, fit, spec_for
from ghostlayers.alignment import alignment_errors, alignment_spec
from ghostlayers.pipeline import Selection, calibrate, recover
from ghostlayers.options import QUIET


def held_out_stats(model, windows, spec, rotation, skip_first: bool):
    original = capture_module.Accumulator.start_batch

    def start_batch(self, mask):
        mask = mask.clone()
        mask[:, 0] = 0  # leave position 0 out of the sums; the model still sees it
        original(self, mask)

    if skip_first:
        capture_module.Accumulator.start_batch = start_batch
    try:
        return capture(model, windows, spec, progress=False, rotation=rotation)
    finally:
        capture_module.Accumulator.start_batch = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drop", type=int, default=6)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--held-out", type=int, default=8)
    parser.add_argument("--ppl-windows", type=int, default=32, help="held-out windows for the perplexity comparison")
    args = parser.parse_args()
    model, tok = load_model("smollm2-135m")
    calib = calibration_windows(tok, "wiki", args.windows, 512, seed=0)
    held = eval_windows(tok, "wiki", 512, max_windows=args.held_out)
    hidden = model(calib[:4], output_hidden_states=True).hidden_states[:-1]  # h_0 … h_{L-1}, 4 windows
    print("| layer input | position 0 norm (mean of 4 windows) | median norm of other positions | ratio |")
    print("|---|---|---|---|")
    for i, h in enumerate(hidden):
        norms = h.norm(dim=-1)
        first, rest = float(norms[:, 0].mean()), float(norms[:, 1:].median())
        print(f"| h_{i} | {first:.0f} | {rest:.0f} | {first / rest:.0f}x |")
    methods = tuple(m for m in RECOVERY if m != "none")
    stats, plan = calibrate(model, calib, Selection("streamline", args.drop), methods=methods, run=QUIET)
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
    ppl_windows = eval_windows(tok, "wiki", 512, max_windows=args.ppl_windows)
    without = held_out_stats(model, calib, spec_for(("ghost",), plan), None, skip_first=True)
    for name, source in (("none", stats), ("ghost, fitted on all tokens", stats), ("ghost, fitted without position 0", without)):
        pruned, _ = recover(model, source, plan, "none" if name == "none" else "ghost")
        print(f"perplexity, {name}: {perplexity(pruned, ppl_windows, progress=False)['perplexity']:.2f}")
    print(f"perplexity, dense: {perplexity(model, ppl_windows, progress=False)['perplexity']:.2f} "
          f"({args.ppl_windows} held-out windows of 512)")

if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
