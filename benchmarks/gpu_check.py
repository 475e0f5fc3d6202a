"""The GPU paths no CPU test reaches: `--heal` on `cuda` (bf16 autocast) on SmolLM2 first (a minute), then the
synthetic Llama-3-8B-shaped model pruned on `cuda` in bfloat16, in memory and layer by layer, with the default
settings; wall time and peak GPU memory of each, and whether both modes write the same tensors.

    python benchmarks/gpu_check.py --folder /tmp/llama3-8b-shape      # writes the model there first if missing

Prepared for a machine with one GPU of 40 GB or more (the in-memory run holds the 16 GB of weights); run it as one
command, about 5-10 minutes with the model's writing. Prints one line per run and a summary; exit status 1 where the
two modes' tensors differ.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def prune_once(folder: Path, out: Path, layer_by_layer: bool, samples: int, seq_len: int) -> dict:
    import torch

    import ghostlayers
    from ghostlayers.api import load_dense
    from ghostlayers.data import calibration_windows
    from ghostlayers.select import Selection

    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model, tokenizer = load_dense(str(folder), "bfloat16", "cuda", layer_by_layer)
    windows = calibration_windows(tokenizer, "wiki", samples, seq_len, 0)
    loaded = time.perf_counter()
    result = ghostlayers.prune(model, windows, ghostlayers.PruneSpec(Selection("ghost", drop=8), progress=False),
                               base_model=str(folder))
    pruned = time.perf_counter()
    result.save(out, tokenizer, overwrite=True)
    done = time.perf_counter()
    row = {"mode": "layer by layer" if layer_by_layer else "in memory", "removed": list(result.plan.removed),
           "refits": len(result.refits), "load_s": loaded - started, "prune_s": pruned - loaded,
           "save_s": done - pruned, "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9, **result.seconds}
    del model, result
    torch.cuda.empty_cache()
    return row


def heal_once(steps: int) -> dict:
    """SmolLM2 pruned by 6 layers on cuda (float32 weights), then healed for `steps` steps under bf16 autocast: the
    held-out KL before and after (it must not rise), seconds per step, peak GPU memory."""
    import torch

    import ghostlayers
    from ghostlayers.api import heal
    from ghostlayers.data import calibration_windows
    from ghostlayers.models import load_model
    from ghostlayers.options import HealOptions
    from ghostlayers.select import Selection

    torch.cuda.reset_peak_memory_stats()
    model, tokenizer = load_model("smollm2-135m", "float32", "cuda")
    windows = calibration_windows(tokenizer, "wiki", 36, 512, 0)
    result = ghostlayers.prune(model, windows[:32], ghostlayers.PruneSpec(Selection("streamline", drop=6),
                                                                          progress=False))
    healed = heal(model, result, windows[:32], windows[32:], HealOptions(steps=steps, eval_every=5), progress=False)
    return {"mode": "heal on cuda", "steps_run": healed.steps_run, "kl_before": healed.kl_before,
            "kl_after": healed.kl_after, "s_per_step": healed.seconds / max(healed.steps_run, 1),
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", type=Path, default=Path("/tmp/llama3-8b-shape"))
    p.add_argument("--out", type=Path, default=Path("/tmp/gpu-check"))
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--heal-steps", type=int, default=20)
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: this script checks the GPU paths and has nothing to run here")
        return 2
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    row = heal_once(args.heal_steps)
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    if not row["kl_after"] <= row["kl_before"]:
        print("THE HEAL MADE THE HELD-OUT KL WORSE")
        return 1
    if not (args.folder / "model.safetensors.index.json").is_file():
        sys.path.insert(0, str(HERE))
        from synthetic import write

        started = time.perf_counter()
        write("8b", args.folder)
        print(f"wrote the synthetic 8B-shaped model in {time.perf_counter() - started:.0f}s")
    rows = []
    for layer_by_layer in (True, False):
        row = prune_once(args.folder, args.out / ("lbl" if layer_by_layer else "mem"), layer_by_layer,
                         args.calib_samples, args.seq_len)
        rows.append(row)
        print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    sys.path.insert(0, str(HERE))
    from scale import main as scale

    same = scale(["same", str(args.out / "mem"), str(args.out / "lbl")])
    print("in memory and layer by layer wrote the same tensors" if same == 0 else "THE TWO MODES DIFFER")
    return same


if __name__ == "__main__":
    sys.exit(main())
