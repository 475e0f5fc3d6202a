"""What a prune will hold and how long it will take, from the model's shape alone (`prune --dry-run`).

No torch and no weights: the shape comes from config.json (or a GGUF header), the sums from the same rules the run
uses (`select.candidate_spec`). Memory is counted per phase on top of what stays resident (the
interpreter and libraries, the weights held):

    calibrate     the selection pass: its float64 sums (C² per matrix), the activations of one batch (in memory) or
                  of every window (layer by layer keeps one copy of the residual stream per window, and the
                  boundaries a candidate's pair still waits for), a candidate's solve
    boundary fit  the ghost's sums per fold and its solves (in the refit's walk: with its three cached copies of
                  the residual stream, dense, pruned and dense mid-layer)
    refit         the walk again, and the sums and solve of its largest matrix (down_proj: d² + d·C float64 and
                  the factor of ZᵀZ + λI)
    write         in memory: the weights cast to the written dtype where it differs; layer by layer: one layer,
                  and an untied LM head read; GGUF: the encoded tensors (all in memory, one at a time layer by layer)

Time is the floating-point work of each pass (2 × parameters per token per layer, plus attention) and of the sums
(float64), at rates measured on this machine by `measure_rates` (a few matmuls, about a second).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import GhostlayersError
from .locate import ALIASES, gguf_metadata, smollm2_gguf

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
QUANT_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}
RUNTIME = 0.45e9  # resident size of Python, torch, transformers, a tokenizer and the text (0.38-0.6 GB measured)
GB = 1e9


@dataclass(frozen=True)
class Shape:
    """What the forecast reads of a model: its layer shapes, vocabulary and checkpoint dtype."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    dtype: str  # of the checkpoint ("float32" for a GGUF, which loads dequantised)
    model_type: str = "llama"

    @property
    def layer_parameters(self) -> int:
        c, hd = self.hidden, self.head_dim
        q, kv = self.heads * hd, self.kv_heads * hd
        out = c * q + 2 * c * kv + q * c + 3 * c * self.intermediate + 2 * c
        if self.model_type == "qwen2":  # biases on q, k, v
            out += q + 2 * kv
        if self.model_type in ("qwen3", "gemma3", "gemma3_text"):  # norms of q and k
            out += 2 * hd
        if self.model_type in ("gemma3", "gemma3_text"):  # norms after attention and after the MLP
            out += 2 * c
        return out

    @property
    def embedding_parameters(self) -> int:
        return self.vocab * self.hidden

    @property
    def parameters(self) -> int:
        return (self.layers * self.layer_parameters + self.embedding_parameters * (1 if self.tied else 2)
                + self.hidden)

    def flops_per_token(self, seq_len: int) -> float:
        """One decoder layer, one token of a `seq_len` window: the matmuls and causal attention (QKᵀ and AV)."""
        return 2.0 * self.layer_parameters + 2.0 * seq_len * self.heads * self.head_dim


def read_shape(model: str) -> Shape:
    """The shape of `model` (a folder with config.json, a .gguf, or the alias), without loading it."""
    path = smollm2_gguf() if model in ALIASES else Path(model).expanduser()
    try:
        if path.suffix == ".gguf":
            meta = gguf_metadata(path, lambda found: False)
            arch = meta["general.architecture"]
            get = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
            c, heads = get("embedding_length"), get("attention.head_count")
            tokens = meta.get("tokenizer.ggml.tokens")
            # the header does not say whether the head is tied (a tensor, not a key): counted tied, as the
            # small GGUF models this is used with are (an untied head adds vocab × C to the weights)
            shape = Shape(get("block_count"), c, get("feed_forward_length"), heads,
                          get("attention.head_count_kv", heads), get("attention.key_length", c // heads),
                          len(tokens) if tokens else get("vocab_size"), True, "float32", arch)
        else:
            config: dict[str, Any] = json.loads((path / "config.json").read_text())
            config = {**config, **(config.get("text_config") or {})}
            heads = config["num_attention_heads"]
            shape = Shape(config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"], heads,
                          config.get("num_key_value_heads") or heads,
                          config.get("head_dim") or config["hidden_size"] // heads, config["vocab_size"],
                          bool(config.get("tie_word_embeddings", True)),
                          config.get("dtype") or config.get("torch_dtype") or "float32", config.get("model_type", ""))
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        shape = None
    if shape is None or not all(isinstance(v, int) and v > 0 for v in (
            shape.layers, shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.head_dim, shape.vocab)):
        raise GhostlayersError(f"cannot tell the shape of {model} from its config.json or GGUF header: --dry-run and "
                               "--memory-budget forecast a local Llama-family folder, a .gguf file or the alias")
    return shape


@dataclass
class Rates:
    """Floating-point operations per second of this machine: the layers' matmuls in the compute dtype, the sums' in
    float64."""

    compute: float
    sums: float


def measure_rates(dtype: str = "float32", device: str = "cpu") -> Rates:
    """A few matmuls of the shapes a pass runs (about a second)."""
    import time

    import torch

    def rate(dt) -> float:
        a = torch.randn(512, 2048, dtype=dt, device=device)
        b = torch.randn(2048, 2048, dtype=dt, device=device)
        a @ b  # warm-up
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(4):
                a @ b
            if device != "cpu":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return 4 * 2 * 512 * 2048 * 2048 / best

    return Rates(rate(getattr(torch, dtype)), rate(torch.float64))


@dataclass
class Forecast:
    """Bytes held per phase (on top of `resident`) and seconds, with what each figure is made of."""

    resident: dict[str, float] = field(default_factory=dict)
    phases: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    passes: int = 1  # of the selection (its candidates in groups)

    @property
    def spills(self) -> bool:
        return any(n.startswith("cached states spilled") for n in self.notes)

    @property
    def peak(self) -> float:
        return sum(self.resident.values()) + max((sum(p.values()) for p in self.phases.values()), default=0.0)

    def phase_peak(self, phase: str) -> float:
        return sum(self.resident.values()) + sum(self.phases.get(phase, {}).values())

    def table(self) -> str:
        lines = ["memory (GB):"]
        lines += [f"  {'resident':<13} {what:<64} {v / GB:8.2f}" for what, v in self.resident.items()]
        for phase, parts in self.phases.items():
            for what, v in parts.items():
                lines.append(f"  {phase:<13} {what:<64} {v / GB:8.2f}")
            lines.append(f"  {phase:<13} {'peak of this phase':<64} {self.phase_peak(phase) / GB:8.2f}")
        lines.append(f"  {'peak':<78} {self.peak / GB:8.2f}")
        total = sum(self.seconds.values())
        lines.append("time (s, compute only: reading and writing files not counted):")
        lines += [f"  {what:<78} {v:8.0f}" for what, v in self.seconds.items()]
        lines.append(f"  {'total':<78} {total:8.0f}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"resident": self.resident, "phases": self.phases, "seconds": self.seconds, "peak": self.peak}


def spec_matrices(spec) -> int:
    """How many C × C float64 matrices a CaptureSpec's sums hold (grams, cross sums, MLP sums)."""
    return len(spec.grams) + len(spec.cross) + 2 * len(spec.mlp)


def forecast(
    shape: Shape,
    criterion: str,
    drop: int,
    recover: str,
    *,
    refit_layers: int | None,
    samples: int,
    seq_len: int,
    batch_size: int = 8,
    folds: int = 1,
    layer_by_layer: bool = False,
    compute_dtype: str = "auto",
    format: str = "exact",
    weights_dtype: str = "auto",
    quant: str = "f16",
    two_pass: bool = False,
    fit_sequential: bool = False,
    candidate_groups: int = 1,
    candidate_copies: int = 1,
    refit_parts: int = 1,
    spill: bool = False,
    rates: Rates | None = None,
) -> Forecast:
    """The forecast of one prune: `refit_layers` the layers refitted after each boundary (None: no refit),
    `folds` the calibration folds of a cross-validated fit (1: none), `candidate_groups` how many passes the
    selection's candidate sums are split into (`pipeline.candidate_groups`), `candidate_copies` how many sets of them
    a pass keeps (1 + folds where the candidates' own fit is cross-validated, e.g. --eps cv), `refit_parts` the sets
    of refit sums (folds, for --refit-ridge cv), `spill` whether the cached states go to memory-mapped files
    (`spill.Spill`: on disk, not in memory)."""
    from . import recovery
    from .select import SelectOptions, candidate_spec
    from .select import get as criterion_of

    dtype = shape.dtype if compute_dtype == "auto" else compute_dtype
    b = BYTES.get(dtype, 4)
    w = BYTES.get(dtype if weights_dtype == "auto" else weights_dtype, b)
    c, n, tokens = shape.hidden, shape.layers, samples * seq_len
    f = Forecast()
    f.resident["interpreter, torch, transformers"] = RUNTIME
    layer = shape.layer_parameters * b
    if layer_by_layer:
        f.resident["embeddings and final norm"] = (shape.embedding_parameters + c) * b
        f.resident["one decoder layer"] = layer
    else:
        f.resident["weights"] = shape.parameters * b
        # loading maps the checkpoint while its tensors are copied into the model's
        f.phases["load"] = {"checkpoint mapped while it is read": shape.parameters * BYTES.get(shape.dtype, 4)}
    batch = min(batch_size, samples)
    one_batch = batch * seq_len * (4 * c + 3 * shape.intermediate) * b + batch * shape.heads * seq_len * seq_len * b
    # the selection pass
    crit = criterion_of(criterion)
    how = recovery.get(recover)
    in_walk = refit_layers is not None and how.at_boundary  # as `api.prune` decides
    methods = (recover,) if how.placement != "nothing" and not in_walk else ()
    matrices, held = 0, 0.0  # C × C sums of all the candidates; those one pass holds
    count, passes = 1, 1
    if crit.scored:
        options = SelectOptions()
        pairs = crit.pairs(n, drop, options)
        matrices = spec_matrices(candidate_spec(crit, pairs, methods, options, two_pass))
        count = len(pairs)
        size = math.ceil(count / candidate_groups)  # candidates per pass, as `pipeline.candidate_groups` cuts them
        passes = math.ceil(count / size)
        held = matrices * size / count * candidate_copies
    calibrate: dict[str, float] = {}
    if held:
        calibrate["float64 sums of the candidates"] = held * c * c * 8
    calibrate["float64 copy of a batch at a boundary"] = 2 * batch * seq_len * c * 8
    solves = crit.ghost_solves(max(candidate_copies - 1, 1))  # per candidate: once per fold where cross-validated
    if solves:  # scoring a candidate: its moments, the Cholesky factor, M*, G M* (C² float64 each)
        calibrate["solving one candidate's ghost (float64)"] = 5 * c * c * 8
    # a pair (i, j) of the criterion keeps h_i until layer j: a block's candidates keep `drop` boundaries at once
    span = (drop if crit.contiguous else 1) if crit.scored else 0
    if layer_by_layer:
        if not spill:
            calibrate[f"residual stream of every window (1 + {span} held)"] = (1 + span) * tokens * c * b
        calibrate["one batch through a layer"] = one_batch
    else:
        calibrate[f"states of a batch held for their pairs ({span})"] = span * batch * seq_len * c * b
        calibrate["one batch through the model"] = one_batch
    f.phases["calibrate"] = calibrate
    f.passes = passes
    if not crit.scored and not methods:
        passes = 0  # a manual selection whose fit is the walk's: no dense pass (`pipeline.calibrate`)
    f.seconds["calibration pass(es)"] = (n * (passes + (1 if two_pass else 0)) * tokens
                                         * shape.flops_per_token(seq_len) / _rate(rates, "compute"))
    f.seconds["candidate sums (float64)"] = matrices * tokens * c * c * 2 / _rate(rates, "sums")
    if solves:  # each candidate's ghost(s): a Cholesky (C³/3), a solve (2C³), its error (2C³)
        f.seconds["scoring the candidates' ghosts (float64)"] = count * solves * 4.4 * c**3 / _rate(rates, "sums")
    # the repair: the walk (boundary fits, then the refits after each boundary), or the fit from the dense pass
    walk = refit_layers is not None or (fit_sequential and how.at_boundary)
    states = {} if spill or not walk else {"cached residual streams (3 copies)": 3 * tokens * c * b}
    boundary = {**states, "boundary fit sums, per fold and total": (folds + 1) * 2 * c * c * 8,
                "boundary solves (float64: G + εI, its factor, M*, G M*)": 4 * c * c * 8}
    if how.at_boundary or (how.placement != "nothing" and not walk):
        f.phases["boundary fit"] = boundary
        f.seconds["boundary fits (float64)"] = _boundary_flops(c, folds) / _rate(rates, "sums")
    if refit_layers:
        d = shape.intermediate
        f.phases["refit"] = {**states, "one batch through a layer": one_batch,
                             "refit sums of down_proj (d² + d·C float64, per fold where ρ is cv)":
                                 refit_parts * (d * d + d * c) * 8,
                             "refit solve (ZᵀZ + λI, its factor: 2 d²; 4 d·C float64)": (2 * d * d + 4 * d * c) * 8}
        walked = n - drop  # dense layers up to the last one refitted, at worst
        f.seconds["refit walk: layers"] = (walked + drop + 3 * refit_layers) * tokens \
            * shape.flops_per_token(seq_len) / _rate(rates, "compute")
        # per refitted layer: the sums of o_proj (C) and down_proj (d), each a Cholesky (d³/3), a solve with C
        # right-hand sides (2d²C) and its error before and after (4d²C)
        f.seconds["refit walk: sums and solves (float64)"] = refit_layers * (
            tokens * (d * d + d * c + 2 * c * c) * 2 + (d**3 + c**3) / 3 + 6 * (d * d * c + c**3)) / _rate(rates, "sums")
    # the write
    kept = n - drop
    write: dict[str, float] = {}
    head = shape.embedding_parameters * (1 if shape.tied else 2)
    if format == "gguf":
        q = QUANT_BYTES.get(quant, 2.0)
        largest = max(shape.embedding_parameters, c * shape.intermediate)
        write["float32 copy and encoding of the largest tensor"] = largest * (4 + q)
        if not layer_by_layer:
            write["every tensor encoded"] = (kept * shape.layer_parameters + head) * q
        else:
            write["one layer read"] = layer
    elif layer_by_layer:
        if w != b:
            write["one layer cast to the written dtype"] = shape.layer_parameters * w
            write["embeddings (and LM head) cast"] = head * w
        if not shape.tied:
            write["LM head read"] = shape.embedding_parameters * b
    elif w != b:
        write["weights cast to the written dtype"] = (kept * shape.layer_parameters + head) * w
    f.phases["write"] = write
    if layer_by_layer:
        f.notes.append(f"layer by layer: each of the {n} decoder layers is read from disk once per pass")
    if spill:
        f.notes.append(f"cached states spilled to disk: up to {4 * tokens * c * b / GB:.2f} GB of files, mapped")
    return f


def _boundary_flops(c: int, folds: int) -> float:
    """One boundary's ghost: per fold of a cross-validated choice a Cholesky, a solve and three errors (the shrink's
    quadratic), then the final fit and its error."""
    return (folds if folds > 1 else 0) * (c**3 / 3 + 2 * c**3 + 6 * c**3) + c**3 / 3 + 4 * c**3


def available_memory() -> float:
    """Bytes this machine can give a new process now (MemAvailable), or infinity where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return math.inf


def plan_within(budget: float, shape: Shape, spec, *, samples: int, seq_len: int, layer_by_layer: bool,
                compute_dtype: str = "auto", format: str = "exact", weights_dtype: str = "auto", quant: str = "f16",
                rates: Rates | None = None, can_spill: bool = True) -> tuple[int | None, Forecast]:
    """The fewest groups of candidates (passes of the selection) with which the prune `spec` (a PruneSpec) is
    forecast to fit `budget` bytes, the cached states in memory where that fits and spilled to disk where only that
    does, and that forecast (its `notes` say whether it spills); (None, the one-pass forecast) where none does."""
    from .select import SelectOptions
    from .select import get as criterion_of

    crit = criterion_of(spec.selection.criterion)
    count = len(crit.pairs(shape.layers, spec.selection.drop, SelectOptions())) if crit.scored else 1
    refit = spec.refit
    layers = None if refit is None else (refit.layers if refit.layers is not None else shape.layers)
    folds = spec.run_for(None).folds  # the fit's; the selection may split the windows where the fit does not
    chosen_on = spec.run_for(None, selecting=True).folds
    copies = chosen_on + 1 if chosen_on > 1 and crit.scored and crit.needs_folds(spec.selection.options) else 1
    refit_parts = spec.run_for(refit).folds if refit is not None and refit.ridge == "cv" else 1

    def make(groups: int, spill: bool = False) -> Forecast:
        return forecast(shape, spec.selection.criterion, spec.selection.drop, spec.recover, refit_layers=layers,
                        samples=samples, seq_len=seq_len, batch_size=spec.batch_size,
                        folds=folds, layer_by_layer=layer_by_layer, compute_dtype=compute_dtype, format=format,
                        weights_dtype=weights_dtype, quant=quant, two_pass=spec.two_pass, candidate_groups=groups,
                        candidate_copies=copies, refit_parts=refit_parts, spill=spill, rates=rates,
                        fit_sequential=spec.selection.fit == "sequential")

    first = make(1, spec.spill is not None)
    spills = (spec.spill is not None, True) if can_spill else (spec.spill is not None,)
    for spill in dict.fromkeys(spills):  # cached states in memory first, then on disk
        for groups in range(1, count + 1):
            if (f := make(groups, spill)).peak <= budget:
                return groups, f
    return None, first


def within_budget(spec, model: str, budget_gb: float | None, *, samples: int, seq_len: int, layer_by_layer: bool,
                  compute_dtype: str = "auto", format: str = "exact", weights_dtype: str = "auto", quant: str = "f16",
                  device: str = "cpu", out: str = ".", dry_run: bool = False) -> tuple[Any, str, list[str]]:
    """The prune `spec` (a PruneSpec) of `model` made to fit `budget_gb` (None: the memory available now), before
    anything loads: as it is where it fits; with its candidates scored in groups (`sums_budget`) and its cached
    states spilled next to `out` (`spill`) where that makes it fit; refused where nothing does. Returns the spec,
    the forecast for a person (with `dry_run`, which also measures this machine's rates) and what was changed.
    A model whose shape cannot be read before loading (a hub id) runs as it is (refused with `dry_run`)."""
    from dataclasses import replace

    if budget_gb is not None and not budget_gb > 0:
        raise GhostlayersError("--memory-budget must be a positive number of GB")
    try:
        shape = read_shape(model)
    except GhostlayersError:
        if dry_run:
            raise
        return spec, "", []
    budget = budget_gb * GB if budget_gb is not None else available_memory()
    where = "--memory-budget" if budget_gb is not None else "available now"
    rates = measure_rates(shape.dtype if compute_dtype == "auto" else compute_dtype, device) if dry_run else None
    groups, f = plan_within(budget, shape, spec, samples=samples, seq_len=seq_len, layer_by_layer=layer_by_layer,
                            compute_dtype=compute_dtype, format=format, weights_dtype=weights_dtype, quant=quant,
                            rates=rates, can_spill=device == "cpu")  # states on a GPU stay there (`Spill`)
    report = "\n".join([
        f"{model}: {shape.parameters / 1e9:.2f}B parameters, {shape.layers} layers, hidden {shape.hidden}; "
        f"{'layer by layer' if layer_by_layer else 'in memory'}, {samples} windows of {seq_len} tokens"
        + (f", the candidates scored in {f.passes} passes" if f.passes > 1 else ""),
        f.table(), f"{'fits' if groups else 'does NOT fit'} within {budget / GB:.1f} GB ({where})"])
    if dry_run:
        return spec, report, []
    if groups is None:
        fix = "--layer-by-layer, " if not layer_by_layer else ""
        raise GhostlayersError(
            f"this prune is forecast to need {f.peak / GB:.1f} GB, more than {budget / GB:.1f} GB ({where}): use "
            f"{fix}fewer --calib-samples or a shorter --seq-len (`--dry-run` shows what it holds), or a larger "
            "--memory-budget where more memory will be free")
    notes = []
    if f.spills and spec.spill is None:
        folder = str(Path(out).expanduser().resolve().parent)
        notes.append(f"the cached calibration states do not fit {budget / GB:.1f} GB: spilling them to {folder} "
                     "(memory-mapped; --spill-dir to choose where)")
        spec = replace(spec, spill=folder)
    if groups > 1:
        sums = f.phases["calibrate"]["float64 sums of the candidates"]
        notes.append(f"the candidates' sums do not fit {budget / GB:.1f} GB at once: scoring them in {f.passes} "
                     f"passes of at most {sums / GB:.1f} GB (the same choice)")
        spec = replace(spec, sums_budget=sums)
    return spec, report, notes


def _rate(rates: Rates | None, which: str) -> float:
    if rates is None:
        return {"compute": 50e9, "sums": 20e9}[which]  # a laptop-class CPU; `measure_rates` measures
    return getattr(rates, which)
