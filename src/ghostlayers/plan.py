"""The plan: which dense layers go, how their operators are fitted, and every index that follows from that.

Pure data, no torch. Dense numbering throughout; a *boundary* b is the dense index of the first kept layer after a
removed block (or num_layers for the final norm), the place where that block's operator acts. `pruned_index` is the
one place that turns a dense index into the pruned model's.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import GhostlayersError

Pair = tuple[int, int]

# sequential: one operator per block, fitted in order on what the pruned model (earlier operators installed)
# really delivers at the block, against the dense model's output (pipeline.fit_sequential)
FITS = ("block", "layer", "sequential")
FIT_MODES = ("auto", *FITS)  # auto: block for one contiguous block, `scattered` (below) otherwise
SCATTERED_AUTO = "sequential"  # what `auto` means for a scattered removal (docs/beyond-paper: better than "layer")


@dataclass(frozen=True)
class Plan:
    """Which dense layers to remove, and how operators are fitted for them (`fit`, one of FITS):

    block:      one operator per contiguous block [s, e), fitted on the dense model's (h_s, h_e).
    layer:      one operator per removed layer p, fitted on (h_p, h_{p+1}), as the paper does for non-contiguous
                selections; adjacent ones are applied back to back at the block's end.
    sequential: one operator per block, fitted in order on the pruned model's own input (`fit_sequential`).
    """

    num_layers: int
    removed: tuple[int, ...]
    fit: str = "block"

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise GhostlayersError(f"internal: plan fit {self.fit!r} is not one of {', '.join(FITS)}")

    @property
    def per_layer(self) -> bool:
        return self.fit == "layer"

    @property
    def sequential(self) -> bool:
        return self.fit == "sequential"

    @property
    def kept(self) -> list[int]:
        """The dense indices of the layers that stay, in order: kept[k] is the pruned model's layer k."""
        gone = set(self.removed)
        return [i for i in range(self.num_layers) if i not in gone]

    def pruned_index(self, dense: int) -> int:
        """The pruned model's index of dense layer (or boundary) `dense`; num_layers maps to the pruned depth."""
        kept = self.kept
        if dense == self.num_layers:
            return len(kept)
        if dense not in kept:
            raise GhostlayersError(f"internal: dense layer {dense} is removed and has no pruned index")
        return kept.index(dense)

    def pruned_config(self, config: Any, per_layer: tuple[str, ...] = ("layer_types",)) -> Any:
        """A copy of the dense `config` for the pruned depth; each field in `per_layer` (one entry per decoder layer:
        attention types, which layers use rotary embeddings, …: `models.Family.per_layer_config`) keeps the entries
        of the kept layers."""
        out = copy.deepcopy(config)
        kept = self.kept
        out.num_hidden_layers = len(kept)
        for name in per_layer:
            values = getattr(out, name, None)
            if values is not None:
                if len(values) != self.num_layers:
                    raise GhostlayersError(f"config field {name} has {len(values)} entries for {self.num_layers} layers")
                setattr(out, name, [values[i] for i in kept])
        return out

    def blocks(self) -> list[Pair]:
        """Maximal runs [s, e) of removed layers."""
        return _runs(self.removed)

    def fit_pairs(self, block: Pair) -> list[Pair]:
        """The (X, Y) boundary pairs whose operators, applied in order, replace `block`."""
        s, e = block
        return [(p, p + 1) for p in range(s, e)] if self.per_layer else [(s, e)]


def _runs(layers: Sequence[int]) -> list[Pair]:
    runs: list[Pair] = []
    for i in layers:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def make_plan(num_layers: int, removed: Sequence[int], fit: str = "auto", scattered: str = SCATTERED_AUTO) -> Plan:
    """Validate `removed` and choose the fit mode: `auto` fits per block when the removal is one contiguous block
    and as `scattered` says otherwise (sequential; the paper fits per layer); `block`, `layer` and `sequential`
    force one."""
    layers = tuple(removed)
    check_layers(layers, num_layers)
    check_drop(len(layers), num_layers)
    if fit not in FIT_MODES:
        raise GhostlayersError(f"unknown fit mode {fit!r}: use one of {', '.join(FIT_MODES)}")
    ordered = tuple(sorted(layers))
    if fit == "auto":
        fit = scattered if len(_runs(ordered)) > 1 else "block"
    return Plan(num_layers, ordered, fit)


def check_layers(layers: Sequence[int], num_layers: int | None = None) -> None:
    """Each layer named once, none negative, and (when the depth is known) every one in range."""
    if len(set(layers)) != len(layers):
        raise GhostlayersError(f"layers {list(layers)} repeat an index: name each layer once")
    bad = [i for i in layers if i < 0 or (num_layers is not None and i >= num_layers)]
    if bad:
        where = f"this model has layers 0-{num_layers - 1}" if num_layers is not None else "layers are numbered from 0"
        raise GhostlayersError(f"layers {bad} are out of range: {where}")


def check_drop(drop: int, num_layers: int) -> None:
    if not 0 < drop < num_layers:
        raise GhostlayersError(
            f"cannot remove {drop} of {num_layers} layers: --drop must be between 1 and {num_layers - 1}"
        )


def parse_layers(text: str) -> list[int]:
    """'12-17' -> [12..17]; '3,9,14' -> [3, 9, 14]; mixtures like '3,10-12' too (ranges inclusive)."""
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise GhostlayersError(f"cannot read --layers {text!r}: write e.g. 12-17 or 3,9,14") from None
    return out
