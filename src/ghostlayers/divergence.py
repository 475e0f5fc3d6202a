"""How far a pruned model's next-token distributions are from its dense model's, and whether it says the same
things: what users of compressed models compare (llama.cpp's `llama-perplexity --kl-divergence`).

    against(dense, pruned, windows)          # both models in memory: streamed window by window
    base = store_base(dense, windows, path)  # the dense log-probabilities on disk (float16), then free the dense
    against_stored(base, pruned, windows)    # model and stream the pruned one against the file
    agreement(dense, pruned, prompts)        # greedy continuations side by side

Per predicted token: KL(dense ‖ pruned) = Σ_v p_v (log p_v − log q_v), and whether the two top tokens agree; the
report gives the mean KL with its median and 99th percentile, top-1 agreement (%), and each model's perplexity.
Logits are never held beyond one batch: only one float32 KL and one agreement bit per token are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .errors import GhostlayersError


@dataclass
class Divergence:
    """Per-token figures of one comparison, and their summary (`as_dict`)."""

    kl: Tensor  # (tokens,) float32: KL(dense ‖ pruned) per predicted token
    same_top: Tensor  # (tokens,) bool: the two models' most likely tokens agree
    nll_dense: float  # Σ −log p(next token), dense
    nll_pruned: float

    def as_dict(self) -> dict[str, float]:
        n = len(self.kl)
        kl = self.kl.double()
        return {"kl_mean": float(kl.mean()), "kl_median": float(kl.median()),
                "kl_p99": float(torch.quantile(kl, 0.99)) if n else math.nan,
                "top1_agreement": 100.0 * float(self.same_top.double().mean()),
                "perplexity_dense": math.exp(self.nll_dense / n), "perplexity": math.exp(self.nll_pruned / n),
                "tokens": n}


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ_v p_v (log p_v − log q_v) at each position, from both log-probabilities (…, V)."""
    return (logp.exp() * (logp - logq)).sum(-1)


def kl_per_token(dense_logp: Tensor, logits: Tensor) -> Tensor:
    """KL(dense ‖ pruned) at each position (…), from the dense log-probabilities (…, V) and the pruned model's
    logits; differentiable in the logits (what `heal` minimises)."""
    return _kl(dense_logp.float(), logits.float().log_softmax(-1))


def per_token(dense_logp: Tensor, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, float, float]:
    """KL per token, agreement per token and both NLL sums, from the dense log-probabilities (…, V) and the pruned
    model's logits at the same positions."""
    logq = logits.float().log_softmax(-1)
    logp = dense_logp.float()
    kl = _kl(logp, logq).clamp_min(0)
    same = logp.argmax(-1) == logq.argmax(-1)
    nll_p = -float(logp.gather(-1, targets[..., None]).sum())
    nll_q = -float(logq.gather(-1, targets[..., None]).sum())
    return kl.flatten(), same.flatten(), nll_p, nll_q


def tally(parts: Iterable[tuple[Tensor, Tensor, Tensor]]) -> Divergence:
    """`per_token` over (dense log-probabilities, pruned logits, next tokens) part by part, kept as one Divergence:
    one KL and one agreement bit per token, the logits dropped as each part is done."""
    kls, sames, nll_p, nll_q = [], [], 0.0, 0.0
    for logp, logits, targets in parts:
        kl, same, a, b = per_token(logp.to(logits.device), logits, targets.to(logits.device))
        kls.append(kl.cpu())
        sames.append(same.cpu())
        nll_p, nll_q = nll_p + a, nll_q + b
    return Divergence(torch.cat(kls), torch.cat(sames), nll_p, nll_q)


def _device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def against(dense: PreTrainedModel, pruned: PreTrainedModel, windows: Tensor, batch_size: int = 2,
            progress: bool = True) -> Divergence:
    """Both models over `windows` (N, T), batch by batch: T − 1 predicted tokens per window."""
    def parts() -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for start in tqdm(range(0, len(windows), batch_size), desc="KL against the dense model", unit="batch",
                          disable=not progress, leave=False):
            ids = windows[start : start + batch_size]
            logp = dense(input_ids=ids.to(_device(dense)), use_cache=False).logits[:, :-1].float().log_softmax(-1)
            yield logp, pruned(input_ids=ids.to(_device(pruned)), use_cache=False).logits[:, :-1], ids[:, 1:]

    return tally(parts())


@torch.inference_mode()
def store_base(dense: PreTrainedModel, windows: Tensor, path: str | Path, batch_size: int = 2,
               progress: bool = True) -> Path:
    """The dense model's log-probabilities of every predicted token of `windows`, float16, in the file `path`
    ((N, T − 1, V) with the windows' token ids beside it, `path`.ids.npy): what `against_stored` compares with, so
    that the two models need never be in memory together."""
    path = Path(path)
    n, t = windows.shape
    vocab = None
    out = None
    for start in tqdm(range(0, n, batch_size), desc="dense log-probabilities", unit="batch", disable=not progress,
                      leave=False):
        ids = windows[start : start + batch_size]
        logp = dense(input_ids=ids.to(_device(dense)), use_cache=False).logits[:, :-1].float().log_softmax(-1)
        if out is None:
            vocab = logp.shape[-1]
            out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, t - 1, vocab))
        out[start : start + len(ids)] = logp.clamp_min(-65000).cpu().numpy().astype(np.float16)
    assert out is not None
    out.flush()
    np.save(_ids_file(path), windows.numpy())
    return path


def _ids_file(path: Path) -> Path:
    return path.with_name(path.name + ".ids.npy")


def read_base(base: str | Path, windows: Tensor) -> np.ndarray:
    """The (memory-mapped) dense log-probabilities `store_base` wrote, refused unless they are of `windows`."""
    base = Path(base)
    try:
        logp_all = np.load(base, mmap_mode="r")
        ids_stored = np.load(_ids_file(base))
    except (OSError, ValueError) as err:
        raise GhostlayersError(f"cannot read the dense log-probabilities {base}: {err}") from None
    if ids_stored.shape != tuple(windows.shape) or not np.array_equal(ids_stored, windows.numpy()):
        raise GhostlayersError(f"{base} holds the dense model's log-probabilities of other windows: write it again "
                               "for this text, --seq-len and --max-windows")
    return logp_all


@torch.inference_mode()
def against_stored(base: str | Path, pruned: PreTrainedModel, windows: Tensor, batch_size: int = 2,
                   progress: bool = True) -> Divergence:
    """`against`, the dense side read from a file `store_base` wrote for the same windows."""
    logp_all = read_base(base, windows)

    def parts() -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for start in tqdm(range(0, len(windows), batch_size), desc="KL against the stored dense model",
                          unit="batch", disable=not progress, leave=False):
            ids = windows[start : start + batch_size]
            logits = pruned(input_ids=ids.to(_device(pruned)), use_cache=False).logits[:, :-1]
            yield stored(logp_all, start, len(ids)), logits, ids[:, 1:]

    return tally(parts())


def stored(logp_all: np.ndarray, start: int, count: int) -> Tensor:
    """Windows [start, start + count) of a `read_base` file, as float32."""
    return torch.from_numpy(np.asarray(logp_all[start : start + count], dtype=np.float32))


def _greedy(model: PreTrainedModel, prompt: Tensor, new_tokens: int) -> list[int]:
    out = model.generate(prompt[None].to(_device(model)), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _starts_with(out: list[int], answer: list[int]) -> bool:
    return len(answer) > 0 and out[: len(answer)] == answer


def summarise(prompts: list[Tensor], dense: list[list[int]], pruned: list[list[int]], new_tokens: int,
              answers: list[list[int]] | None = None) -> dict[str, Any]:
    """Greedy continuations side by side: how many tokens the two share before the first difference (mean), the
    share of prompts whose first 8 tokens are the same, and where each prompt has an answer (token ids), how often
    each model's continuation starts with it and how many the dense model got right and the pruned one lost."""
    rows = []
    for i, (prompt, a, b) in enumerate(zip(prompts, dense, pruned)):
        same = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        row: dict[str, Any] = {"prompt": prompt.tolist(), "dense": a, "pruned": b, "same_prefix": same}
        if answers is not None:
            row.update(answer=answers[i], dense_right=_starts_with(a, answers[i]), pruned_right=_starts_with(b, answers[i]))
        rows.append(row)
    n = max(len(rows), 1)
    out: dict[str, Any] = {
        "prompts": len(rows), "new_tokens": new_tokens,
        "mean_same_prefix": sum(r["same_prefix"] for r in rows) / n,
        "exact_first_8": 100.0 * sum(r["same_prefix"] >= min(8, new_tokens) for r in rows) / n}
    if answers is not None:
        out.update(dense_right=100.0 * sum(r["dense_right"] for r in rows) / n,
                   pruned_right=100.0 * sum(r["pruned_right"] for r in rows) / n,
                   lost=sum(r["dense_right"] and not r["pruned_right"] for r in rows),
                   gained=sum(r["pruned_right"] and not r["dense_right"] for r in rows))
    out["examples"] = rows
    return out


@torch.inference_mode()
def agreement(dense: PreTrainedModel, pruned: PreTrainedModel, prompts: list[Tensor], new_tokens: int = 16,
              answers: list[list[int]] | None = None) -> dict[str, Any]:
    """Greedy continuations of each prompt (1-D token ids) by both models, compared by `summarise`."""
    return summarise(prompts, [_greedy(dense, p, new_tokens) for p in prompts],
                     [_greedy(pruned, p, new_tokens) for p in prompts], new_tokens, answers)
