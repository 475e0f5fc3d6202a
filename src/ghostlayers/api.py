"""The one library call: `prune(model, windows, PruneSpec(...)) -> Result`, in memory or layer by layer.

    from ghostlayers import PruneSpec, prune
    from ghostlayers.select import Selection
    result = prune(model, windows, PruneSpec(Selection("streamline", drop=6), recover="ghost"))
    result.save("out", tokenizer)

`ghostlayers prune` is this call with its arguments mapped to a spec, plus loading and printing. Making a spec
imports nothing heavy (the command line checks its arguments with it before torch is loaded); `prune` imports the
machinery when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import recovery
from .errors import GhostlayersError
from .options import (DEFAULT_LAYERS, REFIT_NOT_PER_LAYER, FitOptions, HealOptions, RefitOptions, RunOptions,
                      check_folds)
from .plan import Plan
from .select import Selection

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import Tensor
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .capture import Stats
    from .maps import Operator
    from .offload import Offloaded
    from .gguf_export import Written
    from .heal import Healed
    from .refit import Refit


@dataclass(frozen=True)
class PruneSpec:
    """Everything a prune needs besides the model and the calibration windows, checked when it is made.

    selection:     which layers (a criterion and --drop, or manual --layers) and how to fit (`Selection.fit`)
    recover:       a registered recovery method (`recovery.REGISTRY`)
    fit:           its fit options (ridge, and for the ghost --affine, --rank, --shrink); None: the method's
                   default (`Recovery.default_fit`: for the ghost, M* shrunk toward the diagonal by a
                   cross-validated α); FitOptions() is the paper's fit
    refit:         RefitOptions (default: the measured 2 layers, ρ 0.1) or None (no refit)
    refit_auto:    the refit is a default, dropped where it does not apply (--fit layer, a block fit of
                   scattered layers) instead of refused there
    token_weights: how calibration tokens count in the fit (capture.TOKEN_WEIGHTS)
    folds:         calibration folds for --eps cv, --shrink and --refit-ridge cv
    fold_by_source: the folds are the sources of an interleaved mixture (--folds source): `RunOptions.stride`
    two_pass:      select from cosines first, then capture the chosen blocks' fit sums (large hidden sizes)
    sums_budget:   bytes the candidates' float64 sums may hold: more candidates than fit are scored in groups, one
                   pass each (the same choice; `pipeline.candidate_groups`); None: all in one pass
    spill:         a folder where the cached calibration states go, memory-mapped (`spill.Spill`); None: memory
    """

    selection: Selection
    recover: str = "ghost"
    fit: FitOptions | None = None
    refit: RefitOptions | None = RefitOptions(DEFAULT_LAYERS)
    refit_auto: bool = True
    token_weights: str = "uniform"
    folds: int = 4
    two_pass: bool = False
    batch_size: int = 8
    progress: bool = True
    fold_by_source: bool = False
    sums_budget: float | None = None
    spill: str | None = None

    def __post_init__(self) -> None:
        if self.fit is None:
            object.__setattr__(self, "fit", recovery.get(self.recover).default_fit(FitOptions()))
        recovery.check_options(recovery.get(self.recover), self.fit, self.token_weights)
        check_folds(self.folds)
        self.run_for(None)  # batch size and token weights, checked by RunOptions
        if self.refit is not None and not self.refit_auto and self.selection.fit == "layer":
            raise GhostlayersError(REFIT_NOT_PER_LAYER)
        if self.selection.ghost is None:  # candidates are repaired with this fit (select.candidate_fit unshrinks it)
            object.__setattr__(self, "selection", replace(self.selection, ghost=self.fit))

    def run_for(self, refit: RefitOptions | None, selecting: bool = False) -> RunOptions:
        """How the passes run; the windows are split into --folds parts where a cross-validated choice (of ε, or
        of the refit's ρ, or with `selecting` of the block: --select ghost-cv) needs held-out sums, else not at
        all."""
        from .select import folded

        cv = (self.fit.needs_folds or (refit is not None and refit.ridge == "cv")
              or (selecting and folded([self.selection.criterion], self.fit)))
        return RunOptions(self.batch_size, self.progress, self.token_weights, self.folds if cv else 1,
                          self.fold_by_source and cv, self.spill)


@dataclass
class Result:
    """What `prune` made: the pruned model (None for a layer-by-layer run: `save` writes it from the dense files),
    the plan, the operators and refits, the calibration sums and the manifest (how it was made)."""

    model: PreTrainedModel | None
    plan: Plan
    operators: list[Operator]
    refits: list[Refit]
    stats: Stats
    manifest: dict[str, Any]
    source: Offloaded | None = field(default=None, repr=False)
    shell: PreTrainedModel | None = field(default=None, repr=False)  # layer by layer: the pruned model, layers on meta
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of the calibration and of the repair

    @property
    def keeps_operators(self) -> bool:
        """Whether some operator is a module (an exact export), not folded into the weights."""
        from .surgery import ghost_modules

        return bool(ghost_modules(self.model if self.model is not None else self.shell))

    def close(self) -> None:
        """Layer by layer: stop reading the dense layers into this result's model (`Offloaded.unshare`), e.g. before
        pruning the same `Offloaded` model again. Nothing to do for a result in memory."""
        if self.source is not None and self.shell is not None:
            self.source.unshare(self.shell)

    def save(self, out: str | Path, tokenizer: PreTrainedTokenizerBase, format: str = "exact", dtype: str = "auto",
             overwrite: bool = False, quant: str = "f16", source: str | Path | None = None, pre: str = "default",
             ) -> Path:
        """Write the pruned model, atomically (see `export.save`); a layer-by-layer result one layer at a time.

        format gguf writes one .gguf file (see `gguf_export.save_gguf`): the changed tensors at `quant`, the rest
        copied from `source` (default: the dense model's GGUF when it was loaded from one)."""
        from .export import save, save_streaming
        from .outputs import resolve_format

        format = resolve_format(format, self.keeps_operators)
        if format == "gguf":
            return self.save_gguf(out, tokenizer, quant, overwrite, source, pre).path
        if self.model is not None:
            return save(self.model, tokenizer, out, self.manifest, overwrite=overwrite, format=format, dtype=dtype)
        assert self.source is not None and self.shell is not None
        return save_streaming(self.source, self.shell, self.plan, tokenizer, out, self.manifest, overwrite, format,
                              dtype)

    def save_gguf(self, out: str | Path, tokenizer: PreTrainedTokenizerBase, quant: str = "f16",
                  overwrite: bool = False, source: str | Path | None = None, pre: str = "default",
                  progress: bool = True) -> Written:
        """Write the pruned model as one .gguf file (`gguf_export.save_gguf`): the changed tensors at `quant`, the
        rest copied from `source` (default: the dense model's GGUF when it was loaded from one)."""
        from .gguf_export import save_gguf
        from .locate import gguf_source

        if self.model is None:  # layer by layer: from the pruned shell, each layer read from the dense files in turn
            return save_gguf(self.shell, tokenizer, out, self.manifest, quant=quant, overwrite=overwrite, pre=pre,
                             progress=progress, layers=self.source)
        source = gguf_source(self.manifest.get("base_model"), source)
        return save_gguf(self.model, tokenizer, out, self.manifest, quant=quant, source=source, overwrite=overwrite,
                         pre=pre, progress=progress)


def load_dense(spec: str, dtype: str = "auto", device: str = "cpu", layer_by_layer: bool = False,
               ) -> tuple[PreTrainedModel | Offloaded, PreTrainedTokenizerBase]:
    """The dense model to prune and its tokenizer: in memory (`models.load_model`: a folder, a .gguf, a hub id or
    the alias), or with `layer_by_layer` an `Offloaded` model whose decoder layers stay in their files (a local
    safetensors folder). A ghostlayers export is refused: prune its base model."""
    from .export import read_manifest
    from .models import load_model

    manifest = read_manifest(spec) if Path(spec).expanduser().is_dir() else None
    if manifest is not None:
        raise GhostlayersError(f"{spec} is already pruned: prune its base model ({manifest.get('base_model')}) instead")
    if not layer_by_layer:
        return load_model(spec, dtype, device)
    from transformers import AutoTokenizer

    from .offload import Offloaded

    model = Offloaded(spec, dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise GhostlayersError(f"cannot load the tokenizer of {model.folder}: {err}") from None
    return model, tokenizer


def prune(
    model: PreTrainedModel | Offloaded,
    windows: Tensor,
    spec: PruneSpec,
    base_model: str = "",
    calibration: dict[str, Any] | None = None,
) -> Result:
    """Calibrate `model` on `windows`, choose the layers, fit the recovery (and the refit), prune.

    An `Offloaded` model runs layer by layer (peak memory about one layer) and yields a Result without a model.
    With a loss criterion (`loss`, `loss-greedy`) the last `Selection.select_windows` windows are held out of every
    fit and only score the candidates, each repaired by `spec.recover`.
    `base_model` and `calibration` (source, samples, seq_len, seed) go into the manifest as they are."""
    import time

    from . import distributed
    from .models import adapter, num_parameters
    from .offload import Offloaded
    from .pipeline import calibrate, manifest, repair, split_held_out, with_fit_sums
    from .refit import refit_manifest

    offloaded = isinstance(model, Offloaded)
    started = time.perf_counter()
    selection = replace(spec.selection, scores={}, score_with=spec.selection.score_with or spec.recover)
    windows, held_out = split_held_out(windows, selection)  # the loss criteria's windows, never fitted on
    how = recovery.check(spec.recover, adapter(model.model if offloaded else model))  # before any pass
    in_walk = spec.refit is not None and how.at_boundary  # the refit's walk fits these operators itself
    methods = (spec.recover,) if how.placement != "nothing" and not in_walk else ()
    stats, plan = calibrate(model, windows, selection, methods, spec.run_for(None, selecting=True), two_pass=spec.two_pass,
                            held_out=held_out, sums_budget=spec.sums_budget)
    refit = spec.refit
    if spec.refit_auto and (plan.per_layer or (len(plan.blocks()) > 1 and not plan.sequential)):
        refit = None  # where the default refit does not apply (refit_plan refuses the last two when asked for)
    if refit is None and in_walk:  # fitted from the dense pass after all: its sums, from one more pass
        stats = with_fit_sums(model, windows, stats, plan, (spec.recover,), spec.run_for(None))
    calibrated = time.perf_counter()
    pruned, operators, refits = repair(model, windows, stats, plan, spec.recover, spec.fit, refit, spec.run_for(refit))
    seconds = {"calibrate": calibrated - started, "repair": time.perf_counter() - calibrated}
    cv = spec.fit.needs_folds
    info = manifest(
        base_model=base_model,
        plan=plan,
        selection=selection,
        recovery=spec.recover,
        eps=spec.fit.ridge,
        options={"affine": spec.fit.affine, "rank": spec.fit.rank,
                 "shrink": str(spec.fit.shrink) if spec.fit.shrink else None, "token_weights": spec.token_weights,
                 "fit": selection.fit,
                 "folds": ("source" if spec.fold_by_source else spec.folds) if cv else None, "refit": refit_manifest(refit, refits)},
        operators=operators,
        calibration={**(calibration or {}), "tokens": stats.tokens, "ranks": distributed.world_size()},
        dense_parameters=num_parameters(model.model if offloaded else model),
    )
    if offloaded:  # its layers are in the dense files until `save` writes them one at a time
        return Result(None, plan, operators, refits, stats, info, model, pruned, seconds)
    return Result(pruned, plan, operators, refits, stats, info, seconds=seconds)


def heal(dense: PreTrainedModel, result: Result, train: Tensor, held: Tensor, options: HealOptions,
         progress: bool = True, log: Callable[[str], None] | None = None) -> Healed:
    """Heal `result.model` in place (`heal.heal`): a short distillation toward `dense` (the model it was pruned from,
    in memory) of only what the repair owns, trained on the windows `train`, stopped early on `held` (windows
    never fitted on). The manifest records it under "heal"; the result keeps its format."""
    from .heal import heal as distil, owned

    if result.model is None:
        raise GhostlayersError("--heal trains the pruned model in memory: drop --layer-by-layer (or heal the saved "
                               "result on a machine that holds it: `ghostlayers heal DIR`)")
    params = owned(result.model, result.plan.removed, result.refits, options.layers)
    healed = distil(dense, result.model, train, held, params, options, progress, log)
    result.manifest["heal"] = healed.record()
    return healed
