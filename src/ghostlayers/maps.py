"""The typed maps a recovery method fits for one removed block, the one `compose` that chains them, and
`Operator`, a block's fitted map with how it was fitted.

Each map knows its C×C form (h ← h·W, bias aside), what it composes into when another map follows it, and where it
goes in the pruned model: a module at the boundary (`parts`) or folded into the weights (`place` writes it into
the `Edits` that `surgery.prune` applies). All tensors float64.

  Matrix          h ← h W (+ b)              module, C×C
  LowRank         h ← h + (h D) U (+ b)      module, 2·C·r
  Diagonal        h ← h · d                  module, C
  Scale           h ← α h                    folded into the writes after the boundary
  ScaledRotation  h ← α h Q                  folded into every layer after the boundary
  MlpTransform    m ← m T                    folded into down_proj of the layer before the block (no boundary map)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from .errors import GhostlayersError
from .plan import Pair


@dataclass
class Edits:
    """What `surgery.prune` applies, keyed in dense numbering: modules and folded scales / rotations at boundaries,
    folded MLP transforms at layers."""

    operators: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    scales: dict[int, float] = field(default_factory=dict)
    rotations: dict[int, Tensor] = field(default_factory=dict)
    transforms: dict[int, Tensor] = field(default_factory=dict)


class Map:
    """The protocol. `in_weights`: folded into the weights, nothing remains at run time (a vanilla checkpoint can
    hold it). ("fold" elsewhere is a cross-validation part of the calibration windows.)"""

    in_weights: ClassVar[bool] = False
    bias: Tensor | None = None

    def matrix(self, hidden: int) -> Tensor | None:
        """The C×C map W this applies at the boundary, bias aside (None: it acts before the boundary)."""
        raise NotImplementedError

    def parts(self) -> dict[str, Tensor] | None:
        """The tensors of the run-time module (`runtime.GhostOperator`); None when the map folds."""
        return None

    def place(self, edits: Edits, block: Pair) -> None:
        """Add this map, for removed block [s, e), to what the pruned model applies."""
        parts = self.parts()
        assert parts is not None, f"{type(self).__name__} must override place()"
        edits.operators[block[1]] = parts

    def describe(self, block: Pair) -> str:
        raise NotImplementedError

    def then(self, after: Map, hidden: int) -> Map:
        """This map followed by `after`, as one map (a full matrix unless both are of a kind that stays closed)."""
        return _as_matrix_map(self, hidden).then(after, hidden)

    def as_module(self, hidden: int) -> Map:
        """A module applying the same map at the boundary (folded kinds become a Matrix; modules stay as they are)."""
        return self if self.parts() is not None or self.matrix(hidden) is None else _as_matrix_map(self, hidden)


def compose(maps: list[Map], hidden: int) -> Map:
    """The maps applied in order, as one: h ← (…((h M_1) M_2)…)."""
    if not maps:
        raise GhostlayersError("internal: nothing to compose")
    out = maps[0]
    for m in maps[1:]:
        out = out.then(m, hidden)
    return out


def _eye(hidden: int, like: Tensor | None = None) -> Tensor:
    return torch.eye(hidden, dtype=torch.float64, device=None if like is None else like.device)


def _as_matrix_map(m: Map, hidden: int) -> Matrix:
    w = m.matrix(hidden)
    if w is None:
        raise GhostlayersError(f"internal: a {type(m).__name__} has no boundary form to compose")
    return Matrix(w, m.bias)


@dataclass
class Matrix(Map):
    weight: Tensor
    bias: Tensor | None = None

    def matrix(self, hidden: int) -> Tensor:
        return self.weight

    def parts(self) -> dict[str, Tensor]:
        return {"weight": self.weight} | ({"bias": self.bias} if self.bias is not None else {})

    def describe(self, block: Pair) -> str:
        return "matrix module (C x C" + (" + bias" if self.bias is not None else "") + ") at the boundary"

    def then(self, after: Map, hidden: int) -> Map:
        w = after.matrix(hidden)
        if w is None:
            raise GhostlayersError(f"internal: a {type(after).__name__} has no boundary form to compose")
        w = w.to(self.weight)
        bias = None if self.bias is None else self.bias @ w
        if after.bias is not None:
            bias = after.bias if bias is None else bias + after.bias
        return Matrix(self.weight @ w, bias)


@dataclass
class LowRank(Map):
    down: Tensor  # C×r
    up: Tensor  # r×C
    bias: Tensor | None = None

    def matrix(self, hidden: int) -> Tensor:
        return _eye(hidden, self.down) + self.down @ self.up

    def parts(self) -> dict[str, Tensor]:
        return {"down": self.down, "up": self.up} | ({"bias": self.bias} if self.bias is not None else {})

    def describe(self, block: Pair) -> str:
        bias = ", with bias" if self.bias is not None else ""
        return f"low-rank module (rank {self.down.shape[1]}{bias}) at the boundary"


@dataclass
class Diagonal(Map):
    d: Tensor

    def matrix(self, hidden: int) -> Tensor:
        return torch.diag(self.d)

    def parts(self) -> dict[str, Tensor]:
        return {"weight": self.d}

    def describe(self, block: Pair) -> str:
        return "diagonal module (C) at the boundary"

    def then(self, after: Map, hidden: int) -> Map:
        return Diagonal(self.d * after.d) if isinstance(after, Diagonal) else super().then(after, hidden)


@dataclass
class Scale(Map):
    in_weights: ClassVar[bool] = True
    alpha: float

    def matrix(self, hidden: int) -> Tensor:
        return self.alpha * _eye(hidden)

    def place(self, edits: Edits, block: Pair) -> None:
        edits.scales[block[1]] = self.alpha

    def describe(self, block: Pair) -> str:
        return "scale folded into o_proj/down_proj after the boundary"

    def then(self, after: Map, hidden: int) -> Map:
        return Scale(self.alpha * after.alpha) if isinstance(after, Scale) else super().then(after, hidden)


@dataclass
class ScaledRotation(Map):
    in_weights: ClassVar[bool] = True
    alpha: float
    q: Tensor  # orthogonal C×C

    def matrix(self, hidden: int) -> Tensor:
        return self.alpha * self.q

    def place(self, edits: Edits, block: Pair) -> None:
        edits.scales[block[1]] = self.alpha
        edits.rotations[block[1]] = self.q

    def describe(self, block: Pair) -> str:
        return "scaled rotation folded into every layer after the boundary"

    def then(self, after: Map, hidden: int) -> Map:
        if isinstance(after, ScaledRotation):
            return ScaledRotation(self.alpha * after.alpha, self.q @ after.q)
        return super().then(after, hidden)


@dataclass
class MlpTransform(Map):
    in_weights: ClassVar[bool] = True
    t: Tensor  # C×C, applied to the MLP output of layer s − 1

    def matrix(self, hidden: int) -> None:
        return None

    def place(self, edits: Edits, block: Pair) -> None:
        edits.transforms[block[0] - 1] = self.t

    def describe(self, block: Pair) -> str:
        return f"transform folded into down_proj of layer {block[0] - 1}"


@dataclass
class Operator:
    """What one method fitted for one removed block [s, e) (dense numbering): one map, composed from the maps of
    its fit pairs (one pair per block, or one per removed layer with --fit layer).

    `linear_map()` is the C×C map at the boundary whatever the kind; `scale` and `transform` (read by the manifest
    and by the refit, which must not fold a ReplaceMe transform twice) give those kinds' numbers, None for the
    others; anything else is the map's own (`op.map`)."""

    method: str
    block: Pair
    pairs: list[Pair]
    map: Map
    hidden: int
    errors: list[float] = field(default_factory=list)  # calibration fit error per pair, where the sums allow it
    eps: list[float] = field(default_factory=list)  # the ridge ε each pair's fit used

    @property
    def boundary(self) -> int:
        return self.block[1]

    def linear_map(self) -> Tensor | None:
        """The C×C map h ← h W this operator applies at the boundary, bias aside (None for ReplaceMe)."""
        return self.map.matrix(self.hidden)

    def runtime_parts(self) -> dict[str, Tensor] | None:
        """The tensors of the module installed at the boundary (see `runtime.GhostOperator`); None when folded."""
        return self.map.parts()

    def describe(self) -> str:
        return self.map.describe(self.block)

    @property
    def scale(self) -> float | None:
        return self.map.alpha if isinstance(self.map, (Scale, ScaledRotation)) else None

    @property
    def transform(self) -> Tensor | None:
        return self.map.t if isinstance(self.map, MlpTransform) else None


def remove_layer(operators: list[Operator], layer: int, end: int, repair: Map | None, method: str,
                 hidden: int) -> list[Operator]:
    """The operators of a model pruned one layer at a time, after also removing dense `layer` (whose next dense
    boundary is `end`): `repair`, fitted on that layer's raw input (before any operator there, which it therefore
    replaces) onto its output, is followed by any operator already at `end`; None: no repair. Used by the greedy
    selections, which prune as they go."""
    before = next((o for o in operators if o.block[1] == layer), None)  # absorbed: the repair starts before it
    after = next((o for o in operators if o.block[1] == end), None)  # still applied after the repair
    rest = [o for o in operators if o is not before and o is not after]
    maps = ([repair] if repair is not None else []) + ([after.map] if after is not None else [])
    if not maps:
        return rest
    start = before.block[0] if before else layer
    return [*rest, Operator(method, (start, end), [(start, end)], compose(maps, hidden), hidden)]
