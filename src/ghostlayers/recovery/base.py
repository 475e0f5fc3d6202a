"""The protocol every recovery method follows and the registry that lists them.

A method is one `Recovery` subclass in one file of this package, registered with `@register`: its name and help
line (the CLI's choices and help, `compare`'s list and the vanilla-format list are read from the registry), the
sums it needs, what it refuses, and `fit_pair`, the maths, which returns a typed map (`ghostlayers.maps`). The
driver (`recovery.fit`) turns those into one `maps.Operator` per removed block. Method files import torch inside
their functions, so that listing the methods (`ghostlayers prune --help`) stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from ..registry import Registry
from ..plan import Pair
from ..spec import CaptureSpec

if TYPE_CHECKING:  # nothing here imports torch: the command line reads the registry for its choices and help
    from ..capture import Stats
    from ..maps import Map
    from ..models import Adapter
    from ..options import FitOptions

Placement = Literal["module", "folded", "nothing"]


class Recovery:
    """One training-free recovery method.

    name, help:  the `--recover` value and its help line.
    placement:   where its maps end up: a run-time module at the boundary, folded into the weights (a vanilla
                 checkpoint), or nothing (no recovery).
    at_boundary: its map acts at the block's boundary, so it can be fitted sequentially on what the pruned model
                 delivers there (ReplaceMe acts inside the layer before the block: False).
    per_layer:   --fit layer fits one map per removed layer and composes them (False: one per block always).
    uses:        which fit options it reads, of "eps" (the ridge), "shape" (--affine, --rank), "token_weights".
    """

    name: ClassVar[str]
    help: ClassVar[str]
    placement: ClassVar[Placement] = "module"
    at_boundary: ClassVar[bool] = True
    per_layer: ClassVar[bool] = True
    uses: ClassVar[frozenset[str]] = frozenset()

    @property
    def in_weights(self) -> bool:
        """Nothing remains at run time: the pruned model is a checkpoint of the base architecture."""
        return self.placement != "module"

    def needs(self, pairs: list[Pair], blocks: list[Pair]) -> CaptureSpec:
        """The sums its fits need for these boundary pairs and removed blocks (Σ|h| and Σ‖h‖² always come)."""
        return CaptureSpec()

    def check(self, ad: Adapter) -> None:
        """Refuse, with a one-line error, an architecture this method cannot work on."""

    def default_fit(self, options: FitOptions) -> FitOptions:
        """The fit `prune` uses where the options that shape it were left unset (no --shrink or --rank; a
        PruneSpec without `fit`): `options` as they are, unless the method measured better defaults."""
        return options

    def fit_pair(self, stats: Stats, pair: Pair, options: FitOptions, folds: list[Stats] | None) -> Fitted:
        """The map replacing what the dense model does between boundary pair (i, j), from the sums."""
        raise NotImplementedError

    def error(self, stats: Stats, pair: Pair, fitted: Map) -> float | None:
        """The calibration fit error ‖X W + b − Y‖ / ‖X − Y‖ of `fitted`, where the sums allow it (else None)."""
        from ..operators import Moments, map_error

        i, j = pair
        if stats.token_weights != "uniform" or i not in stats.gram or pair not in stats.cross:
            return None  # weighted sums measure a weighted error: left out
        return map_error(Moments.of(stats, i, j), fitted)


@dataclass
class Fitted:
    """One fit: the map and the ridge ε it used (None where there is none)."""

    map: Map
    eps: float | None = None


REGISTRY = Registry("recovery")
register = REGISTRY.add  # class decorator: the method is available everywhere under its `name`


def get(name: str) -> Recovery:
    return REGISTRY.find(name)


def names(placement: Placement | None = None, in_weights: bool | None = None) -> tuple[str, ...]:
    """Registered methods, in registration order; only those of one placement, or only those that (do not) fold."""
    return tuple(n for n, r in REGISTRY.items() if (placement is None or r.placement == placement)
                 and (in_weights is None or r.in_weights == in_weights))
