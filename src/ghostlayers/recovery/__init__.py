"""Recovery methods, one file each, behind the protocol in `base`; this module is the driver that fits them.

    operators = fit("ghost", stats, plan)          # one Operator per removed block of the plan

To add a method: a new file here with a `Recovery` subclass decorated with `@register` (see docs/design.md); every
module of this package is imported below. The CLI, `compare`, the export formats and the manifest read everything
else from the registry.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from ..errors import GhostlayersError
from ..options import FitOptions, Ridge, as_fit_options
from ..plan import Pair, Plan
from ..spec import CaptureSpec
from .base import REGISTRY, Fitted, Recovery, get, names, register

if TYPE_CHECKING:  # importing this package (and so the registry) must not import torch: see base
    from ..capture import Stats
    from ..maps import Operator

# the built-in methods, in the order of the CLI's choices and of compare's default list; then any other module of
# this package (a new method is a new file here, nothing else)
from . import none, prunecomp, linearpatch, replaceme, ghost, procrustes  # noqa: E402,F401  isort: skip

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

RECOVERY = names()

__all__ = ["RECOVERY", "REGISTRY", "Fitted", "Recovery", "check", "fit", "get", "names",
           "needs", "register", "spec_for"]


def needs(method: str, pairs: list[Pair], blocks: list[Pair]) -> CaptureSpec:
    """The sums `method` needs for the given fit pairs and blocks (beyond Σ|h| and Σ‖h‖², always captured)."""
    return get(method).needs(pairs, blocks)


def spec_for(methods: tuple[str, ...] | list[str], plan: Plan) -> CaptureSpec:
    """The sums needed to fit every method in `methods` for `plan`."""
    spec = CaptureSpec()
    for method in methods:
        recovery = get(method)
        pairs = [p for b in plan.blocks() for p in (plan.fit_pairs(b) if recovery.per_layer else [b])]
        spec = spec | recovery.needs(pairs, plan.blocks())
    return spec


def check(method: str, ad=None) -> Recovery:
    """The method named `method`, refusing an unknown name or (given the model's adapter) an architecture it
    cannot work on."""
    recovery = get(method)
    if ad is not None:
        recovery.check(ad)
    return recovery


def check_options(recovery: Recovery, options: FitOptions, token_weights: str = "uniform") -> None:
    """Refuse fit options the method does not read."""
    if (options.affine or options.rank is not None or options.shrink is not None) and "shape" not in recovery.uses:
        raise GhostlayersError("--affine, --rank and --shrink shape the ghost: use them with --recover ghost")
    if token_weights != "uniform" and "token_weights" not in recovery.uses and recovery.placement != "nothing":
        users = " and ".join(n for n, r in REGISTRY.items() if "token_weights" in r.uses)
        raise GhostlayersError(f"--token-weights {token_weights} changes the {users} fits only, "
                               f"not {recovery.name}: drop it or use one of those")


def fit(
    method: str,
    stats: Stats,
    plan: Plan,
    options: FitOptions | Ridge | float | str | None = None,
    folds: list[Stats] | None = None,
) -> list[Operator]:
    """Fit `method` for every removed block of `plan` from one set of captured sums: one map per fit pair,
    composed in order into one operator per block (h ← (h W_1 + b_1) W_2 + b_2 …).

    `options`: the fit options, or just a ridge ε (a number, "rel:VALUE", a Ridge; None: the paper's 1e-6).
    `folds`: the sums of disjoint parts of the calibration windows (adding up to `stats`), for `--eps cv`.
    """
    from ..maps import Operator, compose

    recovery = get(method)
    options = as_fit_options(options)
    if recovery.placement == "nothing":
        return []
    check_options(recovery, options, stats.token_weights)
    hidden = stats.abs_sum[0].numel()
    out = []
    for block in plan.blocks():
        pairs = plan.fit_pairs(block) if recovery.per_layer else [block]
        fits: list[Fitted] = []
        errors: list[float] = []
        for pair in pairs:
            spec = recovery.needs([pair], [block])
            if not spec.covered_by(stats):
                raise GhostlayersError(f"internal: sums {spec} were not captured")
            fitted = recovery.fit_pair(stats, pair, options, folds)
            fits.append(fitted)
            if (error := recovery.error(stats, pair, fitted.map)) is not None:
                errors.append(error)
        out.append(Operator(method, block, pairs, compose([f.map for f in fits], hidden), hidden, errors,
                            [f.eps for f in fits if f.eps is not None]))
    return out
