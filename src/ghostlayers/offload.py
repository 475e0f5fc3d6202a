"""Layer by layer, for models larger than memory: calibration here (`LayerwiseSource`); the repair, the refit's walk
and the writers read layers through `Offloaded.hold` (and the pruned model through `Offloaded.share`).

The model is built with its parameters on the meta device (no memory) except the embeddings and the final norm;
each decoder layer is read from the safetensors files when its turn comes, run over every calibration batch, and
dropped. The calibration hidden states (one copy of the residual stream per window, plus the boundaries that
pairs still wait for) are what stays in memory, so peak memory is about one layer plus the calibration
activations. Every layer is called exactly as the model's own forward calls it (the keyword arguments, masks and
rotary embeddings of each layer are recorded from one run of the model with its layers swapped for recorders), and
the sums are added boundary by boundary in the same batch order as `capture`, so the sums, hence the operators, are
the same as the normal mode's, bit for bit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from accelerate import init_empty_weights
from safetensors import safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .capture import Accumulator
from .errors import GhostlayersError
from .hooks import hooked
from .models import adapter, check_supported, resolve_device, resolve_dtype
from .surgery import Folds


class Offloaded:
    """A causal LM whose decoder layers stay in their safetensors files until `hold(layers)` (or `layer(i)`) reads
    them, for the duration, into it and into every pruned model built from it (`share`)."""

    def __init__(self, folder: str | Path, dtype: str = "auto", device: str = "cpu"):
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise GhostlayersError(
                f"layer-by-layer calibration reads a local folder of safetensors weights; {folder} is not one "
                "(save a GGUF or hub model with save_pretrained first)"
            )
        try:
            self.config = AutoConfig.from_pretrained(self.folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise GhostlayersError(f"cannot read the config of {self.folder}: {err}") from None
        check_supported(self.config)
        self.dtype = resolve_dtype(dtype, getattr(self.config, "dtype", None))
        self.device = resolve_device(device)
        self.files = weight_map(self.folder)
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) real
            self.model: PreTrainedModel = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype)
        self.model.eval()
        for module in self.model.modules():  # buffers (rotary tables, embedding scales) to the device; parameters
            for key, buffer in module._buffers.items():  # are meta until read
                if buffer is not None:
                    module._buffers[key] = buffer.to(self.device)
        self.prefix = adapter(self.model).layers_prefix + "."
        backbone = adapter(self.model).backbone
        for name, _ in backbone.named_parameters():  # embeddings and the final norm: read now
            if not name.startswith("layers."):
                _assign(backbone, name, self._read(f"model.{name}"))
        self.model.tie_weights()  # a tied LM head follows the embeddings just read (it is never run here)
        self._sharers: dict[int, list[tuple[nn.Module, str]]] = {}
        self._folds: list[tuple[Any, Folds, dict[int, int]]] = []  # (adapter, folds, dense layer -> its layer)
        self.share(self.model)

    @property
    def num_layers(self) -> int:
        return adapter(self.model).num_layers

    def _read(self, key: str) -> Tensor:
        return self.read_raw(key).to(self.device, self.dtype)

    def read_raw(self, key: str) -> Tensor:
        """Tensor `key` as the files store it, on the CPU."""
        if key not in self.files:
            raise GhostlayersError(f"{self.folder} has no tensor {key}: the weights do not match config.json")
        with safe_open(self.folder / self.files[key], "pt", device="cpu") as f:
            return f.get_tensor(key)

    def share(self, model: nn.Module, folds: Folds | None = None) -> None:
        """Let `hold` read layers into `model` too: a model built from this one's skeleton (`surgery.build` shares
        its parameter objects), e.g. the pruned model. Its parameters still on meta are filled wherever they are
        this model's own; those it replaced (a refit) are its own and stay. `folds` (in `model`'s numbering) are
        applied to each of its layers while it is held (`hold`), and to its final norm and LM head by `hold_rest`."""
        for module in model.modules():
            for key, param in module._parameters.items():
                if param is not None and param.is_meta:
                    self._sharers.setdefault(id(param), []).append((module, key))
        if folds:
            ad = adapter(model)
            mine = {id(p): i for i, layer in enumerate(adapter(self.model).layers) for p in layer.parameters()}
            position = {mine[id(next(layer.parameters()))]: k for k, layer in enumerate(ad.layers)}
            if folds.rotations:
                ad.untie_lm_head()  # as the in-memory fold does, before anything reads the config
            self._folds.append((ad, folds, position))

    def unshare(self, model: nn.Module) -> None:
        """Stop filling `model` (given to `share`): a pruned model that was a step on the way."""
        mine = {id(m) for m in model.modules()}
        for users in self._sharers.values():
            users[:] = [(m, key) for m, key in users if id(m) not in mine]
        self._folds = [entry for entry in self._folds if entry[0].model is not model]

    @contextmanager
    def hold(self, indices) -> Iterator[None]:
        """Decoder layers `indices` (dense numbering) read from disk for the duration, in this model and in every
        model given to `share` that still holds them, with those models' folds applied; back on meta afterwards
        (what a refit replaced while it was held stays)."""
        swapped: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = []
        layers = adapter(self.model).layers
        try:
            for index in indices:
                if not next(layers[index].parameters()).is_meta:
                    continue  # held already (by an enclosing hold): read and folded once
                for name, meta in layers[index].named_parameters():
                    real = nn.Parameter(self._read(f"{self.prefix}{index}.{name}"), requires_grad=False)
                    for module, key in self._sharers[id(meta)]:
                        if module._parameters[key] is meta:
                            module._parameters[key] = real
                            swapped.append((module, key, meta, real))
                for ad, folds, position in self._folds:
                    if index in position:
                        swapped += _folded(ad, folds, position[index])
            yield
        finally:
            _put_back(swapped)

    @contextmanager
    def hold_rest(self, model: nn.Module) -> Iterator[None]:
        """`model`'s (a model given to `share`) final norm and LM head as its folds make them, for the duration: an
        LM head left on meta (untied: never read for calibration) is read from disk first."""
        swapped: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = []
        ad = adapter(model)
        head = ad.lm_head
        try:
            if head.weight.is_meta:
                before = head.weight
                head._parameters["weight"] = nn.Parameter(self._read("lm_head.weight"), requires_grad=False)
                swapped.append((head, "weight", before, head.weight))
            for shared, folds, _ in self._folds:
                if shared.model is model:
                    swapped += _folded(shared, folds, shared.num_layers)
            yield
        finally:
            _put_back(swapped)

    @contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        """Decoder layer `index` with its weights read from disk, for the duration; back on meta afterwards."""
        with self.hold([index]):
            yield adapter(self.model).layers[index]


def _put_back(swapped: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]]) -> None:
    """Undo a hold, last change first: each (module, name, before, after) whose parameter is still `after` gets
    `before` back (one replaced since, by a refit, stays)."""
    for module, key, before, after in reversed(swapped):
        if module._parameters[key] is after:
            module._parameters[key] = before


def _folded(ad, folds: Folds, k: int) -> list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]]:
    """Apply `folds` to layer k of the model `ad` adapts (num_layers: its final norm and LM head); the parameters
    it replaced, (module, name, before, after), for putting them back."""
    modules = list(ad.layers[k].modules()) if k < ad.num_layers else [ad.final_norm, ad.lm_head]
    before = [(m, key, p) for m in modules for key, p in m._parameters.items() if p is not None]
    folds.apply(ad, k)
    return [(m, key, p, m._parameters[key]) for m, key, p in before if m._parameters[key] is not p]


def weight_map(folder: Path) -> dict[str, str]:
    """tensor name -> safetensors file, from model.safetensors.index.json or the single model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = folder / "model.safetensors"
    if not single.is_file():
        raise GhostlayersError(f"{folder} has no safetensors weights (model.safetensors or an index of shards)")
    with safe_open(single, "pt", device="cpu") as f:
        return {key: single.name for key in f.keys()}


def _assign(root: nn.Module, name: str, tensor: Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = root.get_submodule(module_name) if module_name else root
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


class _Recorder(nn.Module):
    """Stands in for decoder layer `index` during one forward: keeps the keyword arguments the model passes to it
    (masks, rotary embeddings, positions) and returns its input unchanged."""

    def __init__(self, index: int, sink: dict[int, Any], layer: nn.Module):
        super().__init__()
        self.index, self.sink = index, sink
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if args:
            raise GhostlayersError("internal: this model passes decoder layers positional arguments")
        if self.index == 0:
            self.sink["input"] = hidden_states
        self.sink[self.index] = kwargs
        return hidden_states


def call_layer(layer: nn.Module, hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
    """A decoder layer's output state, called with the arguments `layer_inputs` recorded for it."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out  # transformers 5 layers return a tensor, older ones a tuple


def layer_inputs(model: PreTrainedModel, ids: Tensor, mask: Tensor) -> tuple[Tensor, list[dict[str, Any]]]:
    """h_0 of the batch and the keyword arguments each decoder layer is called with."""
    ad = adapter(model)
    sink: dict[Any, Any] = {}
    layers = ad.backbone.layers
    ad.backbone.layers = nn.ModuleList(_Recorder(i, sink, layer) for i, layer in enumerate(layers))
    try:
        ad.backbone(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        ad.backbone.layers = layers
    return sink["input"], [sink[i] for i in range(len(layers))]


class LayerwiseSource:
    """A `capture.Source` that reads one decoder layer at a time: every batch's h_0 and layer arguments first (one
    forward with the layers swapped for recorders), then each layer in turn over every batch's cached state."""

    def __init__(self, model: Offloaded, keep: Callable[[Tensor], Tensor] | None = None):
        self.model, self.keep = model, keep or (lambda state: state)  # how a cached state is kept (`spill.keeper`)
        self.adapter = ad = adapter(model.model)
        self.num_layers, self.hidden_size, self.device = ad.num_layers, ad.hidden_size, model.device

    def feed(self, acc: Accumulator, batches: list[tuple[Tensor, Tensor]], progress: bool) -> None:
        states, hidden, kwargs = [], [], []
        for ids, mask in batches:
            states.append(acc.start_batch(mask))
            h, kw = layer_inputs(self.model.model, ids, mask)
            hidden.append(self.keep(h))
            kwargs.append(kw)
        mlp_layers = {l for l, _ in acc.spec.mlp}
        for i in tqdm(range(self.num_layers), desc="calibrating layer by layer", unit="layer", disable=not progress,
                      leave=False):
            mlp = ([(self.adapter.mlp(i), "output", lambda m, args, output, i=i: acc.add_mlp(i, output))]
                   if i in mlp_layers else [])
            with self.model.layer(i) as layer, hooked(mlp):
                for k, state in enumerate(states):
                    acc.resume(state)
                    acc.add(i, hidden[k])
                    hidden[k] = self.keep(layer(hidden[k], **kwargs[k][i]))
        for k, state in enumerate(states):
            acc.resume(state)
            acc.add(self.num_layers, hidden[k])
