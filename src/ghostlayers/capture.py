"""One forward pass over calibration windows, with hooks that add float64 sums at the layer boundaries asked for.

Notation: h_i is the residual stream entering decoder layer i (h_L enters the final norm). Nothing per token is
kept beyond the current batch: memory is the sums plus one batch of hidden states, whatever the calibration size.
Sums add across batches, runs and ranks (`Stats.__add__`, `Stats.tensors`), which is all a distributed run needs:
under torch.distributed each `capture` runs its rank's share of the windows and all-reduces the sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from . import distributed
from .errors import GhostlayersError
from .hooks import Stop, hooked, received, until_stop
from .hadamard import hadamard
from .models import adapter
from .options import TOKEN_WEIGHTS, RunOptions
from .plan import Pair
from .spec import CaptureSpec


@dataclass
class Stats:
    """Float64 sums over calibration tokens, padding excluded."""

    num_layers: int
    tokens: int = 0
    sequences: int = 0
    sumsq: dict[int, Tensor] = field(default_factory=dict)  # Σ‖h_i‖², every i in 0..L
    gram: dict[int, Tensor] = field(default_factory=dict)  # Σ h_iᵀh_i, (C, C)
    cross: dict[Pair, Tensor] = field(default_factory=dict)  # Σ h_iᵀh_j, (C, C)
    cos: dict[Pair, Tensor] = field(default_factory=dict)  # Σ cos(h_i, h_j) over tokens
    angle: dict[Pair, Tensor] = field(default_factory=dict)  # Σ arccos(cos)/π over tokens
    angle_last: dict[Pair, Tensor] = field(default_factory=dict)  # Σ arccos(cos)/π of each sequence's last token
    cos_seq: dict[Pair, Tensor] = field(default_factory=dict)  # Σ over sequences and channels of the cosine taken
    #                                                            over the sequence axis (the reference code's quirk)
    abs_sum: dict[int, Tensor] = field(default_factory=dict)  # Σ|h_i| per channel, (C,), every i in 0..L
    sum: dict[int, Tensor] = field(default_factory=dict)  # Σh_i per channel, (C,), every i in 0..L
    rot_abs: dict[int, Tensor] = field(default_factory=dict)  # Σ|h_i H| per channel, (C,)
    mlp_gram: dict[int, Tensor] = field(default_factory=dict)  # Σ m_lᵀm_l, (C, C)
    mlp_cross: dict[Pair, Tensor] = field(default_factory=dict)  # Σ m_lᵀh_j, (C, C)
    # under token weights w (computed from h_i), what the fit of a pair (i, j) needs besides `gram` and `cross`:
    weight_sum: dict[int, Tensor] = field(default_factory=dict)  # Σ w
    weighted_sum: dict[int, Tensor] = field(default_factory=dict)  # Σ w h_i, (C,)
    weighted_sum_y: dict[Pair, Tensor] = field(default_factory=dict)  # Σ w h_j, (C,)
    weighted_sumsq_y: dict[Pair, Tensor] = field(default_factory=dict)  # Σ w ‖h_j‖²

    token_weights: str = "uniform"  # how tokens count in `gram` and `cross` (see TOKEN_WEIGHTS)
    folds: list[Stats] = field(default_factory=list, repr=False)  # sums of disjoint parts of the windows, if kept

    _TABLES = ("sumsq", "gram", "cross", "cos", "angle", "angle_last", "cos_seq", "abs_sum", "sum", "rot_abs",
               "mlp_gram", "mlp_cross", "weight_sum", "weighted_sum", "weighted_sum_y", "weighted_sumsq_y")

    def tensors(self) -> Iterator[Tensor]:
        """Every sum in a fixed order (for all_reduce)."""
        for name in self._TABLES:
            table = getattr(self, name)
            for key in sorted(table):
                yield table[key]

    def __add__(self, other: Stats) -> Stats:
        if self.num_layers != other.num_layers:
            raise ValueError("cannot add statistics of models with different depths")
        if self.token_weights != other.token_weights:
            raise ValueError("cannot add statistics captured with different token weights")
        out = Stats(self.num_layers, self.tokens + other.tokens, self.sequences + other.sequences,
                    token_weights=self.token_weights)
        for name in self._TABLES:
            a, b = getattr(self, name), getattr(other, name)
            if a.keys() != b.keys():
                raise ValueError(f"cannot add statistics captured for different boundaries ({name})")
            setattr(out, name, {k: a[k] + b[k] for k in a})
        return out

    def update(self, other: Stats) -> None:
        """Add the tables of `other` (a pass over the same windows for other boundaries) that this one lacks."""
        for mine, theirs in zip(self.folds, other.folds):
            mine.update(theirs)
        for name in self._TABLES:
            mine = getattr(self, name)
            for key, value in getattr(other, name).items():
                mine.setdefault(key, value)

    def mean_cos(self, pair: Pair, sequence_axis: bool = False) -> float:
        if sequence_axis:
            return float(self.cos_seq[pair]) / (self.sequences * self.abs_sum[pair[0]].numel())
        return float(self.cos[pair]) / self.tokens

    def mean_angle(self, pair: Pair, last_token: bool = False) -> float:
        return float(self.angle_last[pair]) / self.sequences if last_token else float(self.angle[pair]) / self.tokens

    def check_finite(self) -> None:
        for i, value in sorted(self.sumsq.items()):
            if not math.isfinite(float(value)):
                raise GhostlayersError(
                    f"non-finite activations entering layer {i} during calibration: "
                    "load the model in float32 (--dtype float32) or check the weights"
                )


CLIP_FACTOR = 4.0  # "clip": a token counts as if its norm were at most this many times the batch's median norm


def token_weights(x: Tensor, first: Tensor, mode: str, rows: Tensor | None = None) -> Tensor | None:
    """Per-token weights of the fit sums for inputs x (N, C); None for uniform (every token counts once).

    The first token of every window carries a hidden state hundreds of times larger than the rest from the middle
    layers on (a "massive activation"), and so most of Σ‖x‖²: skip-first leaves it out of the fit, clip counts
    each token as if its norm were at most CLIP_FACTOR × the median norm of its window (w = min(1, (τ/‖x‖)²);
    per window, so the weights do not depend on how windows are batched or spread over ranks). `first` indexes
    each window's first token and `rows` (N,) gives each token's window.
    """
    if mode == "uniform":
        return None
    if mode == "skip-first":
        w = torch.ones(len(x), dtype=x.dtype, device=x.device)
        w[first] = 0.0
        return w
    if mode == "clip":
        norm2 = x.square().sum(1)
        rows = torch.zeros(len(x), dtype=torch.long, device=x.device) if rows is None else rows
        tau2 = torch.empty_like(norm2)
        for r in rows.unique():
            here = rows == r
            tau2[here] = CLIP_FACTOR**2 * norm2[here].median()
        return (tau2 / norm2.clamp_min(1e-300)).clamp(max=1.0)
    raise GhostlayersError(f"unknown token weighting {mode!r}: use one of {', '.join(TOKEN_WEIGHTS)}")


def _unit(x: Tensor) -> Tensor:
    """Each token's h / ‖h‖ (recomputed where needed rather than held: held states stay in the model's dtype)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def token_rows(mask: Tensor) -> Tensor:
    """(N,) the window (row of `mask`) of each real token, in the order `h[mask]` lists them."""
    lengths = mask.sum(1)
    return torch.repeat_interleave(torch.arange(len(lengths), device=mask.device), lengths)


class _Batch:
    """What the sums of one batch need while its boundaries are added: its mask, where each row's first and last
    token sit among the real tokens, and the h_i (and MLP outputs) still waiting for a partner."""

    def __init__(self, mask: Tensor):
        self.mask = mask
        lengths = mask.sum(1)
        self.tokens = int(lengths.sum())
        self.last_index = (lengths.cumsum(0) - 1)[lengths > 0]  # last real token of each row in the flat order
        self.first_index = (lengths.cumsum(0) - lengths)[lengths > 0]  # and the first
        self.rows = token_rows(mask)  # (N,) row ids
        self.held: dict[int, Tensor] = {}
        self.weighted: dict[int, Tensor] = {}  # w·h_i per token, the input side of `cross` under token weights
        self.weights: dict[int, Tensor] = {}  # w per token of h_i
        self.held_mlp: dict[int, Tensor] = {}


class Accumulator:
    """Receives h_i for i = 0..L in order for each batch and adds to the sums."""

    def __init__(
        self, spec: CaptureSpec, num_layers: int, hidden: int, device: torch.device, rotation: Tensor | None = None,
        token_weights: str = "uniform", keep: Callable[[Tensor], Tensor] | None = None,
    ):
        if token_weights not in TOKEN_WEIGHTS:
            raise GhostlayersError(f"unknown token weighting {token_weights!r}: use one of {', '.join(TOKEN_WEIGHTS)}")
        self.spec = spec
        self.token_weights = token_weights
        self.keep = keep or (lambda state: state)  # how a held state is kept until its pair (`spill.keeper`)
        self.stats = Stats(num_layers, token_weights=token_weights)
        z = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=device)  # noqa: E731
        st = self.stats
        st.sumsq = {i: z() for i in range(num_layers + 1)}
        st.abs_sum = {i: z(hidden) for i in range(num_layers + 1)}
        st.sum = {i: z(hidden) for i in range(num_layers + 1)}
        st.gram = {i: z(hidden, hidden) for i in sorted(spec.grams)}
        st.cross = {p: z(hidden, hidden) for p in sorted(spec.cross)}
        for name in ("cos", "angle", "angle_last"):
            setattr(st, name, {p: z() for p in sorted(spec.cosine)})
        st.cos_seq = {p: z() for p in sorted(spec.sequence_cosine)}
        if spec.rotated and rotation is None:  # LinearPatch-R's rotation
            rotation = hadamard(hidden)
        self.rotation = None if rotation is None else rotation.to(device, torch.float64)
        st.rot_abs = {i: z(hidden) for i in sorted(spec.rotated)}
        st.mlp_gram = {l: z(hidden, hidden) for l, _ in sorted(spec.mlp)}
        st.mlp_cross = {p: z(hidden, hidden) for p in sorted(spec.mlp)}
        if token_weights != "uniform":
            st.weight_sum = {i: z() for i in sorted(spec.grams)}
            st.weighted_sum = {i: z(hidden) for i in sorted(spec.grams)}
            st.weighted_sum_y = {p: z(hidden) for p in sorted(spec.cross)}
            st.weighted_sumsq_y = {p: z() for p in sorted(spec.cross)}
        pairs = spec.cross | spec.cosine | spec.sequence_cosine
        self.partners: dict[int, list[int]] = {}  # j -> every i paired with it
        for i, j in sorted(pairs):
            self.partners.setdefault(j, []).append(i)
        self.last_use = {i: max(j for a, j in pairs if a == i) for i, _ in pairs}  # when h_i can be dropped
        self.cosine_ends = {j for _, j in spec.cosine}  # where a cosine is completed (the earlier end is held)
        self.mlp_partners: dict[int, list[int]] = {}  # j -> every MLP l paired with h_j
        for l, j in sorted(spec.mlp):
            self.mlp_partners.setdefault(j, []).append(l)
        self.mlp_last_use = {l: max(j for a, j in spec.mlp if a == l) for l, _ in spec.mlp}
        self.b = _Batch(torch.ones(0, 0, dtype=torch.bool))  # the batch being added

    def start_batch(self, mask: Tensor) -> _Batch:
        """Count a new batch's tokens and make it the current one; returns its state, for `resume`."""
        self.b = _Batch(mask.bool())
        self.stats.tokens += self.b.tokens
        self.stats.sequences += int(len(self.b.last_index))
        return self.b

    def resume(self, batch: _Batch) -> None:
        """Make an earlier batch current again (a layer-by-layer source adds every batch at one layer at a time)."""
        self.b = batch

    def add_mlp(self, layer: int, output: Tensor) -> None:
        """m_l, the output of layer l's MLP (before it is added to the residual stream)."""
        if layer not in self.stats.mlp_gram:
            return
        m = output[self.b.mask].to(torch.float64)
        self.stats.mlp_gram[layer].addmm_(m.T, m)
        self.b.held_mlp[layer] = m

    def _cos_over_sequence(self, a: Tensor, b: Tensor) -> Tensor:
        """Σ over (sequence, channel) of cos(a[seq, :, c], b[seq, :, c]), the cosine taken along the tokens."""
        rows = int(self.b.rows.max()) + 1 if len(self.b.rows) else 0
        dot = a.new_zeros(rows, a.shape[1]).index_add_(0, self.b.rows, a * b)
        na = a.new_zeros(rows, a.shape[1]).index_add_(0, self.b.rows, a * a)
        nb = a.new_zeros(rows, a.shape[1]).index_add_(0, self.b.rows, b * b)
        return (dot / (na * nb).sqrt().clamp_min(1e-12)).sum()

    def add(self, j: int, hidden: Tensor) -> None:
        x = hidden[self.b.mask].to(torch.float64)  # (N, C): real tokens only
        s = self.stats
        s.sumsq[j] += x.square().sum()
        s.abs_sum[j] += x.abs().sum(0)
        s.sum[j] += x.sum(0)
        w = token_weights(x, self.b.first_index, self.token_weights, self.b.rows) if j in s.gram or j in self.last_use else None
        xw = x if w is None else x * w[:, None]  # (N, C): the fit side of the sums
        if j in s.gram:
            s.gram[j].addmm_(xw.T, x)
            if w is not None:
                s.weight_sum[j] += w.sum()
                s.weighted_sum[j] += xw.sum(0)
        if j in s.rot_abs:
            assert self.rotation is not None
            s.rot_abs[j] += (x @ self.rotation).abs().sum(0)
        for layer in self.mlp_partners.get(j, ()):
            s.mlp_cross[(layer, j)].addmm_(self.b.held_mlp[layer].T, x)
            if self.mlp_last_use[layer] == j:
                del self.b.held_mlp[layer]
        unit = _unit(x) if j in self.cosine_ends else None
        for i in self.partners.get(j, ()):
            xi = self.b.held[i].to(torch.float64)
            if (i, j) in s.cross:
                s.cross[(i, j)].addmm_(self.b.weighted.get(i, xi).T, x)
                if (i, j) in s.weighted_sum_y:
                    wi = self.b.weights[i]
                    s.weighted_sum_y[(i, j)] += wi @ x
                    s.weighted_sumsq_y[(i, j)] += wi @ x.square().sum(1)
            if (i, j) in s.cos:
                cos = (_unit(xi) * unit).sum(-1).clamp(-1.0, 1.0)  # (N,) per-token cosine over channels
                angle = torch.arccos(cos) / math.pi
                s.cos[(i, j)] += cos.sum()
                s.angle[(i, j)] += angle.sum()
                s.angle_last[(i, j)] += angle[self.b.last_index].sum()
            if (i, j) in s.cos_seq:
                s.cos_seq[(i, j)] += self._cos_over_sequence(xi, x)
            if self.last_use[i] == j:
                del self.b.held[i]
                self.b.weighted.pop(i, None)
                self.b.weights.pop(i, None)
        if j in self.last_use:
            self.b.held[j] = self.keep(hidden[self.b.mask])  # in the model's dtype until used
            if w is not None:
                self.b.weighted[j] = self.keep(xw)
                self.b.weights[j] = w


def batches(windows: Tensor, batch_size: int, masks: Tensor | None = None) -> Iterable[tuple[Tensor, Tensor]]:
    for start in range(0, len(windows), batch_size):
        ids = windows[start : start + batch_size]
        mask = torch.ones_like(ids) if masks is None else masks[start : start + batch_size]
        yield ids, mask


class Source(Protocol):
    """Where hidden states come from. `feed` runs the model(s) over the batches (ids and masks on `device`) and hands
    the accumulator every batch in order (`acc.start_batch`), and within it h_i at each boundary i it has."""

    num_layers: int
    hidden_size: int
    device: torch.device

    def feed(self, acc: Accumulator, batches: list[tuple[Tensor, Tensor]], progress: bool) -> None: ...


@torch.inference_mode()
def collect(
    source: Source,
    windows: Tensor,
    spec: CaptureSpec,
    run: RunOptions = RunOptions(),
    masks: Tensor | None = None,
    rotation: Tensor | None = None,
    sharding: distributed.Sharding | None = None,
) -> Stats:
    """The one capture driver: the sums `spec` asks for, over `windows` (N, T), from `source`, `run.batch_size`
    windows per forward.

    `masks` (N, T) marks real tokens (1) and padding (0); padding must be on the right, where causal attention keeps
    it from touching real tokens. `run.token_weights` (TOKEN_WEIGHTS) changes how tokens count in the Gram and cross
    sums only. `sharding` (default: this process's torch.distributed group, one rank when not launched) says which
    windows this process captures; the sums of every rank are added at the end."""
    sharding = sharding or distributed.current()
    acc = Accumulator(spec, source.num_layers, source.hidden_size, source.device, rotation, run.token_weights,
                      getattr(source, "keep", None))  # a source that caches every window's state may spill
    mine, mine_masks = sharding.shard(windows, masks)
    work = [(ids.to(source.device), mask.to(source.device)) for ids, mask in batches(mine, run.batch_size, mine_masks)]
    source.feed(acc, work, run.progress and sharding.is_main)
    return finish(acc.stats, sharding)


def fold_windows(windows: Tensor, folds: int, stride: bool = False) -> list[Tensor]:
    """The calibration windows in `folds` disjoint parts: consecutive runs, or with `stride` windows k, k + folds, …
    (one source per part of an interleaved mixture: `RunOptions.stride`)."""
    if stride:
        return [windows[k :: folds] for k in range(folds)]
    return list(windows.tensor_split(folds))


class DenseSource:
    """One forward of a model per batch, with pre-hooks at every boundary (and forward hooks on the MLPs whose
    outputs the spec wants). The LM head is never run."""

    def __init__(self, model: PreTrainedModel, desc: str = "calibrating"):
        self.model, self.desc = model, desc
        ad = adapter(model)
        self.num_layers, self.hidden_size = ad.num_layers, ad.hidden_size
        self.device = next(model.parameters()).device

    def feed(self, acc: Accumulator, batches: list[tuple[Tensor, Tensor]], progress: bool) -> None:
        bar = tqdm(total=sum(len(ids) for ids, _ in batches), desc=self.desc, unit="seq", disable=not progress,
                   leave=False)
        with _boundary_hooks(self.model, acc):
            for ids, mask in batches:
                acc.start_batch(mask)
                adapter(self.model).backbone(input_ids=ids, attention_mask=mask, use_cache=False)
                bar.update(len(ids))
        bar.close()


class PairSource:
    """The sums of one fit for `block` = [s, e) (dense numbering): X is what `pruned` delivers to its boundary module
    `pruned_index`, Y is the dense model's h_e; stored as h_s and h_e, so that a fit reads them as it reads a dense
    capture. Each model runs only up to the boundary it is read at."""

    def __init__(self, dense: PreTrainedModel, pruned: PreTrainedModel, block: Pair, pruned_index: int):
        self.dense, self.pruned, self.block, self.pruned_index = dense, pruned, block, pruned_index
        ad = adapter(dense)
        self.num_layers, self.hidden_size = ad.num_layers, ad.hidden_size
        self.device = next(dense.parameters()).device

    def feed(self, acc: Accumulator, batches: list[tuple[Tensor, Tensor]], progress: bool) -> None:
        s, e = self.block
        bar = tqdm(total=sum(len(ids) for ids, _ in batches), desc=f"fitting [{s}, {e})", unit="seq",
                   disable=not progress, leave=False)
        for ids, mask in batches:
            y = _hidden_at(self.dense, e, ids, mask)
            x = _hidden_at(self.pruned, self.pruned_index, ids, mask)
            acc.start_batch(mask)
            acc.add(s, x)
            acc.add(e, y)
            bar.update(len(ids))
        bar.close()


def capture(
    model: PreTrainedModel,
    windows: Tensor,
    spec: CaptureSpec,
    batch_size: int = 8,
    masks: Tensor | None = None,
    progress: bool = True,
    rotation: Tensor | None = None,
    token_weights: str = "uniform",
) -> Stats:
    """The dense model's sums over `windows` in one pass (`collect` from a `DenseSource`)."""
    return collect(DenseSource(model), windows, spec, RunOptions(batch_size, progress, token_weights), masks, rotation)


def finish(stats: Stats, sharding: distributed.Sharding | None = None) -> Stats:
    """Add up every rank's sums (each rank captured its share of the windows), and check them."""
    stats.tokens, stats.sequences = (sharding or distributed.current()).all_reduce(
        list(stats.tensors()), [stats.tokens, stats.sequences])
    stats.check_finite()
    return stats


def _hidden_at(model: PreTrainedModel, index: int, ids: Tensor, mask: Tensor) -> Tensor:
    """What boundary module `index` of `model` receives (before any operator of its own); the rest is not run."""
    got: list[Tensor] = []

    def hook(module, args, kwargs):
        got.append(received(args, kwargs))
        raise Stop

    ad = adapter(model)
    with hooked([(ad.boundary_module(index), "input", hook)]):
        until_stop(lambda: ad.backbone(input_ids=ids, attention_mask=mask, use_cache=False))
    return got[0]


def _boundary_hooks(model: PreTrainedModel, acc: Accumulator):
    """Hooks feeding h_i (and the MLP outputs the spec asks for) to `acc`, for the duration of a `with`."""
    ad = adapter(model)
    inputs = [(ad.boundary_module(i), "input", lambda m, args, kwargs, i=i: acc.add(i, received(args, kwargs)))
              for i in range(ad.num_layers + 1)]
    mlps = [(ad.mlp(layer), "output", lambda m, args, output, layer=layer: acc.add_mlp(layer, output))
            for layer in sorted({l for l, _ in acc.spec.mlp})]
    return hooked(inputs + mlps)
