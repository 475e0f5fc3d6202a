"""Heal the repair: a short distillation of only the parameters the closed-form repair owns.

    params = owned(pruned, removed, refits, layers=0)   # each boundary operator's parts, the refitted projections,
                                                        # and `layers` whole kept layers after each boundary
    healed = heal(dense, pruned, train, held, removed, params, HealOptions(steps=200))

The loss is KL(dense ‖ pruned) over the next-token distributions of the calibration windows, the teacher (the dense
model) run alongside, batch by batch, never stored. The two models agree up to the first layer the repair changed:
that prefix runs once per batch, in the dense model, without gradients, and both models go on from its state; only
the student's layers from there on build a graph. Everything but `params` stays frozen, so a healed model keeps its
format: a ghost is still one operator per boundary, a `none` + refit model still a plain checkpoint.

AdamW (no weight decay: the ghost is near the identity, not near zero) with each parameter's learning rate `lr`
times its own RMS, so that a C×C operator and a projection move by the same relative amount; a linear warm-up then
a cosine to `min_lr` of the peak; gradients clipped to norm `clip`; bf16 autocast on a GPU. Every `eval_every`
steps the KL on held-out calibration windows is measured; the run stops when it has not improved for `patience`
measurements and keeps the parameters of the best one (the start included: a heal never leaves a worse model on
the held-out windows than it found).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .divergence import kl_per_token
from .errors import GhostlayersError
from .models import adapter
from .offload import call_layer, layer_inputs
from .options import HealOptions
from .plan import Plan


@dataclass
class Healed:
    """What a heal did: the held-out KL at its start and at the step kept, its history, what moved, and its cost."""

    steps: int  # asked for
    steps_run: int
    best_step: int
    kl_before: float  # held-out KL(dense ‖ pruned) per token
    kl_after: float
    parameters: list[str]
    trainable: int  # numbers
    seconds: float
    estimate: dict[str, float]
    options: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)  # {"step", "train_kl", "held_out_kl"}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def record(self) -> dict[str, Any]:
        """What the manifest keeps: everything, the history at the steps the held-out KL was measured."""
        return self.as_dict() | {"history": [h for h in self.history if not math.isnan(h["held_out_kl"])]}

    def summary(self) -> str:
        return (f"healed {self.trainable / 1e6:.2f}M parameters ({len(self.parameters)} tensors) for {self.steps_run} "
                f"of {self.steps} steps in {self.seconds:.0f}s: held-out KL to the dense model {self.kl_before:.4f} → "
                f"{self.kl_after:.4f} (kept step {self.best_step})"
                + ("; no step beat the start, so the model is unchanged: try a lower --heal-lr (2e-3 healed a block "
                   "where the default's first steps overshot; docs/heal)" if self.best_step == 0 and self.steps_run
                   else ""))


def owned(pruned: PreTrainedModel, removed: tuple[int, ...] | list[int], refits: list[Any], layers: int = 0,
          ) -> dict[str, nn.Parameter]:
    """The parameters the repair owns, by name in `pruned`: every part of every boundary operator (a module), the
    projections the refit replaced (`refit.Refit`s, or their manifest dicts), and all parameters of `layers` whole
    kept layers after each boundary."""
    pa = adapter(pruned)
    names: list[str] = [n for n, _ in pruned.named_parameters() if ".ghost." in n]
    for r in refits:
        k, matrix = (r["pruned"], r["matrix"]) if isinstance(r, dict) else (r.pruned, r.matrix)
        part = "self_attn.o_proj" if matrix == "o_proj" else "mlp.down_proj"
        names.append(f"{pa.layers_prefix}.{k}.{part}.weight")
    if layers:
        plan = Plan(pa.num_layers + len(removed), tuple(sorted(removed)))
        for s, e in plan.blocks():
            first = plan.pruned_index(e)
            for k in range(first, min(first + layers, pa.num_layers)):
                names += [f"{pa.layers_prefix}.{k}.{n}" for n, _ in pa.layers[k].named_parameters()]
    params = dict(pruned.named_parameters(remove_duplicate=False))
    return {n: params[n] for n in dict.fromkeys(names) if n in params}


def _logits(model: PreTrainedModel, h: Tensor) -> Tensor:
    ad = adapter(model)
    logits = ad.lm_head(ad.final_norm(h))
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


class _Pair:
    """The dense and the pruned model from their shared prefix on: `prefix` runs the first `start` layers (the
    same in both) once, `teacher` and `student` go on from its state."""

    def __init__(self, dense: PreTrainedModel, pruned: PreTrainedModel, start: int, checkpoint: bool):
        self.dense, self.pruned, self.start, self.checkpoint = dense, pruned, start, checkpoint
        self.da, self.pa = adapter(dense), adapter(pruned)
        self.device = next(dense.parameters()).device

    @torch.no_grad()
    def prefix(self, ids: Tensor) -> tuple[Tensor, Tensor, list[dict[str, Any]], list[dict[str, Any]]]:
        """The teacher's and the student's state after the shared prefix (one tensor when there is one), and each
        model's per-layer call arguments."""
        ids = ids.to(self.device)
        mask = torch.ones_like(ids)
        h, dense_kw = layer_inputs(self.dense, ids, mask)
        mine, pruned_kw = layer_inputs(self.pruned, ids, mask)
        for k in range(self.start):
            h = call_layer(self.da.layers[k], h, dense_kw[k])
        return h, (h if self.start else mine), dense_kw, pruned_kw

    @torch.no_grad()
    def teacher(self, h: Tensor, kw: list[dict[str, Any]]) -> Tensor:
        for i in range(self.start, self.da.num_layers):
            h = call_layer(self.da.layers[i], h, kw[i])
        return _logits(self.dense, h).float().log_softmax(-1)

    def student(self, h: Tensor, kw: list[dict[str, Any]]) -> Tensor:
        from torch.utils.checkpoint import checkpoint

        for k in range(self.start, self.pa.num_layers):
            layer = self.pa.layers[k]
            if self.checkpoint and torch.is_grad_enabled():
                h = checkpoint(call_layer, layer, h, kw[k], use_reentrant=False)
            else:
                h = call_layer(layer, h, kw[k])
        return _logits(self.pruned, h)

    def loss(self, ids: Tensor) -> Tensor:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        h, mine, dense_kw, pruned_kw = self.prefix(ids)
        with autocast:
            teacher = self.teacher(h, dense_kw)
            # the positions that predict a next token in the window, as `divergence.against` counts them
            return kl_per_token(teacher[:, :-1], self.student(mine, pruned_kw)[:, :-1]).mean()

    @torch.no_grad()
    def held_out(self, windows: Tensor, batch_size: int) -> float:
        total = 0.0
        for start in range(0, len(windows), batch_size):
            ids = windows[start : start + batch_size]
            total += float(self.loss(ids)) * len(ids)
        return total / max(len(windows), 1)


def _shared_prefix(dense: PreTrainedModel, pruned: PreTrainedModel, params: dict[str, nn.Parameter]) -> int:
    """How many leading decoder layers the two models share (the same weights, no operator, none trainable; a
    model pruned in memory shares the very tensors, a saved one read back equal ones): the prefix computed once."""
    da, pa = adapter(dense), adapter(pruned)
    trainable = {id(p) for p in params.values()}

    def same(x: Tensor, y: Tensor) -> bool:
        return x is y or (x.shape == y.shape and x.dtype == y.dtype and bool(torch.equal(x, y)))

    if not same(pa.embed_tokens.weight, da.embed_tokens.weight):
        return 0
    for k in range(min(pa.num_layers, da.num_layers)):
        a, b = pa.layers[k], da.layers[k]
        if hasattr(a, "ghost") or any(id(p) in trainable for p in a.parameters()) or not all(
                same(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True)):
            return k
    return min(pa.num_layers, da.num_layers)


def estimate(pruned: PreTrainedModel, params: dict[str, nn.Parameter], start: int, batch_size: int, seq_len: int,
             checkpoint: bool, rate: float | None = None, dense_layers: int | None = None) -> dict[str, float]:
    """Bytes the heal adds to the two models in memory (gradients, AdamW's moments, the best copy, activations,
    logits) and, with `rate` (flop/s), seconds per step."""
    pa = adapter(pruned)
    config = pruned.config
    c, n = pa.hidden_size, pa.num_layers - start
    inter = int(getattr(config, "intermediate_size", 4 * c))
    heads = int(config.num_attention_heads)
    vocab = int(config.vocab_size)
    tokens = batch_size * seq_len
    trainable = sum(p.numel() for p in params.values())
    per_layer = tokens * (12 * c + 3 * inter) * 4 + batch_size * heads * seq_len**2 * 4  # saved for backward
    activations = (per_layer + n * tokens * c * 4) if checkpoint else n * per_layer
    out = {"optimizer": 4.0 * trainable * 4, "activations": float(activations),
           "logits": 4.0 * tokens * vocab * 4, "trainable": float(trainable)}
    if rate:
        layer_flops = 2.0 * sum(p.numel() for p in pa.layers[-1].parameters()) + 4.0 * seq_len * c
        head = 2.0 * c * vocab
        teacher = (dense_layers or pa.num_layers) - start
        flops = tokens * (teacher * layer_flops + head
                          + (3 + checkpoint) * (n * layer_flops + head))  # student: forward, backward (×2), recompute
        out["seconds_per_step"] = flops / rate
    return out


def _lr_lambda(options: HealOptions) -> Callable[[int], float]:
    warm = max(1, round(options.warmup * options.steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, options.steps - warm)
        return options.min_lr + (1 - options.min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _trainable_copies(pruned: PreTrainedModel, dense: PreTrainedModel, names: list[str]) -> dict[str, nn.Parameter]:
    """Give `pruned` parameters autograd can use: a copy of its own of every trainable one the dense model also holds
    (a whole kept layer is shared: training must never move the teacher), and a plain copy of every tensor made
    under inference mode (the walk's refits and operators), which autograd refuses to save for a backward pass.
    Ties are kept. Returns the trainable parameters by name."""
    dense_ids = {id(p) for p in dense.parameters()}
    trainable = set(names)
    copies: dict[int, nn.Parameter] = {}
    for module_name, module in pruned.named_modules():
        for attr, p in list(module._parameters.items()):
            name = f"{module_name}.{attr}" if module_name else attr
            if p is None or not (p.is_inference() or (name in trainable and id(p) in dense_ids)):
                continue
            if id(p) not in copies:
                copies[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=False)
            module._parameters[attr] = copies[id(p)]
        for attr, b in list(module._buffers.items()):
            if b is not None and b.is_inference():
                module._buffers[attr] = b.clone()
    params = dict(pruned.named_parameters(remove_duplicate=False))
    return {n: params[n] for n in names}


def heal(dense: PreTrainedModel, pruned: PreTrainedModel, train: Tensor, held: Tensor,
         params: dict[str, nn.Parameter], options: HealOptions, progress: bool = True,
         log: Callable[[str], None] | None = None, memory: float | None = None) -> Healed:
    """Distil `params` of `pruned` (in place) toward `dense` on the windows `train` (N, T), stopping early on `held`
    (see the module's docstring). `memory`: bytes available; a heal whose estimate exceeds it is refused."""
    from .forecast import available_memory, measure_rates

    started = time.perf_counter()
    if not params:
        raise GhostlayersError("nothing to heal: this repair owns no parameters (no operator module, no refit); "
                               "give --heal-layers K to train K whole kept layers after each boundary")
    if len(train) < 1 or len(held) < 1:
        raise GhostlayersError("the heal needs calibration windows to train on and held-out ones to stop on")
    params = _trainable_copies(pruned, dense, list(params))
    start = _shared_prefix(dense, pruned, params)
    seq_len = int(train.shape[1])
    device = next(dense.parameters()).device
    rate = measure_rates("float32", device.type).compute if options.steps else None
    checkpoint = options.checkpoint
    if memory is None:  # what the device the models are on has free
        memory = float(torch.cuda.mem_get_info(device)[0]) if device.type == "cuda" else available_memory()
    if checkpoint is None:
        plain = estimate(pruned, params, start, options.batch_size, seq_len, False)
        checkpoint = sum(v for k, v in plain.items() if k != "trainable") > 0.5 * memory
    cost = estimate(pruned, params, start, options.batch_size, seq_len, checkpoint, rate, adapter(dense).num_layers)
    need = sum(v for k, v in cost.items() if k not in ("trainable", "seconds_per_step"))
    if options.steps and need > memory:
        raise GhostlayersError(f"the heal needs about {need / 1e9:.1f} GB beyond the models and {memory / 1e9:.1f} GB "
                               "is available: lower --heal-batch, or run on a machine with more memory")
    if log is not None and options.steps:
        log(f"healing {cost['trainable'] / 1e6:.2f}M parameters from layer {start} on: about {need / 1e9:.2f} GB and "
            f"{cost.get('seconds_per_step', math.nan):.1f}s a step ({options.steps} steps at most, batch "
            f"{options.batch_size} × {seq_len}" + (", gradient checkpointing" if checkpoint else "") + ")")
    pair = _Pair(dense, pruned, start, checkpoint)
    everything = [p for p in [*pruned.parameters(), *dense.parameters()] if not p.is_inference()]
    flags = {id(p): p.requires_grad for p in everything}
    try:
        for p in everything:
            p.requires_grad_(False)
        before = pair.held_out(held, options.batch_size)
        history = [{"step": 0, "train_kl": math.nan, "held_out_kl": before}]
        best, best_step, kept = before, 0, {n: p.detach().clone() for n, p in params.items()}
        steps_run = 0
        if options.steps:
            for p in params.values():
                p.requires_grad_(True)
            rms = {n: float(p.detach().float().pow(2).mean().sqrt()) for n, p in params.items()}
            typical = sorted(v for v in rms.values() if v > 0)
            fallback = typical[len(typical) // 2] if typical else 1.0
            groups = [{"params": [p], "lr": options.lr * (rms[n] if rms[n] > 0 else fallback)}
                      for n, p in params.items()]
            optimiser = torch.optim.AdamW(groups, weight_decay=0.0)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, _lr_lambda(options))
            generator = torch.Generator().manual_seed(options.seed)
            order: list[int] = []
            stale = 0
            bar = tqdm(range(options.steps), desc="healing", unit="step", disable=not progress, leave=False)
            for step in bar:
                if len(order) < options.batch_size:
                    order += torch.randperm(len(train), generator=generator).tolist()
                batch, order = order[: options.batch_size], order[options.batch_size:]
                loss = pair.loss(train[batch])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(params.values()), options.clip)
                optimiser.step()
                schedule.step()
                steps_run = step + 1
                row = {"step": steps_run, "train_kl": float(loss.detach()), "held_out_kl": math.nan}
                if steps_run % options.eval_every == 0 or steps_run == options.steps:
                    row["held_out_kl"] = kl = pair.held_out(held, options.batch_size)
                    if kl < best:
                        best, best_step, stale = kl, steps_run, 0
                        kept = {n: p.detach().clone() for n, p in params.items()}
                    else:
                        stale += 1
                    bar.set_postfix(held_out_kl=f"{kl:.4f}", best=f"{best:.4f}")
                history.append(row)
                if stale >= options.patience:
                    break
            bar.close()
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(kept[n])
    finally:
        for p in everything:
            p.requires_grad_(flags[id(p)])
    return Healed(options.steps, steps_run, best_step, before, best, list(params), sum(p.numel() for p in params.values()),
                  time.perf_counter() - started, cost, asdict(options), history)
