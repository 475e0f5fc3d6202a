"""The next-token loss a pruned and repaired model gets on held-out windows, computed from where it first differs
from a reference model: the criteria `loss` and `loss-greedy` (select.py) score candidates with it.

A candidate model agrees with the reference (the dense model, or the model pruned so far) on every layer before some
position p; so the loss is computed by one forward of the reference that records the raw input of every layer
(`layer_states`), then, per candidate, a forward that skips the layers before p and starts p from the recorded
state (`resumed_loss`): the candidate's own layers, final norm and LM head do the rest, so the result is the
candidate's full-forward loss (up to float rounding). Under torch.distributed each rank scores its share of the
windows and the sums are added, so every rank makes the same choice.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from . import distributed, recovery
from .capture import batches, capture
from .errors import GhostlayersError
from .hooks import hooked, received
from .maps import Operator, remove_layer
from .models import adapter
from .options import FitOptions
from .plan import Plan
from .surgery import apply

if TYPE_CHECKING:
    from .capture import Stats


@dataclass
class States:
    """Held-out batches (this rank's share) and, per batch, the raw input of each boundary module of a reference
    model: decoder layer p's input before any operator of its own, for p = 0 … L (L: the final norm's)."""

    batches: list[tuple[Tensor, Tensor]]
    inputs: list[list[Tensor]]


@torch.inference_mode()
def layer_states(model: PreTrainedModel, windows: Tensor, batch_size: int = 8) -> States:
    """One forward of `model` over this rank's share of `windows`, keeping every boundary module's raw input."""
    ad = adapter(model)
    device = next(model.parameters()).device
    mine, _ = distributed.shard(windows)
    work = [(ids.to(device), mask.to(device)) for ids, mask in batches(mine, batch_size)]
    inputs: list[list[Tensor]] = []
    for ids, mask in work:
        got: list[Tensor] = [torch.empty(0)] * (ad.num_layers + 1)

        def keep(index: int, args, kwargs) -> None:
            got[index] = received(args, kwargs)

        with hooked([(ad.boundary_module(i), "input", lambda m, a, k, i=i: keep(i, a, k))
                     for i in range(ad.num_layers + 1)]):
            ad.backbone(input_ids=ids, attention_mask=mask, use_cache=False)
        inputs.append(got)
    return States(work, inputs)


class _Skip(nn.Module):
    """Stands in for a decoder layer before the resume point: returns its input (the layer is not run)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states


@contextmanager
def _resumed(model: PreTrainedModel, start: int, state: Tensor) -> Iterator[None]:
    """For the duration, `model`'s layers before `start` are skipped and boundary module `start` receives `state`."""
    ad = adapter(model)
    layers = ad.backbone.layers
    ad.backbone.layers = nn.ModuleList([_Skip(layer) for layer in layers[:start]] + list(layers[start:]))

    def swap(module, args, kwargs):
        if args:
            return (state, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": state}

    try:
        with hooked([(ad.boundary_module(start), "input", swap)]):
            yield
    finally:
        ad.backbone.layers = layers


@torch.inference_mode()
def resumed_loss(model: PreTrainedModel, states: States, start: int) -> float:
    """Mean next-token NLL of `model` on the held-out windows, running it from boundary module `start`, whose raw
    input there is `states.inputs[·][start]` (the reference agrees with `model` on every layer before `start`)."""
    total = torch.zeros(1, dtype=torch.float64, device=next(model.parameters()).device)
    count = 0
    for (ids, mask), inputs in zip(states.batches, states.inputs):
        with _resumed(model, start, inputs[start]):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        keep = mask[:, 1:].bool()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), ids[:, 1:][keep], reduction="sum")
        total += nll.double()
        count += int(keep.sum())
    (count,) = distributed.current().all_reduce([total], [count])
    if count == 0:
        raise GhostlayersError("no held-out tokens to score the candidates on: use more --select-windows")
    return float(total) / count


@dataclass
class LossContext:
    """What the loss criteria score with: the dense model, the held-out windows, the recovery installed on each
    candidate and its fit options. The dense states are recorded once, on first use."""

    model: PreTrainedModel
    held_out: Tensor
    method: str = "ghost"
    fit: FitOptions = field(default_factory=FitOptions)
    batch_size: int = 8
    progress: bool = True
    _dense: States | None = field(default=None, repr=False)

    def dense_states(self) -> States:
        if self._dense is None:
            self._dense = layer_states(self.model, self.held_out, self.batch_size)
        return self._dense

    def block_loss(self, stats: Stats, block: tuple[int, int]) -> float:
        """The held-out loss of the dense model without `block`, its recovery fitted from `stats` and applied."""
        n = adapter(self.model).num_layers
        plan = Plan(n, tuple(range(*block)))
        how = recovery.get(self.method)
        try:
            operators = recovery.fit(self.method, stats, plan, self.fit)
        except GhostlayersError:  # e.g. replaceme on a block at layer 0: this candidate cannot be repaired
            return float("inf")
        candidate = apply(self.model, plan.removed, operators)
        s = block[0]
        start = s if how.at_boundary or s == 0 else s - 1  # ReplaceMe changes the layer before the block
        return resumed_loss(candidate, self.dense_states(), start)


def greedy_loss(
    context: LossContext, windows: Tensor, drop: int
) -> tuple[list[int], dict[str, float]]:
    """SLEB-style selection: remove one layer at a time, each time the kept layer whose removal, repaired by the
    context's recovery (fitted on the model pruned so far, from one pass of it over the fit `windows`), gives the
    lowest held-out loss. Per step: one pass over `windows`, one over the held-out windows, and per candidate the
    layers from it to the end. Returns the layers in the order picked and each pick's loss."""
    model, method = context.model, context.method
    how = recovery.get(method)
    if not how.at_boundary and how.placement != "nothing":
        raise GhostlayersError(f"--select loss-greedy repairs each candidate at its boundary, which {method} does not "
                               "act at: use --select loss, or a recovery with a boundary operator")
    ad = adapter(model)
    n, hidden = ad.num_layers, ad.hidden_size
    removed: list[int] = []
    operators: list[Operator] = []
    scores: dict[str, float] = {}
    show = context.progress and distributed.is_main()
    for _ in tqdm(range(drop), desc="loss-greedy", unit="layer", disable=not show, leave=False):
        current = apply(model, removed, operators) if removed else model
        kept = Plan(n, tuple(sorted(removed))).kept
        pairs = [(k, k + 1) for k in range(len(kept))]
        stats = capture(current, windows, recovery.needs(method, pairs, pairs), context.batch_size, progress=False)
        states = layer_states(current, context.held_out, context.batch_size)
        best: tuple[float, int, list[Operator]] | None = None
        for k in range(len(kept)):
            trial = _remove_one(model, stats, kept, k, operators, method, context.fit, hidden)
            if trial is None:
                continue
            loss = resumed_loss(apply(model, [*removed, kept[k]], trial), states, k)
            if best is None or loss < best[0]:
                best = (loss, k, trial)
        if best is None:
            raise GhostlayersError(f"--select loss-greedy found no layer whose removal {method} can repair")
        loss, k, operators = best
        removed.append(kept[k])
        scores[str(kept[k])] = loss
        del current
    return removed, scores


def _remove_one(model: PreTrainedModel, stats: Stats, kept: list[int], k: int, operators: list[Operator],
                method: str, fit: FitOptions, hidden: int) -> list[Operator] | None:
    """The operators of the model pruned so far after also removing its layer k (kept[k] in dense numbering), or
    None when the method cannot repair it. The map fitted for (k, k + 1) from the current model's sums replaces an
    operator at that layer's input (its X is the raw input, before that operator) and is followed by any operator
    already at the next boundary. Maps stay modules while scoring (a folded kind as its module form); the final
    operators are fitted afterwards, as --fit auto says."""
    try:
        fitted = recovery.fit(method, stats, Plan(len(kept), (k,)), fit)
    except GhostlayersError:
        return None
    end = kept[k + 1] if k + 1 < len(kept) else adapter(model).num_layers  # the next dense boundary
    repair = fitted[0].map.as_module(hidden) if fitted else None  # none fits nothing
    return remove_layer(operators, kept[k], end, repair, method, hidden)
