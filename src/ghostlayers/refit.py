"""Recovery beyond the boundary: closed-form refits of the kept layers' write projections, folded into their weights.

A kept layer (pre-norm) computes  m = h + a(z)  and  out = m + f(u): z is the attention context entering o_proj,
u the gated MLP activation entering down_proj, a(z) = z W_oᵀ + b_o and f(u) = u W_downᵀ + b_down where the writes
add to the residual stream as they are (Llama, Mistral, Qwen 2/3). With the dense model's m*, out* on the same
tokens as targets, and the pruned model's own z, h, u (earlier refits and boundary operators applied), in order:

    W_oᵀ    = (ZᵀZ + λI)⁻¹ (Zᵀ T_o + λ W_oᵀ),    T_o = m* − h − b_o
    W_downᵀ = (UᵀU + λI)⁻¹ (Uᵀ T_d + λ W_downᵀ),  T_d = out* − m − b_down          λ = ρ · tr(ZᵀZ) / d

a ridge toward the weights the layer has, so λ → ∞ keeps them. On Gemma 3 each write passes a norm
n(x) = x / rms(x) · g before the addition; there the projection's target is T / g · rms(x) per token (the norm
inverted at its current input's scale, one Gauss-Newton step: a norm keeps only the direction of its input).

Tokens count in those sums as the layers after them read the stream, through a norm: a token whose stream is
more than 4× its window's median norm (the first token's massive activation) counts (4·median / ‖h‖)² times
(`RefitOptions.token_weights`, "clip"; see there why: issue 27).

Every fit reads streamed float64 sums (ZᵀZ, ZᵀT, ‖T‖²; one matrix at a time), never stored activations. The walk
runs the dense and the pruned model side by side, layer by layer, over cached per-window states, and fits each
boundary's operator when it reaches the boundary, on the state the refitted layers before it really deliver.
Cost: one pass of the dense model up to the last layer refitted, and about three of each refitted layer (its
attention for the o_proj sums, the layer for the down_proj sums, the layer again with both refits); untouched
layers before the first boundary are not run twice. Memory: the sums of one matrix plus three cached copies of the
residual stream of every calibration window (dense state, pruned state, dense mid-state) in the model's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from . import distributed
from .capture import CaptureSpec, Stats, Accumulator, finish, batches, fold_windows, token_rows, token_weights
from .errors import GhostlayersError
from .hooks import Stop, hooked, received, until_stop
from .models import adapter
from .offload import call_layer, layer_inputs
from .options import RHO_GRID, RefitOptions
from .plan import Plan
from .maps import Operator
from .models import rebuild
from .surgery import install_ghost, replace_parameter

@dataclass
class Refit:
    """One refitted matrix: where, how strongly held (ρ, λ) and its relative error ‖ZWᵀ − T‖ / ‖T‖ on the calibration
    sums with the original weights and with the refitted ones."""

    layer: int  # dense numbering
    pruned: int  # the pruned model's numbering
    matrix: str  # o_proj | down_proj
    rho: float
    lam: float
    error_before: float
    error_after: float
    target: str = "dense layer"  # or "block end" (--refit-before)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------------------------------- the maths


@dataclass
class Sums:
    """‖ZW − T‖² as a function of W (d × C) from ZᵀZ (d × d), ZᵀT (d × C) and ‖T‖²: what one refit reads."""

    gram: Tensor
    cross: Tensor
    tt: Tensor
    tokens: int = 0

    def __add__(self, other: Sums) -> Sums:
        return Sums(self.gram + other.gram, self.cross + other.cross, self.tt + other.tt, self.tokens + other.tokens)

    def __sub__(self, other: Sums) -> Sums:
        return Sums(self.gram - other.gram, self.cross - other.cross, self.tt - other.tt, self.tokens - other.tokens)

    def add(self, z: Tensor, t: Tensor, weights: Tensor | None = None) -> None:
        """Add tokens (rows of z, t), each counted `weights` times (None: once)."""
        zw, tt = (z, t.square().sum(1)) if weights is None else (z * weights[:, None], weights * t.square().sum(1))
        self.gram.addmm_(zw.T, z)
        self.cross.addmm_(zw.T, t)
        self.tt += tt.sum()
        self.tokens += len(z)

    def error(self, w: Tensor) -> float:
        """‖ZW − T‖²_F."""
        out = ((self.gram @ w) * w).sum() - 2 * (w * self.cross).sum() + self.tt  # tr(WᵀGW) − 2 tr(WᵀC) + ‖T‖²
        return float(out.clamp_min(0))

    def relative_error(self, w: Tensor) -> float:
        return math.sqrt(self.error(w) / max(float(self.tt), 1e-300))


def solve_refit(sums: Sums, w0: Tensor, rho: float) -> tuple[Tensor, float]:
    """Wᵀ = (ZᵀZ + λI)⁻¹ (ZᵀT + λ W₀ᵀ), λ = ρ · tr(ZᵀZ)/d: the ridge toward W₀ (d × C, i.e. nn.Linear's weightᵀ)."""
    d = len(sums.gram)
    lam = rho * float(torch.trace(sums.gram)) / d
    system = sums.gram.clone()
    system.diagonal().add_(lam)  # ZᵀZ + λI without a d × d identity (d = 14336 for an 8B model's down_proj)
    chol, info = torch.linalg.cholesky_ex(system)
    del system
    if int(info) != 0:
        raise GhostlayersError(f"singular system in a layer refit (ZᵀZ + λI not positive definite, ρ={rho:g}): "
                               "use more calibration windows or a larger --refit-ridge")
    w = torch.cholesky_solve(sums.cross + lam * w0, chol)
    if not torch.isfinite(w).all():
        raise GhostlayersError(f"a layer refit produced non-finite weights (ρ={rho:g}): use a larger --refit-ridge")
    return w, lam


def choose_rho(folds: list[Sums], w0: Tensor, grid: tuple[float, ...] = RHO_GRID) -> float:
    """The ρ of `grid` whose refit, fitted on all folds but one, best predicts the one left out (summed over folds)."""
    if len(folds) < 2:
        raise GhostlayersError("--refit-ridge cv needs at least two calibration folds (--folds)")
    total = sum(folds[1:], folds[0])

    def held_out(rho: float) -> float:
        try:
            return sum(f.error(solve_refit(total - f, w0, rho)[0]) for f in folds)
        except GhostlayersError:  # too few tokens left for this ρ: it loses
            return math.inf

    return min(grid, key=held_out)


# ------------------------------------------------------------------------------------------------------ the walk


@dataclass
class _Window:
    """One calibration batch as the walk carries it: mask (and each real token's window, for the token weights),
    fold, each model's per-layer call arguments."""

    mask: Tensor
    rows: Tensor
    fold: int
    dense_kw: list[dict[str, Any]]
    pruned_kw: list[dict[str, Any]]


def _same_layer(a: nn.Module, b: nn.Module) -> bool:
    """Whether two decoder layers compute the same thing: the same parameter objects and no operator."""
    return not hasattr(a, "ghost") and all(x is y for x, y in zip(a.parameters(), b.parameters(), strict=True))


@dataclass(frozen=True)
class Boundaries:
    """How the walk fits the operators of a removed block [s, e) when it reaches its boundary: `spec(block)` names
    the sums (stored as h_s = the pruned state there, h_e = the dense one), `fit(block, sums, fold sums or None)`
    returns the operators."""

    spec: Callable[[tuple[int, int]], CaptureSpec]
    fit: Callable[[tuple[int, int], Stats, list[Stats] | None], list[Operator]]
    token_weights: str = "uniform"


@torch.inference_mode()
def walk(
    dense: PreTrainedModel,
    pruned: PreTrainedModel,
    windows: Tensor,
    removed: tuple[int, ...],
    options: RefitOptions | None,
    boundaries: Boundaries | None = None,
    folds: int = 1,
    batch_size: int = 8,
    progress: bool = True,
    hold: Callable[[list[int]], AbstractContextManager[Any]] | None = None,
    stride: bool = False,
    keep: Callable[[Tensor], Tensor] | None = None,
) -> tuple[list[Operator], list[Refit]]:
    """Refit `pruned` (the dense model without `removed`, its operators so far installed as modules or folded into
    layers before the boundaries) in place, layer by layer against `dense`, as `options` says (None: refit
    nothing, only fit the boundaries in order: `pipeline.fit_sequential`).

    When the walk reaches a removed block [s, e) it fits its operators as `boundaries` says, from the sums of (what
    `pruned` delivers there, the dense h_e) split into `folds` parts of the windows (`capture.fold_windows`), and
    installs them as modules before going on (folded kinds as their matrix; `None`: no operators, e.g. for none
    and replaceme).
    Returns those operators and one `Refit` per matrix refitted. Every sum is all-reduced under torch.distributed.

    `hold(layers)`: a context in which those dense layers' weights are resident (`Offloaded.hold`, which fills the
    pruned model's shared ones too); the walk asks for one layer at a time. None: the models are in memory.
    `keep(state)`: how a cached state is kept (`spill.keeper`: in memory, or in a memory-mapped file)."""
    hold = hold or (lambda layers: nullcontext())
    keep = keep or (lambda state: state)
    da, pa = adapter(dense), adapter(pruned)
    n, hidden = da.num_layers, da.hidden_size
    plan = Plan(n, tuple(sorted(removed)))
    kept, index = plan.kept, plan.pruned_index
    blocks = plan.blocks()
    ends = {index(e): (s, e) for s, e in blocks}  # pruned boundary -> its block
    refit_at: set[int] = set()
    for s, e in blocks:
        if e < n and options is not None:
            first = index(e)
            refit_at.update(range(first, len(kept) if options.layers is None else min(first + options.layers, len(kept))))
    before_at = {index(s - 1): (s, e) for s, e in blocks if s > 0} if options is not None and options.before else {}
    last = max(refit_at | set(before_at) | set(ends))
    device = next(dense.parameters()).device

    items: list[_Window] = []
    dense_h: list[Tensor] = []
    for fold, chunk in enumerate(fold_windows(windows, folds, stride)):
        mine, _ = distributed.shard(chunk)
        for ids, mask in batches(mine, batch_size):
            ids, mask = ids.to(device), mask.to(device)
            h0, dense_kw = layer_inputs(dense, ids, mask)
            _, pruned_kw = layer_inputs(pruned, ids, mask)
            items.append(_Window(mask.bool(), token_rows(mask), fold, dense_kw, pruned_kw))
            dense_h.append(keep(h0))
    pruned_h = list(dense_h)  # the same tensors while the two models agree
    operators: list[Operator] = []
    records: list[Refit] = []
    show = progress and distributed.is_main()
    bar = tqdm(total=last + 1, desc="refitting layer by layer", unit="layer", disable=not show, leave=False)
    at = 0  # dense_h holds h_at of the dense model
    for k in range(last + 1):
        i = kept[k] if k < len(kept) else n
        dense_h = _advance(da, dense_h, items, range(at, i), hold, keep)  # through removed layers
        if k in ends and boundaries is not None:  # (installed on a layer still on disk, it goes to the fit's device)
            operators += _install(pa, k, _fit_boundary(ends[k], boundaries, items, pruned_h, dense_h, n, hidden,
                                                       device, folds), hidden)
        if k == len(kept):
            break
        with hold([i]):  # dense layer i, which pruned layer k shares
            at = i + 1
            if k in refit_at or k in before_at:
                mids, dense_h = _dense_states(da, i, dense_h, items, keep)
                if k in refit_at:
                    records.append(_refit(pa, k, "o_proj", i, pruned_h, mids, items, options, folds))
                del mids
                if k not in before_at:
                    pruned_h = _refit_down(pa, k, i, pruned_h, dense_h, items, options, folds, records, keep)
            else:
                shared = bool(items) and pruned_h[0] is dense_h[0] and _same_layer(pa.layers[k], da.layers[i])
                dense_h = _advance(da, dense_h, items, [i], None, keep)
                pruned_h = list(dense_h) if shared else [keep(call_layer(pa.layers[k], h, w.pruned_kw[k]))
                                                          for h, w in zip(pruned_h, items)]
        if k in before_at:  # before a block: layer i's output should be the block's end, h_e
            at = before_at[k][1]
            dense_h = _advance(da, dense_h, items, range(i + 1, at), hold, keep)
            with hold([i]):
                pruned_h = _refit_down(pa, k, i, pruned_h, dense_h, items, options, folds, records, keep, "block end")
        bar.update(1)
    bar.close()
    return operators, records


def _advance(da, states: list[Tensor], items: list[_Window], layers, hold=None, keep=None) -> list[Tensor]:
    """The dense states after running them through dense `layers` in order (each held resident by `hold`, each
    state kept by `keep`)."""
    for j in layers:
        with hold([j]) if hold is not None else nullcontext():
            states = [call_layer(da.layers[j], h, w.dense_kw[j]) for h, w in zip(states, items)]
            states = states if keep is None else [keep(h) for h in states]
    return states


def _refit_down(pa, k: int, i: int, states: list[Tensor], goals: list[Tensor], items: list[_Window],
                options: RefitOptions, folds: int, records: list[Refit], keep, target: str = "dense layer",
                ) -> list[Tensor]:
    """Refit pruned layer k's down_proj toward `goals` (recorded in `records`); the states after the layer."""
    records.append(_refit(pa, k, "down_proj", i, states, goals, items, options, folds, target))
    return [keep(call_layer(pa.layers[k], h, w.pruned_kw[k])) for h, w in zip(states, items)]


def _install(pa, k: int, operators: list[Operator], hidden: int) -> list[Operator]:
    """Install `operators` as modules at pruned boundary k; returns them."""
    for op in operators:
        install_ghost(pa.boundary_module(k), op.map.as_module(hidden).parts(), hidden)
    return operators


def _fit_boundary(block, how: Boundaries, items, pruned_h, dense_h, n, hidden, device, folds) -> list[Operator]:
    """The operators for `block` = [s, e), fitted on X = the pruned state at its boundary, Y = the dense h_e."""
    s, e = block
    accs = [Accumulator(how.spec(block), n, hidden, device, token_weights=how.token_weights) for _ in range(folds)]
    for x, y, w in zip(pruned_h, dense_h, items):
        acc = accs[w.fold]
        acc.start_batch(w.mask)
        acc.add(s, x)
        acc.add(e, y)
    parts = [finish(a.stats) for a in accs]
    total = sum(parts[1:], parts[0])
    return how.fit(block, total, parts if folds > 1 else None)


def _dense_states(da, i: int, states: list[Tensor], items: list[_Window], keep,
                  ) -> tuple[list[Tensor], list[Tensor]]:
    """Run dense layer i: its mid-states (the input of the norm before its MLP) and its outputs, per window."""
    mids, outs = [], []
    with hooked([(da.mid_norm(i), "input", lambda m, args, kwargs: mids.append(keep(received(args, kwargs))))]):
        for h, w in zip(states, items):
            outs.append(keep(call_layer(da.layers[i], h, w.dense_kw[i])))
    return mids, outs


def _zeros(d: int, c: int, device: torch.device) -> Sums:
    z = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=device)  # noqa: E731
    return Sums(z(d, d), z(d, c), z())


def _refit(pa, k: int, matrix: str, dense_index: int, states: list[Tensor], goals: list[Tensor],
           items: list[_Window], options: RefitOptions, folds: int, target: str = "dense layer") -> Refit:
    """Refit `matrix` (o_proj or down_proj) of pruned layer k so that the stream after its write matches `goals`
    per window (the dense mid-state, or the dense layer's output): T = goal − the stream the write is added to (the
    layer's input after its operator, or its mid-state), read on the layer's current weights."""
    layer = pa.layers[k]
    linear = pa.o_proj(k) if matrix == "o_proj" else pa.down_proj(k)
    base = pa.input_norm(k) if matrix == "o_proj" else pa.mid_norm(k)  # its input is the stream written to
    norm = pa.write_norm(k, matrix)
    got: dict[str, Tensor] = {}

    def at_base(module, args, kwargs):
        got["base"] = received(args, kwargs)

    def at_linear(module, args, output):
        got["z"], got["a"] = args[0], output
        raise Stop  # the rest of the layer is not needed

    parts = folds if options.ridge == "cv" else 1  # fold sums only where ρ is cross-validated (d² float64 each)
    sums = [_zeros(linear.in_features, linear.out_features, linear.weight.device) for _ in range(parts)]
    with hooked([(base, "input", at_base), (linear, "output", at_linear)]):
        for h, goal, w in zip(states, goals, items):
            until_stop(lambda: call_layer(layer, h, w.pruned_kw[k]))  # noqa: B023 (called at once)
            z, a, stream = (got[key][w.mask].double() for key in ("z", "a", "base"))
            weights = token_weights(stream, None, options.token_weights, w.rows)
            sums[w.fold if parts > 1 else 0].add(z, _linear_target(pa, norm, linear, goal[w.mask].double() - stream, a),
                                                 weights)
    return _solve_and_install(linear, sums, options, matrix, k, dense_index, target)


def _linear_target(pa, norm, linear: nn.Linear, target: Tensor, current: Tensor) -> Tensor:
    """What the linear's output (its bias left out) should be for the stream to receive `target` (through its
    write norm, if any, inverted at the scale of the `current` output)."""
    if norm is not None:
        target = pa.unnormalise(norm, target, current)
    if getattr(linear, "bias", None) is not None:
        target = target - linear.bias.detach().double()
    return target


def _solve_and_install(linear: nn.Linear, folds: list[Sums], options: RefitOptions, name: str, k: int,
                       dense_index: int, target: str) -> Refit:
    for part in folds:
        part.tokens = distributed.current().all_reduce([part.gram, part.cross, part.tt], [part.tokens])[0]
    sums = sum(folds[1:], folds[0])
    w0 = linear.weight.detach().double().T  # (d, C)
    rho = choose_rho(folds, w0) if options.ridge == "cv" else float(options.ridge)
    w, lam = solve_refit(sums, w0, rho)
    replace_parameter(linear, "weight", w.T.contiguous())  # a new parameter: the dense model keeps its own
    return Refit(dense_index, k, name, rho, lam, sums.relative_error(w0), sums.relative_error(w), target)


def with_weights(model: PreTrainedModel, source: PreTrainedModel, refits: list[Refit]) -> PreTrainedModel:
    """A model sharing every tensor of `model` (the dense one) except the matrices named in `refits`, which are
    `source`'s (the refitted pruned model's) at the same layers."""
    out = rebuild(model, model.config, lambda name: name)
    ad, sa = adapter(out), adapter(source)
    for r in refits:
        get = ad.o_proj if r.matrix == "o_proj" else ad.down_proj
        take = sa.o_proj if r.matrix == "o_proj" else sa.down_proj
        get(r.layer).weight = take(r.pruned).weight
    return out


def refit_manifest(options: RefitOptions | None, refits: list[Refit]) -> dict[str, Any] | None:
    """What the manifest records of a refit: the options, and every matrix with λ and its errors."""
    if options is None:
        return None
    return {"layers": "all" if options.layers is None else options.layers, "ridge": options.ridge,
            "before": options.before, "token_weights": options.token_weights, "matrices": [r.as_dict() for r in refits]}


def refit_summary(refits: list[Refit]) -> str:
    """One line for a person: how many matrices, where, and their calibration error before and after."""
    layers = sorted({r.layer for r in refits})
    before = sum(r.error_before for r in refits) / len(refits)
    after = sum(r.error_after for r in refits) / len(refits)
    return (f"refitted {len(refits)} matrices ({', '.join(dict.fromkeys(r.matrix for r in refits))}) in dense layers "
            f"{', '.join(map(str, layers))}: mean relative error on the calibration sums {before:.3f} -> {after:.3f}")
