"""Apply a plan: drop decoder layers and install operators as real modules.

The pruned model is a new `PreTrainedModel` built on the meta device from the pruned config, whose parameters and
buffers are the dense model's own tensor objects (no copy, ties preserved). Building from the new config is what
renumbers `layer_idx`, per-layer attention types and sliding windows consistently: every layer is constructed for
its new position. The dense model is left untouched, so one calibration pass can feed many variants.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from .errors import GhostlayersError
from .models import adapter


class GhostOperator(nn.Module):
    """h ← h W with W = I + M* (C×C), applied to the residual stream where removed layers used to be."""

    def __init__(self, hidden_size: int, dtype: torch.dtype | None = None, device: torch.device | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(hidden_size, dtype=dtype, device=device), requires_grad=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states @ self.weight.to(hidden_states.dtype)  # (B, T, C) @ (C, C)


_GHOSTED: dict[type, type] = {}


def _ghosted_class(cls: type) -> type:
    """A subclass of `cls` whose forward first applies `self.ghost` to its hidden-state input.

    Swapping an instance's class (instead of wrapping it) keeps every attribute and state-dict key of the layer
    (or final norm) as it was, so the model code that calls it and the checkpoint layout are unchanged.
    """
    if cls not in _GHOSTED:

        def forward(self, hidden_states, *args, **kwargs):
            return cls.forward(self, self.ghost(hidden_states), *args, **kwargs)

        name = f"Ghosted{cls.__name__}"
        _GHOSTED[cls] = type(name, (cls,), {"forward": forward, "__module__": __name__, "__qualname__": name})
    return _GHOSTED[cls]


def install_ghost(module: nn.Module, weight: torch.Tensor) -> GhostOperator:
    """Make `module` apply h ← h·weight to its input. `weight` (C×C) is cast to the module's dtype."""
    ref = next(module.parameters())
    ghost = GhostOperator(weight.shape[0], dtype=ref.dtype, device=ref.device)
    ghost.weight.data.copy_(weight.to(ref.dtype))
    module.__class__ = _ghosted_class(type(module)) if not hasattr(module, "ghost") else type(module)
    module.ghost = ghost
    return ghost


def ghost_modules(model: PreTrainedModel) -> dict[str, GhostOperator]:
    """Installed operators by the name of the module they feed, e.g. {"model.layers.17": op}."""
    return {name.rsplit(".", 1)[0]: m for name, m in model.named_modules() if isinstance(m, GhostOperator)}


def rebuild(model: PreTrainedModel, config, old_name: Callable[[str], str]) -> PreTrainedModel:
    """A new model of `type(model)` built from `config`, whose tensor `name` is the source's `old_name(name)`."""
    with torch.device("meta"):
        new = type(model)._from_config(config, attn_implementation=model.config._attn_implementation)
    source = dict(model.named_parameters(remove_duplicate=False))
    source.update(model.named_buffers(remove_duplicate=False))
    for module_name, module in new.named_modules(remove_duplicate=False):
        for store in (module._parameters, module._buffers):
            for key, tensor in store.items():
                if tensor is None:
                    continue
                name = f"{module_name}.{key}" if module_name else key
                try:
                    store[key] = source[old_name(name)]
                except KeyError as err:
                    raise GhostlayersError(f"internal: no source tensor for {name}") from err
    new.generation_config = copy.deepcopy(model.generation_config)
    return new.eval()


def prune(
    model: PreTrainedModel, removed: Sequence[int], operators: Mapping[int, torch.Tensor] | None = None
) -> PreTrainedModel:
    """The model without the decoder layers `removed` (dense numbering), with `operators` installed.

    `operators` maps a dense boundary index b to a C×C matrix applied to h_b: the input of dense layer b, which must
    be kept, or of the final norm when b == num_layers.
    """
    ad = adapter(model)
    if ghost_modules(model):
        raise GhostlayersError("this model is already pruned: prune the dense model instead")
    n = ad.num_layers
    dropped = set(removed)
    if not dropped or not all(0 <= i < n for i in dropped) or len(dropped) >= n:
        raise GhostlayersError(f"cannot remove layers {sorted(dropped)} from a model with {n} layers")
    keep = [i for i in range(n) if i not in dropped]

    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]

    prefix = ad.layers_prefix + "."

    def old_name(name: str) -> str:
        if not name.startswith(prefix):
            return name
        index, rest = name[len(prefix) :].split(".", 1)
        return f"{prefix}{keep[int(index)]}.{rest}"

    pruned = rebuild(model, config, old_name)
    new_ad = adapter(pruned)
    for boundary, weight in (operators or {}).items():
        if boundary != n and boundary not in keep:
            raise GhostlayersError(f"internal: operator at removed layer {boundary}")
        new_index = len(keep) if boundary == n else keep.index(boundary)
        install_ghost(new_ad.boundary_module(new_index), weight)
    return pruned
