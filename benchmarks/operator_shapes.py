"""What the fitted ghost operators look like on SmolLM2-135M, per drop count and selection (issue 6's "alongside").

    python benchmarks/operator_shapes.py [--drops 4,6,8] [--selects streamline,shortgpt] [--calib-samples 32]

For every operator W = I + M: its boundary, ‖M‖/‖I‖, the antisymmetric share ‖(M − Mᵀ)/2‖²/‖M‖² (the paper reports
about 47%; every symmetric operator has 0), the three largest singular values of M and its effective rank.
"""

from __future__ import annotations

import argparse

from ghostlayers.data import calibration_windows
from ghostlayers.models import load_model
from ghostlayers.operators import shape_of
from ghostlayers.pipeline import Selection, calibrate, recover
from ghostlayers.report import markdown_table
from ghostlayers.options import QUIET


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drops", default="4,6,8")
    ap.add_argument("--selects", default="streamline,shortgpt")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m")
    windows = calibration_windows(tok, "wiki", args.calib_samples, args.seq_len, seed=0)
    rows = []
    for select in args.selects.split(","):
        for drop in map(int, args.drops.split(",")):
            stats, plan = calibrate(model, windows, Selection(select, drop), run=QUIET)
            _, ops = recover(model, stats, plan, "ghost")
            for op in ops:
                s = shape_of(op.linear_map())
                rows.append([select, str(drop), f"{op.block[0]}-{op.block[1] - 1}", str(op.boundary),
                             f"{s['distance_from_identity']:.3f}", f"{100 * s['antisymmetric_share']:.1f}%",
                             ", ".join(f"{v:.2f}" for v in s["singular_values"][:3]), f"{s['effective_rank']:.0f}"])
                print(rows[-1], flush=True)
    print()
    print(f"SmolLM2-135M, ghost fitted on {args.calib_samples}x{args.seq_len} wiki calibration tokens (seed 0)\n")
    print(markdown_table(["selection", "drop", "removed", "boundary", "‖M‖/‖I‖", "antisymmetric share",
                          "σ1, σ2, σ3 of M", "effective rank"], rows))


if __name__ == "__main__":
    main()
