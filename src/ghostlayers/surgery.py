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
from .runtime import GhostOperator, attach_ghost


def install_ghost(module: nn.Module, weight: torch.Tensor) -> GhostOperator:
    """Make `module` apply h ← h·weight (C×C, or C for a diagonal) to its input (see `runtime.attach_ghost`)."""
    ghost = attach_ghost(module, tuple(weight.shape))
    ghost.weight.data.copy_(weight.to(ghost.weight.dtype))
    return ghost


def ghost_modules(model: PreTrainedModel) -> dict[str, GhostOperator]:
    """Installed operators by the name of the module they feed, e.g. {"model.layers.17": op}."""
    # by class name too: a model loaded with trust_remote_code has the export's own copy of the class
    return {name.rsplit(".", 1)[0]: m for name, m in model.named_modules() if type(m).__name__ == GhostOperator.__name__}


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
    model: PreTrainedModel,
    removed: Sequence[int],
    operators: Mapping[int, torch.Tensor] | None = None,
    scales: Mapping[int, float] | None = None,
    transforms: Mapping[int, torch.Tensor] | None = None,
) -> PreTrainedModel:
    """The model without the decoder layers `removed` (dense numbering), with recovery installed or folded.

    operators:  dense boundary b -> weight applied to h_b as a module (b is a kept layer, or num_layers for the
                final norm)
    scales:     dense boundary b -> α, folded: h_b ← α h_b (see `fold_scales`)
    transforms: dense layer l -> T, folded: layer l's MLP output m ← m T (W_down ← Tᵀ W_down)
    The dense model is never modified: folded tensors are new parameters of the pruned model only.
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

    def new_index(dense: int, what: str) -> int:
        if dense == n:
            return len(keep)
        if dense not in keep:
            raise GhostlayersError(f"internal: {what} at removed layer {dense}")
        return keep.index(dense)

    for layer, t in (transforms or {}).items():
        fold_mlp_transform(new_ad, new_index(layer, "transform"), t)
    fold_scales(new_ad, {new_index(b, "scale"): a for b, a in (scales or {}).items()})
    for boundary, weight in (operators or {}).items():
        install_ghost(new_ad.boundary_module(new_index(boundary, "operator")), weight)
    return pruned


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Give `module` a new parameter (never edit in place: the dense model shares the old one)."""
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.to(old.dtype), requires_grad=old.requires_grad))


def fold_mlp_transform(ad, layer: int, transform: torch.Tensor) -> None:
    """Layer `layer`'s MLP output m becomes m T: W_down ← Tᵀ W_down (nn.Linear stores (out, in)), b ← b T."""
    down = ad.down_proj(layer)
    t = transform.to(down.weight.device, torch.float64)
    _replace(down, "weight", t.T @ down.weight.double())
    if getattr(down, "bias", None) is not None:
        _replace(down, "bias", down.bias.double() @ t)


def fold_scales(ad, scales: Mapping[int, float]) -> None:
    """h_b ← α_b h_b at each boundary b, folded into the weights after it.

    RMSNorm makes every layer blind to the scale of its input, so multiplying the residual stream at b by α is the
    same, up to an overall factor the final norm removes, as multiplying everything written to it after b by 1/α.
    Layer k's writes are scaled by Π 1/α_b over the boundaries b ≤ k. Unlike scaling the embeddings and the
    writes before b, this leaves the embedding (and a tied LM head) alone.
    """
    factor = 1.0
    for k in range(ad.num_layers):
        if k in scales:
            factor /= scales[k]
        if factor != 1.0:
            ad.scale_residual_writes(k, factor, _replace)
