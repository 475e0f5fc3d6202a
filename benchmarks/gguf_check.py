"""A pruned SmolLM2 as a GGUF, run in llama.cpp itself: does it compute what transformers computes, and is it faster?

    make gguf-check        (installs llama-cpp-python, which builds llama.cpp from source, then runs this)
    python benchmarks/gguf_check.py [--drop 6] [--calib-samples 32] [--seq-len 512] [--windows 12] [--out docs/gguf]

Prunes the bundled SmolLM2-135M (a Q4_1 GGUF) with streamline and `--recover none` plus the default refit of the
two layers after the boundary (a plain checkpoint: nothing for llama.cpp to run but the base architecture), writes
it as a GGUF from the bundled file (unchanged tensors copied as they were, the refitted ones at f16 and at q8_0),
and measures, on held-out `wiki` and `news` windows:
  - perplexity in transformers (the GGUF read back) and in llama.cpp (llama-cpp-python, logits of every token);
  - the greedy continuation of a few prompts in both;
  - llama.cpp's speed (prompt tokens per second, generated tokens per second), dense file against pruned.
Writes README.md and results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import torch

from ghostlayers import PruneSpec, llamacpp, prune
from ghostlayers.data import calibration_windows, eval_windows
from ghostlayers.evaluate import perplexity
from ghostlayers.models import load_model, smollm2_gguf
from ghostlayers.report import markdown_table
from ghostlayers.select import Selection

PROMPTS = ["The capital of France is", "Water boils at a temperature of", "The first president of the United States"]


def llama_cpp(path: Path, n_ctx: int, logits_all: bool = True):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=logits_all, verbose=False, n_threads=2,
                 seed=0)


def cpp_perplexity(llm, windows: torch.Tensor) -> float:
    nll, n = 0.0, 0
    for window in windows:
        llm.reset()
        llm.eval(window.tolist())
        logp = torch.log_softmax(torch.tensor(llm.scores[: len(window) - 1], dtype=torch.float64), -1)
        nll -= logp.gather(1, window[1:, None]).sum().item()
        n += len(window) - 1
    return math.exp(nll / n)


def cpp_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    return [t for _, t in zip(range(n), llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0))]


def hf_greedy(model, prompt: list[int], n: int, eos: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=eos)
    return out[0, len(prompt):].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drop", type=int, default=6)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=12, help="held-out windows of each text")
    ap.add_argument("--out", default="docs/gguf")
    ap.add_argument("--rounds", type=int, default=7, help="timing rounds (median)")
    ap.add_argument("--report-only", action="store_true", help="rewrite README.md from --out/results.json")
    args = ap.parse_args()
    if args.report_only:
        return report_only(Path(args.out))
    import llama_cpp as lc

    torch.manual_seed(0)
    started = time.perf_counter()
    model, tok = load_model("smollm2-135m")
    windows = calibration_windows(tok, "wiki", args.calib_samples, args.seq_len, seed=0)
    result = prune(model, windows, PruneSpec(Selection("streamline", args.drop), recover="none", progress=False),
                   base_model="smollm2-135m",
                   calibration={"source": "wiki", "samples": args.calib_samples, "seq_len": args.seq_len, "seed": 0})
    print(f"pruned {result.plan.removed} in {time.perf_counter() - started:.0f}s", flush=True)
    texts = {name: eval_windows(tok, name, args.seq_len, args.windows) for name in ("wiki", "news")}
    report = {"removed": list(result.plan.removed), "llama_cpp_python": lc.__version__,
              "cpu": platform.processor() or platform.machine(), "models": {}}
    prompts = [tok(p).input_ids for p in PROMPTS]
    speed_prompt = texts["wiki"][0, :256].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        files = {"dense (bundled)": smollm2_gguf()}
        for quant in ("f16", "q8_0"):
            written = result.save_gguf(Path(tmp) / f"pruned-{quant}.gguf", tok, quant=quant, progress=False)
            print(f"{quant}: {written.summary()}", flush=True)
            files[f"pruned, refitted tensors {quant}"] = written.path
        for label, path in files.items():
            hf = load_model(str(path))[0]
            llm = llama_cpp(path, args.seq_len)
            entry = {"file_mb": round(path.stat().st_size / 1e6, 1), "layers": hf.config.num_hidden_layers}
            for name, held in texts.items():
                entry[f"{name}_hf"] = perplexity(hf, held, batch_size=4, progress=False)["perplexity"]
                entry[f"{name}_cpp"] = cpp_perplexity(llm, held)
            greedy = [(hf_greedy(hf, p, 10, tok.eos_token_id), cpp_greedy(llm, p, 10)) for p in prompts]
            entry["greedy_agree"] = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in greedy]
            entry["greedy_hf"] = [tok.decode(a) for a, _ in greedy]
            entry["greedy_cpp"] = [tok.decode(b) for _, b in greedy]
            llm.close()
            report["models"][label] = entry
            print(label, json.dumps(entry), flush=True)
        for label, (prompt_speed, gen_speed) in llamacpp.speeds(files, speed_prompt, 64, args.rounds).items():
            report["models"][label].update(prompt_tok_s=prompt_speed, gen_tok_s=gen_speed)
    report["seconds"] = round(time.perf_counter() - started)
    report["settings"] = vars(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    write_page(out, report)


def write_page(out: Path, report: dict) -> None:
    """README.md under `out` from results.json."""
    args = argparse.Namespace(**report["settings"])
    models = report["models"]
    dense = models["dense (bundled)"]
    rows = [[label, str(e["layers"]), f"{e['file_mb']:.1f}", f"{e['wiki_hf']:.2f}", f"{e['wiki_cpp']:.2f}",
             f"{100 * (e['wiki_cpp'] / e['wiki_hf'] - 1):+.2f}%", f"{e['news_hf']:.2f}", f"{e['news_cpp']:.2f}",
             f"{100 * (e['news_cpp'] / e['news_hf'] - 1):+.2f}%", "/".join(map(str, e["greedy_agree"])),
             f"{e['prompt_tok_s']:.0f} ({e['prompt_tok_s'] / dense['prompt_tok_s']:.2f}x)",
             f"{e['gen_tok_s']:.1f} ({e['gen_tok_s'] / dense['gen_tok_s']:.2f}x)"] for label, e in models.items()]
    table = markdown_table(["file", "layers", "MB", "wiki ppl, transformers", "llama.cpp", "diff",
                            "news ppl, transformers", "llama.cpp", "diff", "greedy tokens agreeing",
                            "llama.cpp prompt tok/s", "llama.cpp decode tok/s"], rows)
    greedy = "\n".join(
        f"- `{p}`\n" + "\n".join(f"  - {label}: transformers {e['greedy_hf'][i]!r}, llama.cpp {e['greedy_cpp'][i]!r}"
                                 for label, e in models.items())
        for i, p in enumerate(PROMPTS))
    removed = report["removed"]
    (out / "README.md").write_text(
        "# A pruned GGUF in llama.cpp\n\n"
        f"`python benchmarks/gguf_check.py` (what `make gguf-check` runs after the tests; llama-cpp-python "
        f"{report['llama_cpp_python']} built from source here, 2 cores, n_threads=2), {report['seconds']} s. "
        f"SmolLM2-135M (the bundled Q4_1 GGUF), streamline removes {len(removed)} layers ({removed[0]}-{removed[-1]}), "
        f"`--recover none` with the default refit of the 2 layers after the boundary, calibrated on "
        f"{args.calib_samples} × {args.seq_len} wiki tokens, written with `--format gguf` from the bundled file "
        "(unchanged tensors copied in their Q4_1 / Q8_0, the 4 refitted ones at the `--quant` shown).\n\n"
        f"Perplexity on {args.windows} held-out windows of {args.seq_len} tokens of each text, from every token's "
        "logits, in transformers (the GGUF read back, weights dequantised to float32) and in llama.cpp; greedy: how "
        f"many of 10 greedy tokens after each of {len(PROMPTS)} prompts agree before the first difference; speed: "
        "llama.cpp on a 256-token prompt and 64 decoded tokens (logits of the last token only), median of "
        f"{args.rounds} rounds in which the files take turns, against the dense file.\n\n"
        + table + "\n\nGreedy continuations:\n\n" + greedy + "\n"
    )
    print(table)


def report_only(out: Path) -> None:
    write_page(out, json.loads((out / "results.json").read_text()))


if __name__ == "__main__":
    main()
