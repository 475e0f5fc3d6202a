"""Efficiency, side by side: parameters, size on disk, prefill and decode throughput, peak memory.

    result = bench("pruned/", vs=None, settings=Settings())   # dense, pruned without operators, pruned with them
    print(bench_text(result))

- peak memory: each row is loaded in a fresh child process (`python -m ghostlayers.bench JOB`) that runs the
  warm-up; on CUDA `torch.cuda.max_memory_allocated`, on CPU the peak resident set size over the warm-up. One
  process per row, so no row's allocations count in another's peak.
- timings: every row is loaded in the calling process, warmed up, then timed in `repeats` interleaved rounds (one
  prefill and one decode of each row per round), so a slow drift of the machine's speed, which on a shared CPU
  exceeds the differences measured, hits every row alike. Median reported, with min and max.
- prefill: one forward of `batch_size` sequences of `seq_len` random token ids, use_cache=False, logits of the last
  position only (what generation's prefill computes); tokens/s = batch_size·seq_len / time.
- decode: greedy `generate` with the KV cache from a `prompt_len`-token prompt, exactly `new_tokens` new tokens
  (min_new_tokens = max_new_tokens); tokens/s = batch_size·new_tokens / time, the prompt's prefill included.
- ghost overhead: prefill time with the operators / without − 1, median over the rounds (the same loaded model with
  its operators switched off by `operators_disabled`); and the operators' own time inside the forward (hooks), free
  of run-to-run noise.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from .errors import GhostlayersError
from .hooks import hooked
from .surgery import ghost_modules


@dataclass(frozen=True)
class Settings:
    batch_size: int = 4
    seq_len: int = 512
    new_tokens: int = 32
    prompt_len: int = 16
    repeats: int = 5
    warmup: int = 1
    dtype: str = "auto"
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads; None: torch's default (one per core)

    def check(self) -> None:
        from .models import resolve_device, resolve_dtype

        for name in ("batch_size", "seq_len", "new_tokens", "prompt_len", "repeats", "warmup", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise GhostlayersError(f"--{name.replace('_', '-')} must be at least 1")
        resolve_dtype(self.dtype)
        resolve_device(self.device)


@dataclass(frozen=True)
class Variant:
    """One row: `path` loaded with ghostlayers.load, its operators switched off when `operators` is False."""

    name: str  # dense | pruned_without_operators | pruned_with_operators | pruned | model | vs
    path: str
    operators: bool = True
    dtype: str | None = None  # instead of Settings.dtype (the dense row of a pruned folder runs in the folder's dtype)


@contextmanager
def operators_disabled(model: PreTrainedModel) -> Iterator[None]:
    """Run `model` as the same pruning without its operators: each `Ghosted<Cls>` module is switched back to
    `Cls` (its weights and the `ghost` submodule stay, unused) and restored on exit, also after an exception."""
    modules = [model.get_submodule(name) for name in ghost_modules(model)]
    classes = [type(m) for m in modules]
    try:
        for module, cls in zip(modules, classes):
            module.__class__ = cls.__mro__[1]
        yield
    finally:
        for module, cls in zip(modules, classes):
            module.__class__ = cls


def rss_mb() -> float:
    """This process's resident set size in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """Highest resident set size while the block runs, sampled every 2 ms: `start` before it, `peak` during it."""

    def __init__(self) -> None:
        self.start = self.peak = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def release_freed_memory() -> None:
    """Hand what loading freed back to the OS (glibc's malloc_trim), so that a row's peak RSS counts the model and
    its runs, not leftovers of loading it (dequantising a GGUF file leaves hundreds of MB behind)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    started = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - started


def spread(seconds: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds), "runs": seconds}


def random_ids(model: PreTrainedModel, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, int(model.config.vocab_size), (batch, length), generator=g).to(model.device)


def prefill(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits


def decode(model: PreTrainedModel, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    config = model.generation_config
    eos = config.eos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    with torch.inference_mode():
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0 if pad is None else pad,
        )
    if out.shape != (prompt.shape[0], prompt.shape[1] + new_tokens):
        raise GhostlayersError(f"internal: generate returned shape {tuple(out.shape)}, expected {new_tokens} new tokens")
    return out


def check_context(model: PreTrainedModel, s: Settings) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max(s.seq_len, s.prompt_len + s.new_tokens) > limit:
        raise GhostlayersError(
            f"--seq-len {s.seq_len} or prompt {s.prompt_len} + --new-tokens {s.new_tokens} exceeds the model's "
            f"context of {limit} tokens"
        )


def inputs(model: PreTrainedModel, s: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefill batch and the decode prompt: random token ids, the same for every row of one vocabulary."""
    return random_ids(model, s.batch_size, s.seq_len), random_ids(model, s.batch_size, s.prompt_len, seed=1)


def peak_memory(model: PreTrainedModel, s: Settings) -> dict[str, Any]:
    """Run the `s.warmup` warm-up runs (one prefill and one decode each) and return the peak memory over them."""
    check_context(model, s)
    ids, prompt = inputs(model, s)
    device = model.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with PeakRSS() as rss:
        for _ in range(s.warmup):
            prefill(model, ids)
            decode(model, prompt, s.new_tokens)
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "memory_kind": "CUDA max allocated"}
    return {"peak_memory_mb": rss.peak, "memory_kind": "peak RSS", "rss_before_mb": rss.start}


def _operators(v: Variant, model: PreTrainedModel):
    return nullcontext() if v.operators else operators_disabled(model)


def time_rows(rows: list[tuple[Variant, PreTrainedModel]], s: Settings) -> list[dict[str, Any]]:
    """Warm-up runs, then `s.repeats` rounds in which every row runs one timed prefill and one timed decode, row
    after row, starting one row later each round: a slow drift of the machine's speed hits every row alike, and no
    row always runs first or after the same row. Rows may share a model (with and without its operators)."""
    batches = [inputs(model, s) for _, model in rows]
    for (v, model), (ids, prompt) in zip(rows, batches):
        check_context(model, s)
        with _operators(v, model):
            for _ in range(s.warmup):
                prefill(model, ids)
                decode(model, prompt, s.new_tokens)
    pre: list[list[float]] = [[] for _ in rows]
    dec: list[list[float]] = [[] for _ in rows]
    for r in range(s.repeats):
        for i in [(r + k) % len(rows) for k in range(len(rows))]:
            (v, model), (ids, prompt) = rows[i], batches[i]
            with _operators(v, model):
                pre[i].append(timed(lambda: prefill(model, ids), model.device))
                dec[i].append(timed(lambda: decode(model, prompt, s.new_tokens), model.device))
    return [
        {
            "prefill_seconds": spread(p),
            "prefill_tokens_per_s": s.batch_size * s.seq_len / statistics.median(p),
            "decode_seconds": spread(d),
            "decode_tokens_per_s": s.batch_size * s.new_tokens / statistics.median(d),
        }
        for p, d in zip(pre, dec)
    ]


def operator_overhead(model: PreTrainedModel, s: Settings) -> dict[str, Any]:
    """The operators' own time in prefill, timed by hooks around each operator's forward, over `s.repeats` runs:
    overhead = operator time / (prefill time − operator time), the end-to-end ratio minus 1 if the rest of the
    forward is unchanged, without the machine's run-to-run noise."""
    ids, _ = inputs(model, s)
    runs = [operator_seconds(model, ids) for _ in range(s.repeats)]
    return {
        "operator_seconds": [op for _, op in runs],
        "operator_overhead": statistics.median(op / (total - op) for total, op in runs),
    }


def operator_seconds(model: PreTrainedModel, ids: torch.Tensor) -> tuple[float, float]:
    """One prefill with every operator's forward timed by hooks: (prefill seconds, seconds inside operators)."""
    device = model.device
    started: list[float] = []
    spent: list[float] = []

    def before(module: torch.nn.Module, args: object, kwargs: object) -> None:
        _sync(device)
        started.append(time.perf_counter())

    def after(module: torch.nn.Module, args: object, output: object) -> None:
        _sync(device)
        spent.append(time.perf_counter() - started.pop())

    ops = ghost_modules(model).values()
    with hooked([(op, "input", before) for op in ops] + [(op, "output", after) for op in ops]):
        total = timed(lambda: prefill(model, ids), device)
    return total, sum(spent)


def load_variant(v: Variant, s: Settings) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Load `v`; returns the model and the row's facts: layers, parameters, size on disk, dtype."""
    from .export import load, weight_files
    from .models import num_parameters

    model, _, manifest = load(v.path, v.dtype or s.dtype, s.device)
    ghosts = ghost_modules(model)
    operator_params = sum(p.numel() for op in ghosts.values() for p in op.parameters())  # every part
    operator_bytes = sum(p.numel() * p.element_size() for op in ghosts.values() for p in op.parameters())
    parameters = num_parameters(model) - (0 if v.operators else operator_params)
    folder = Path(v.path).expanduser()
    if folder.is_dir():
        size = sum((folder / name).stat().st_size for name in weight_files(folder))
        how = "file" if v.operators or not ghosts else "computed: file minus operators"
        size -= 0 if v.operators else operator_bytes
    else:  # a GGUF file or an alias: its quantized file is not what runs; count the parameters at the dtype run
        size, how = sum(p.numel() * p.element_size() for p in model.parameters()), "computed"
    return model, {
        "variant": v.name,
        "model": v.path,
        "layers": int(model.config.num_hidden_layers),
        "dense_layers": (manifest or {}).get("num_layers_dense"),
        "operators": len(ghosts) if v.operators else 0,
        "parameters": parameters,
        "size_bytes": size,
        "size_source": how,
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": str(model.device),
    }


def memory_row(v: Variant, s: Settings) -> dict[str, Any]:
    """Load `v` in this process, run its warm-up: the row's facts and peak memory."""
    model, facts = load_variant(v, s)
    release_freed_memory()
    with _operators(v, model):
        return {**facts, **peak_memory(model, s)}


def memory_in_child(v: Variant, s: Settings) -> dict[str, Any]:
    """`memory_row` in a fresh process: nothing measured before counts in its peak memory."""
    job = json.dumps({"variant": asdict(v), "settings": asdict(s)})
    done = subprocess.run([sys.executable, "-m", "ghostlayers.bench", job], capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    answer = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    if answer is None:
        sys.stderr.write(done.stderr)
        raise GhostlayersError(f"measuring {v.path} failed in its child process (exit {done.returncode}; its output is above)")
    if "error" in answer:
        raise GhostlayersError(answer["error"])
    return answer


def variants(path: str, vs: str | None = None, dtype: str = "auto") -> tuple[list[Variant], list[str]]:
    """The rows for `path` (and `vs`), and notes saying what is not measured and why. Under dtype auto the dense
    row runs in the dtype the pruned folder was saved in."""
    from .export import read_manifest

    folder = Path(path).expanduser()
    manifest = read_manifest(folder) if folder.is_dir() else None
    notes: list[str] = []
    if manifest is None:
        rows = [Variant("model", path)]
    else:
        dense_dtype = manifest.get("dtype") if dtype == "auto" else None
        rows = [Variant("dense", str(manifest.get("base_model")), dtype=dense_dtype)]
        if manifest.get("ghost_modules"):
            rows += [Variant("pruned_without_operators", path, operators=False), Variant("pruned_with_operators", path)]
        else:
            method = (manifest.get("recovery") or {}).get("method")
            rows.append(Variant("pruned", path))
            notes.append(f"recovery {method!r} has no operator modules (it is folded into the weights or absent): "
                         "with and without operators are the same model, measured once")
    if vs is not None:
        rows.append(Variant("vs", vs))
    return rows, notes


def bench(
    path: str,
    vs: str | None = None,
    settings: Settings = Settings(),
    isolate: bool = True,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Measure every row of `variants(path, vs)`: peak memory in a fresh process per row (`isolate`), then the
    timings of all rows interleaved in this process. A dense base model that cannot be loaded is skipped, with a
    note. `settings.threads`, if set, applies to this process for the call."""
    settings.check()
    for spec in (path, vs):
        local = spec is not None and (spec.startswith(("/", ".", "~")) or spec.endswith(".gguf"))
        if local and not Path(spec).expanduser().exists():
            raise GhostlayersError(f"{spec} does not exist: pass a pruned folder, a model folder, a .gguf file or an alias")
    todo, notes = variants(path, vs, settings.dtype)
    load_before = os.getloadavg()[0]
    threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        rows, kept = [], []
        for v in todo:
            log(f"peak memory of {v.name} ({v.path})" + (" in a fresh process ..." if isolate else " ..."))
            try:
                rows.append((memory_in_child if isolate else memory_row)(v, settings))
                kept.append(v)
            except GhostlayersError as err:
                if v.name != "dense":
                    raise
                notes.append(f"dense model {v.path} not measured: {err}")
        models: dict[tuple[str, str], PreTrainedModel] = {}
        for v in kept:
            key = (v.path, v.dtype or settings.dtype)
            if key not in models:
                models[key] = load_variant(v, settings)[0]
        pairs = [(v, models[(v.path, v.dtype or settings.dtype)]) for v in kept]
        log(f"timing {len(kept)} rows, {settings.repeats} interleaved rounds ...")
        for row, timing in zip(rows, time_rows(pairs, settings)):
            row.update(timing, threads=torch.get_num_threads())
        for row, (v, model) in zip(rows, pairs):
            if v.operators and ghost_modules(model):
                row.update(operator_overhead(model, settings))
    finally:
        torch.set_num_threads(threads)
    machine = {"cpus": os.cpu_count(), "load_average_before": load_before}
    return {"settings": asdict(settings), "isolated": isolate, "machine": machine, "rows": rows, "notes": notes,
            **summary(rows)}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Speed-ups against the dense row (or the model given, if it is not pruned), L/(L−n) beside them, and the
    ghost overhead (in % of prefill time)."""
    by = {r["variant"]: r for r in rows}
    dense = by.get("dense") or by.get("model")
    for r in rows:
        if dense is not None:
            r["prefill_speedup"] = r["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"]
            r["decode_speedup"] = r["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
        if r.get("dense_layers"):
            r["layer_ratio"] = r["dense_layers"] / r["layers"]  # L/(L−n)
    out: dict[str, Any] = {}
    with_, without = by.get("pruned_with_operators"), by.get("pruned_without_operators")
    if with_ is not None and without is not None:
        rounds = zip(with_["prefill_seconds"]["runs"], without["prefill_seconds"]["runs"])
        out["ghost_overhead_percent"] = 100 * (statistics.median(a / b for a, b in rounds) - 1)
        out["ghost_overhead_timed_inside_percent"] = 100 * with_["operator_overhead"]
    return out


LABELS = {
    "dense": "dense",
    "pruned_without_operators": "pruned, no operators",
    "pruned_with_operators": "pruned + operators",
    "pruned": "pruned (recovery folded)",
    "model": "model",
    "vs": "vs",
}


def bench_text(result: dict[str, Any]) -> str:
    """The table, what was measured, the overhead and the notes, in Markdown."""
    from .report import markdown_table

    s = result["settings"]

    def rate(r: dict[str, Any], kind: str, tokens: int) -> str:
        t = r[f"{kind}_seconds"]
        return f"{tokens / t['median']:.0f} ({tokens / t['max']:.0f}–{tokens / t['min']:.0f})"

    def ratio(r: dict[str, Any], key: str) -> str:
        return f"{r[key]:.2f}x" if key in r else "-"

    head = ["row", "model", "layers", "dtype", "parameters", "size on disk", "prefill tok/s (min–max)", "speed-up",
            "L/(L−n)", "decode tok/s (min–max)", "speed-up", "peak MiB"]
    body = [
        [
            LABELS[r["variant"]],
            r["model"],
            str(r["layers"]),
            r["dtype"],
            f"{r['parameters'] / 1e6:.2f}M",
            f"{r['size_bytes'] / 1e6:.1f} MB" + ("" if r["size_source"] == "file" else f" ({r['size_source']})"),
            rate(r, "prefill", s["batch_size"] * s["seq_len"]),
            ratio(r, "prefill_speedup"),
            ratio(r, "layer_ratio"),
            rate(r, "decode", s["batch_size"] * s["new_tokens"]),
            ratio(r, "decode_speedup"),
            f"{r['peak_memory_mb']:.0f}",
        ]
        for r in result["rows"]
    ]
    memory = result["rows"][0]["memory_kind"] if result["rows"] else "peak RSS"
    lines = [
        markdown_table(head, body),
        "",
        f"prefill: {s['batch_size']} × {s['seq_len']} random tokens, one forward, no KV cache, last-position logits. "
        f"decode: greedy generate, {s['batch_size']} × {s['new_tokens']} new tokens with the KV cache from a "
        f"{s['prompt_len']}-token prompt, the prompt's prefill included. Median of {s['repeats']} rounds (rows "
        f"interleaved) after {s['warmup']} warm-up; peak MiB: {memory} over the warm-up, "
        + ("each row in a fresh process." if result["isolated"] else "all rows in one process (not isolated)."),
    ]
    if "ghost_overhead_percent" in result:
        lines.append(
            f"ghost overhead (prefill time with operators / without − 1): {result['ghost_overhead_percent']:+.1f}% "
            f"end to end (median over the {s['repeats']} rounds), {result['ghost_overhead_timed_inside_percent']:+.2f}% "
            "from the operators' own time inside the forward (hooks; free of the machine's run-to-run noise)."
        )
    m = result["machine"]
    threads = sorted({r["threads"] for r in result["rows"]})
    lines.append(f"machine: {m['cpus']} CPUs, torch threads {'/'.join(map(str, threads))}, 1-minute load average "
                 f"{m['load_average_before']:.2f} when the bench started (other work running at the same time skews "
                 "the timings).")
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def _child(job_text: str) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    job = json.loads(job_text)
    settings = Settings(**job["settings"])
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        row = memory_row(Variant(**job["variant"]), settings)
    except GhostlayersError as err:
        print(json.dumps({"error": str(err)}))
        sys.exit(2)
    print(json.dumps(row))


if __name__ == "__main__":
    _child(sys.argv[1])
