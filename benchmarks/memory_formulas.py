"""What calibration needs in memory for Llama-3-8B and Llama-3-70B, computed from the formulas (not measured).

    python benchmarks/memory_formulas.py [--windows 32] [--seq-len 2048] [--batch 8] [--drop 8,20]

Per process (per rank under torchrun: every rank holds what it needs for its share of the batches, and the same
sums). b = 2 bytes (bfloat16 weights and hidden states); sums are float64 (8 bytes).

  weights, normal mode           P · b
  weights, layer by layer        (one layer + embeddings + final norm) · b
  one matrix of sums             C² · 8   (a Gram XᵀX or a cross XᵀY)
  sums, a chosen block           2 C² · 8                 (--select manual, or --two-pass)
  sums, streamline/angular       2 (L − n + 1) C² · 8     (every candidate block, one pass)
  sums, shortgpt                 2 L C² · 8               (every layer, one pass)
  one batch in float64           B · T · C · 8            (the captured states are summed in float64)
  cached states, layer by layer  (n + 2) · N · T · C · b  (the current state of every window, and the n + 1
                                                           boundaries a streamline pair waits for)
  stored activations (reference) 2 · N · T · C · 4 per block (X and Y in float32)
"""

from __future__ import annotations

import argparse

MODELS = {  # public architecture numbers
    "Llama-3-8B": dict(params=8.03e9, hidden=4096, layers=32, intermediate=14336, vocab=128256, kv_heads=8, heads=32),
    "Llama-3-70B": dict(params=70.6e9, hidden=8192, layers=80, intermediate=28672, vocab=128256, kv_heads=8, heads=64),
}
GB = 1e9


def layer_params(m: dict) -> float:
    c, i = m["hidden"], m["intermediate"]
    kv = c * m["kv_heads"] // m["heads"]
    return 2 * c * c + 2 * c * kv + 3 * c * i  # q, o; k, v; gate, up, down (norms are negligible)


def rows(name: str, m: dict, drop: int, windows: int, seq_len: int, batch: int) -> list[tuple[str, float]]:
    c, n_layers, b = m["hidden"], m["layers"], 2
    tokens = windows * seq_len
    matrix = c * c * 8
    return [
        ("weights, normal mode", m["params"] * b),
        ("weights, layer by layer (one layer + embeddings)", (layer_params(m) + m["vocab"] * c) * b),
        ("one matrix of sums (C² float64)", matrix),
        ("sums: the chosen block only (manual, --two-pass)", 2 * matrix),
        (f"sums: streamline, every candidate of {drop} (one pass)", 2 * (n_layers - drop + 1) * matrix),
        ("sums: shortgpt, every layer (one pass)", 2 * n_layers * matrix),
        (f"one batch of {batch}×{seq_len} states in float64", batch * seq_len * c * 8),
        (f"cached states, layer by layer, streamline {drop} ({drop + 2} copies)", (drop + 2) * tokens * c * b),
        ("stored X and Y of one block, float32 (the reference code)", 2 * tokens * c * 4),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--drop", default="8,20", help="layers removed, per model in the order above")
    args = ap.parse_args()
    drops = [int(d) for d in args.drop.split(",")]
    print(f"Computed from the formulas (not measured): {args.windows} windows of {args.seq_len} tokens, bfloat16 "
          f"weights and states, float64 sums, batch {args.batch}.\n")
    for (name, m), drop in zip(MODELS.items(), drops):
        print(f"### {name} (C = {m['hidden']}, L = {m['layers']}, {m['params'] / 1e9:.1f}B parameters), drop {drop}\n")
        print("| what | GB |\n|---|---|")
        for what, value in rows(name, m, drop, args.windows, args.seq_len, args.batch):
            print(f"| {what} | {value / GB:.2f} |")
        print()


if __name__ == "__main__":
    main()
