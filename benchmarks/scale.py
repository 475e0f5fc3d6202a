"""The default prune at real sizes: peak memory, time and bytes written, next to the planner's forecast.

    python benchmarks/synthetic.py --shape 8b --out /work/scale/llama3-8b-shape
    python benchmarks/scale.py run --model /work/scale/llama3-8b-shape --layer-by-layer \\
        --runs ghost:exact,none:vanilla,none:gguf --out-root /work/scale/out --results docs/scaling/scale.jsonl
    python benchmarks/scale.py same /work/scale/out/a /work/scale/out/b     # every tensor equal, bit for bit
    python benchmarks/scale.py table docs/scaling/scale.jsonl               # the markdown table

Each run is `ghostlayers prune` in a child process (the command a user types, default settings apart from the
recovery and format named) under /usr/bin/time, whose maximum resident set size is the peak memory; its
`--dry-run` (the planner) runs first with the same arguments. Phase times come from the run's own log lines
(calibrated in …, repaired in …, written in …). Rows are appended to --results as each run ends, so a cut-off
benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

GB = 1e9


def disk(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def forecast(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "ghostlayers", *argv, "--dry-run"], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"--dry-run failed: {out.stderr.strip()}")
    text = out.stdout
    phases = {m[1].strip(): float(m[2]) for m in re.finditer(r"^  (\w[\w ]*?)\s+peak of this phase\s+([\d.]+)$", text, re.M)}
    peak = float(re.search(r"^  peak\s+([\d.]+)$", text, re.M)[1])
    total = float(re.search(r"^  total\s+([\d.]+)$", text, re.M)[1])
    return {"forecast_peak_gb": peak, "forecast_phase_gb": phases, "forecast_compute_s": total, "forecast": text}


def run(argv: list[str]) -> dict:
    """One prune under /usr/bin/time: peak RSS, wall time and the phase times its log reports."""
    started = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-f", "%M %e", sys.executable, "-m", "ghostlayers", *argv],
                            stderr=subprocess.PIPE, text=True, bufsize=1)
    lines = []
    assert proc.stderr is not None
    for line in proc.stderr:
        for part in line.split("\r"):
            if part.strip() and not re.match(r"^\s*\w[\w ]*:\s+\d+%", part):  # progress bars left out
                lines.append(part.rstrip())
                print(f"  [{time.perf_counter() - started:7.1f}s] {part.rstrip()}", file=sys.stderr, flush=True)
    code = proc.wait()
    if code != 0:
        raise SystemExit(f"the prune failed ({code}): {lines[-2:] if lines else ''}")
    rss_kb, wall = lines[-1].split()
    log = "\n".join(lines)
    cal = re.search(r"calibrated .*?in (\d+)s \(([\d.]+)s per layer\); repaired in (\d+)s", log)
    wrote = re.search(r"written in (\d+)s", log)
    return {"peak_gb": int(rss_kb) * 1024 / GB, "wall_s": float(wall),
            "calibrate_s": int(cal[1]) if cal else None, "per_layer_s": float(cal[2]) if cal else None,
            "repair_s": int(cal[3]) if cal else None, "write_s": int(wrote[1]) if wrote else None,
            "log_tail": lines[-8:-1]}


def cmd_run(args: argparse.Namespace) -> int:
    results = Path(args.results)
    done = set()
    if results.is_file():
        done = {r["key"] for r in map(json.loads, results.read_text().splitlines())}
    args.out_root.mkdir(parents=True, exist_ok=True)
    for item in args.runs.split(","):
        recover, format = item.split(":")
        mode = "layer-by-layer" if args.layer_by_layer else "in-memory"
        key = (f"{Path(args.model).name}:{mode}:{recover}:{format}:{args.calib_samples}x{args.seq_len}:drop{args.drop}"
               + "".join(f":{a}" for a in args.extra))
        if key in done:
            print(f"{key}: done already", file=sys.stderr)
            continue
        out = args.out_root / (f"{Path(args.model).name}-{mode}-{recover}-{format}"
                               f"{'-' + '-'.join(args.extra).replace('-', '') if args.extra else ''}"
                               f"{'.gguf' if format == 'gguf' else ''}")
        argv = ["prune", "--model", args.model, "--drop", str(args.drop), "--recover", recover, "--format", format,
                "--calib", args.calib, "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len),
                "--out", str(out), "--overwrite", *(["--layer-by-layer"] if args.layer_by_layer else []),
                *args.extra]
        print(f"{key}: ghostlayers {' '.join(argv)}", file=sys.stderr)
        row = {"key": key, "model": args.model, "mode": mode, "recover": recover, "format": format,
               "calib": f"{args.calib_samples}x{args.seq_len}", "drop": args.drop,
               "command": "ghostlayers " + " ".join(argv), **forecast(argv), **run(argv), "disk_gb": disk(out) / GB,
               "dense_disk_gb": disk(Path(args.model)) / GB}
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{key}: peak {row['peak_gb']:.2f} GB (forecast {row['forecast_peak_gb']:.2f}), wall "
              f"{row['wall_s']:.0f}s, wrote {row['disk_gb']:.2f} GB", file=sys.stderr)
    return 0


def cmd_same(args: argparse.Namespace) -> int:
    """Whether two exported folders hold the same tensors, bit for bit (names, dtypes, values)."""
    import torch
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, Path]:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        return {k: folder / "model.safetensors" for k in safe_open(folder / "model.safetensors", "pt").keys()}

    a, b = tensors(Path(args.a)), tensors(Path(args.b))
    if sorted(a) != sorted(b):
        print(f"different tensor names: {sorted(set(a) ^ set(b))[:5]}")
        return 1
    differ = []
    for key in sorted(a):
        with safe_open(a[key], "pt") as fa, safe_open(b[key], "pt") as fb:
            x, y = fa.get_tensor(key), fb.get_tensor(key)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            differ.append(key)
    print(f"{len(a)} tensors, {len(differ)} differ" + (f": {differ[:5]}" if differ else " (bit for bit the same)"))
    return 1 if differ else 0


def cmd_table(args: argparse.Namespace) -> int:
    rows = [json.loads(line) for line in Path(args.results).read_text().splitlines()]
    print("| model | mode | selection | recovery, format | calibration | peak GB (forecast) | calibrate s (s/layer) | "
          "repair s | write s | wall s | written GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        words = r["command"].split()
        chosen = (f"manual {words[words.index('--layers') + 1]}" if "--layers" in words
                  else f"{words[words.index('--select') + 1] if '--select' in words else 'ghost'} {r['drop']}")
        print(f"| {Path(r['model']).name} | {r['mode']} | {chosen} | {r['recover']}, {r['format']} | {r['calib']} | "
              f"{r['peak_gb']:.2f} ({r['forecast_peak_gb']:.2f}) | {r['calibrate_s']} ({r['per_layer_s']}) | "
              f"{r['repair_s']} | {r['write_s']} | {r['wall_s']:.0f} | {r['disk_gb']:.2f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--runs", default="ghost:exact,none:vanilla,none:gguf", help="recovery:format, comma-separated")
    r.add_argument("--drop", type=int, default=8)
    r.add_argument("--calib", default="wiki")
    r.add_argument("--calib-samples", type=int, default=4)
    r.add_argument("--seq-len", type=int, default=128)
    r.add_argument("--layer-by-layer", action="store_true")
    r.add_argument("--out-root", type=Path, required=True)
    r.add_argument("--results", required=True)
    r.add_argument("extra", nargs="*", help="more prune arguments, after --")
    s = sub.add_parser("same")
    s.add_argument("a")
    s.add_argument("b")
    t = sub.add_parser("table")
    t.add_argument("results")
    args = p.parse_args(argv)
    return {"run": cmd_run, "same": cmd_same, "table": cmd_table}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
