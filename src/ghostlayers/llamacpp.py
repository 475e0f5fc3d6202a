"""A GGUF run in llama.cpp itself (llama-cpp-python), each call in a child process: an engine that crashes (a build
for another CPU dies with "Illegal instruction" in its first decode) reaches the user as a message, not a signal.

    divergence(path, base, windows)    # KL(dense ‖ llama.cpp) per token against `divergence.store_base`'s file
    greedy(path, prompts, new_tokens)  # greedy continuations of token-id prompts
    speeds(files, prompt, new, rounds) # prompt and decode tokens/s of each file, taking turns
    quantize(source, out, quant)       # llama.cpp's own quantiser (f16, q8_0, q4_0, q4_k_m, ...)

Token ids go in and come out as they are: no tokenizer of llama.cpp's is involved, so the windows are the ones
transformers scored.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

from .errors import GhostlayersError

PORTABLE_BUILD = 'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --no-cache-dir llama-cpp-python'
INSTALL = f"{PORTABLE_BUILD} (a build for any x86-64; `make gguf-check` does it)"
# llama.cpp's file types (enum llama_ftype) for the types its quantiser writes that we offer
QUANT_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k_m": 12,
               "q4_k_s": 14, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def require() -> None:
    if not available():
        raise GhostlayersError(f"llama.cpp is not installed here: {INSTALL}")


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _child(writer, fn: Callable[..., Any], args: tuple) -> None:
    try:
        writer.send(("ok", fn(*args)))
    except BaseException as err:  # noqa: BLE001 - everything goes back to the parent as a message
        writer.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        writer.close()


def in_child(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a fresh process (fn and args picklable); a crash or an exception there is a GhostlayersError."""
    context = multiprocessing.get_context("spawn")
    reader, writer = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(writer, fn, args), daemon=True)
    process.start()
    writer.close()
    try:
        status, value = reader.recv()
    except EOFError:
        process.join()
        code = process.exitcode or 0
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        hint = f" (built for another CPU? rebuild it: {PORTABLE_BUILD})" if code == -signal.SIGILL else ""
        raise GhostlayersError(f"llama.cpp died with {how}{hint}") from None
    finally:
        reader.close()
    process.join()
    if status == "error":
        raise GhostlayersError(f"llama.cpp: {value}")
    return value


def _open(path: str | Path, n_ctx: int, logits_all: bool):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=logits_all, verbose=False,
                 n_threads=_threads(), seed=0)


def _divergence(path: str, base: str, windows: Any) -> tuple[Any, Any, float, float]:
    import numpy as np
    import torch

    from .divergence import read_base, stored, tally

    windows = torch.from_numpy(windows)
    logp_all = read_base(Path(base), windows)
    llm = _open(path, windows.shape[1], logits_all=True)

    def parts():
        for i, window in enumerate(windows):
            llm.reset()
            llm.eval(window.tolist())
            logits = torch.from_numpy(np.array(llm.scores[: len(window) - 1], dtype=np.float32))
            yield stored(logp_all, i, 1)[0], logits, window[1:]

    result = tally(parts())
    llm.close()
    # numpy, not tensors, back to the parent: torch shares a tensor's storage through a handle that dies with us
    return result.kl.numpy(), result.same_top.numpy(), result.nll_dense, result.nll_pruned


def divergence(path: str | Path, base: str | Path, windows):
    """KL(dense ‖ the GGUF at `path` run in llama.cpp) per token, top-1 agreement and both perplexities (a
    `divergence.Divergence`), against the dense log-probabilities `divergence.store_base` wrote for `windows`."""
    import torch

    from .divergence import Divergence

    require()
    kl, same, nll_p, nll_q = in_child(_divergence, str(path), str(base), windows.numpy())
    return Divergence(torch.from_numpy(kl), torch.from_numpy(same), nll_p, nll_q)


def _greedy(path: str, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    llm = _open(path, max(len(p) for p in prompts) + new_tokens, logits_all=False)
    outs = []
    for prompt in prompts:
        llm.reset()
        out: list[int] = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
            out.append(int(token))
            if len(out) == new_tokens:
                break
        outs.append(out)
    llm.close()
    return outs


def greedy(path: str | Path, prompts: list[list[int]], new_tokens: int = 16) -> list[list[int]]:
    """The greedy continuation (new_tokens token ids) of each prompt in llama.cpp."""
    require()
    return in_child(_greedy, str(path), prompts, new_tokens)


def _round(llm, prompt: list[int], new: int) -> tuple[float, float]:
    llm.reset()
    started = time.perf_counter()
    llm.eval(prompt)
    mid = time.perf_counter()
    for _ in range(new):
        llm.eval([llm.sample(temp=0.0, top_k=1, repeat_penalty=1.0)])
    return len(prompt) / (mid - started), new / (time.perf_counter() - mid)


def _speeds(files: dict[str, str], prompt: list[int], new: int, rounds: int) -> dict[str, tuple[float, float]]:
    llms = {label: _open(path, len(prompt) + new, logits_all=False) for label, path in files.items()}
    times: dict[str, list[tuple[float, float]]] = {label: [] for label in files}
    for llm in llms.values():  # warm-up
        _round(llm, prompt, 8)
    for _ in range(rounds):
        for label, llm in llms.items():
            times[label].append(_round(llm, prompt, new))
    for llm in llms.values():
        llm.close()

    def median(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    return {label: (median([p for p, _ in ts]), median([g for _, g in ts])) for label, ts in times.items()}


def speeds(files: dict[str, str | Path], prompt: list[int], new: int = 64, rounds: int = 5,
           ) -> dict[str, tuple[float, float]]:
    """Median (prompt tokens/s, decode tokens/s) of each file in llama.cpp (logits of the last token only, as a user
    runs it): `prompt` then `new` greedy tokens, the files taking turns in each round so that a slower stretch of
    the machine hits them all alike."""
    require()
    return in_child(_speeds, {k: str(v) for k, v in files.items()}, prompt, new, rounds)


def version() -> str:
    from importlib.metadata import version as installed

    return installed("llama_cpp_python")


def can_prune_layers() -> bool:
    """Whether the installed llama.cpp's quantiser takes a list of layers to remove (`llama-quantize --prune-layers`)."""
    import llama_cpp

    return available() and any(name == "prune_layers" for name, _ in llama_cpp.llama_model_quantize_params._fields_)


def _quantize(source: str, out: str, ftype: int, allow_requantize: bool, prune_layers: list[int] | None) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = _threads()
    params.allow_requantize = allow_requantize
    if prune_layers:  # llama.h's `const int32_t * prune_layers`: the indices, ended by -1
        params.prune_layers = (ctypes.c_int32 * (len(prune_layers) + 1))(*prune_layers, -1)
    if llama_cpp.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"quantising {source} failed")


def quantize(source: str | Path, out: str | Path, quant: str, allow_requantize: bool = False,
             prune_layers: list[int] | None = None) -> Path:
    """`source` (a GGUF, ideally f32 or f16) written as `out` by llama.cpp's own quantiser at `quant` (QUANT_TYPES);
    allow_requantize: also from tensors already quantised (as `llama-quantize --allow-requantize`); prune_layers:
    remove these layers with no repair (`llama-quantize --prune-layers`). The file appears only when complete."""
    require()
    if quant not in QUANT_TYPES:
        raise GhostlayersError(f"unknown llama.cpp type {quant!r}: use one of {', '.join(QUANT_TYPES)}")
    if prune_layers and not can_prune_layers():
        raise GhostlayersError(f"llama-cpp-python {version()} has no --prune-layers: upgrade it")
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    in_child(_quantize, str(source), str(partial), QUANT_TYPES[quant], allow_requantize, prune_layers)
    partial.replace(out)
    return out
