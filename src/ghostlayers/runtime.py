"""What a pruned model needs at run time: the operator module, and the model class of an exact export.

This file imports nothing but torch and transformers, because it is also the code of every exact export: `save`
copies it verbatim into the folder as `modeling_ghostlayers.py`, followed by one generated line that names the
base architecture, e.g.

    GhostlayersConfig, GhostlayersForCausalLM = ghostlayers_classes(LlamaConfig, LlamaForCausalLM)

and the folder's config.json points `auto_map` at those two classes. So
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` rebuilds the pruned model, operators
included, in a process that has never heard of ghostlayers; without `trust_remote_code` the unknown `model_type`
("ghostlayers_llama", …) makes transformers refuse the folder instead of loading it silently without its operators.
"""

from __future__ import annotations

import torch
from torch import nn

MODEL_TYPE_PREFIX = "ghostlayers_"


class GhostOperator(nn.Module):
    """h ← h W, applied to the residual stream where removed layers used to be.

    `weight` is C×C (the ghost W* = I + M*, or LinearPatch-R's H diag(d) Hᵀ) or a C vector (a diagonal map,
    LinearPatch-D's d). It is kept in float32 (or float64) even in a 16-bit model; the product runs in the
    model's dtype.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype | None = None, device: torch.device | None = None):
        super().__init__()
        init = torch.ones(shape, dtype=dtype, device=device) if len(shape) == 1 else torch.eye(shape[0], dtype=dtype, device=device)
        self.weight = nn.Parameter(init, requires_grad=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(hidden_states.dtype)
        return hidden_states * w if w.dim() == 1 else hidden_states @ w  # (B, T, C) · (C,) or @ (C, C)


def operator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Operators of 16-bit models are stored in float32: W = I + M rounded to 8 mantissa bits loses M."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


_GHOSTED: dict[type, type] = {}


def ghosted_class(cls: type) -> type:
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


def attach_ghost(module: nn.Module, shape: tuple[int, ...]) -> GhostOperator:
    """Give `module` an identity operator of `shape` (C×C or C) applied to its input; returns the operator."""
    ref = next(module.parameters())
    ghost = GhostOperator(tuple(shape), dtype=operator_dtype(ref.dtype), device=ref.device)
    if not hasattr(module, "ghost"):
        module.__class__ = ghosted_class(type(module))
    module.ghost = ghost
    return ghost


def ghostlayers_classes(config_class: type, model_class: type) -> tuple[type, type]:
    """The config and causal-LM classes of an exact export whose base architecture is `model_class`.

    The config is the base config plus `ghost_operators` ({module name: operator shape}); the model is the base
    model with those operators attached, kept in float32 when loaded in 16 bits, and `from_pretrained` refuses a
    checkpoint that lacks one of them (transformers would otherwise leave it at identity with a warning).
    """
    model_type = MODEL_TYPE_PREFIX + config_class.model_type
    config_cls = type("GhostlayersConfig", (config_class,), {"model_type": model_type, "__module__": __name__})

    def __init__(self, config):
        model_class.__init__(self, config)
        for name, shape in (getattr(config, "ghost_operators", None) or {}).items():
            attach_ghost(self.get_submodule(name), tuple(shape))

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super(model_cls, cls).from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = sorted(k for k in info.get("missing_keys", ()) if ".ghost." in k)
        if missing:
            raise ValueError(f"this ghostlayers export is corrupted: its weights lack the operators {missing}")
        return (model, info) if want_info else model

    keep = set(getattr(model_class, "_keep_in_fp32_modules_strict", None) or ()) | {"ghost"}
    model_cls = type(
        "GhostlayersForCausalLM",
        (model_class,),
        {
            "config_class": config_cls,
            "_keep_in_fp32_modules_strict": keep,
            "__init__": __init__,
            "from_pretrained": from_pretrained,
            "__module__": __name__,
        },
    )
    return config_cls, model_cls
