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
    """h ← h W + b, applied to the residual stream where removed layers used to be.

    Built from the shapes of its parts; the linear part is exactly one of
      weight      C×C (the ghost W* = I + M*, or LinearPatch-R's H diag(d) Hᵀ): h ← h W, or a C vector (a
                  diagonal map, LinearPatch-D's d): h ← h * d;
      down, up    C×r and r×C, a low-rank W = I + down·up: h ← h + (h down) up;
    and `bias` (C), if present, is added after it. Every part starts at identity (weight I or 1, down and up 0,
    bias 0). Parts are kept in float32 (or float64) even in a 16-bit model; the product runs in float32 (or the
    model's dtype, if wider) and its result is cast to the model's dtype.
    An absent part is a `None` parameter, so the state dict holds "<module>.ghost.<part>" for the present ones only.
    """

    PARTS = ("weight", "down", "up", "bias")

    def __init__(self, parts, dtype: torch.dtype | None = None, device: torch.device | None = None):
        super().__init__()
        parts = {k: tuple(int(n) for n in v) for k, v in normalise_parts(parts).items()}
        problems = operator_problems(parts)
        if problems:
            raise ValueError("not a ghost operator: " + "; ".join(problems))
        kw = dict(dtype=dtype, device=device)
        for name in self.PARTS:
            if name not in parts:
                self.register_parameter(name, None)
                continue
            shape = parts[name]
            if name == "weight":
                init = torch.ones(shape, **kw) if len(shape) == 1 else torch.eye(shape[0], **kw)
            else:
                init = torch.zeros(shape, **kw)
            self.register_parameter(name, nn.Parameter(init, requires_grad=False))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        # the product runs in at least float32 and only its result is rounded to the model's dtype: W = I + M
        # rounded to bfloat16 first would lose ~4% of M
        compute = torch.promote_types(dtype, torch.float32)
        h = hidden_states.to(compute)
        if self.weight is not None:
            w = self.weight.to(compute)
            out = h * w if w.dim() == 1 else h @ w  # (B, T, C) · (C,) or @ (C, C)
        else:
            out = h + (h @ self.down.to(compute)) @ self.up.to(compute)  # (B, T, C) @ (C, r) @ (r, C)
        out = out if self.bias is None else out + self.bias.to(compute)
        return out.to(dtype)


def normalise_parts(parts) -> dict:
    """{part: shape} from an operator's declaration: a mapping, or (the form before affine and low-rank operators)
    a bare shape, which means {"weight": shape}."""
    if isinstance(parts, (tuple, list, torch.Size)):
        return {"weight": tuple(parts)}
    if isinstance(parts, dict) or hasattr(parts, "items"):
        return dict(parts.items())
    raise ValueError(f"an operator is declared by its parts' shapes or one shape, not {parts!r}")


def operator_problems(parts: dict, hidden: int | None = None) -> list[str]:
    """What makes a set of part shapes no operator (of hidden size `hidden`, when given); [] when it is one. The
    linear part is `weight` (C×C or C), or `down` (C×r) and `up` (r×C) with 1 ≤ r ≤ C; `bias` (C) is optional."""
    problems = []
    unknown = sorted(set(parts) - set(GhostOperator.PARTS))
    if unknown:
        problems.append(f"unknown parts {unknown}")
    shapes = {k: tuple(v) for k, v in parts.items() if k in GhostOperator.PARTS}
    odd = sorted(k for k, v in shapes.items() if not all(type(n) is int and n >= 0 for n in v))
    if odd:
        return problems + [f"parts {odd} have shapes that are not lists of sizes"]
    low_rank = [k for k in ("down", "up") if k in shapes]
    if "weight" in shapes and low_rank:
        problems.append(f"both weight and {' and '.join(low_rank)}")
    elif "weight" not in shapes and len(low_rank) != 2:
        other = {"down": "up", "up": "down"}
        problems.append(f"{low_rank[0]} without {other[low_rank[0]]}" if low_rank else "no weight, and no down and up")
    c = hidden
    if "weight" in shapes:
        w = shapes["weight"]
        c = c if c is not None else (w[0] if w else None)
        if w not in ((c, c), (c,)):
            problems.append(f"weight has shape {w}, expected {(c, c)} or {(c,)}")
    if "down" in shapes and "up" in shapes:
        d, u = shapes["down"], shapes["up"]
        c = c if c is not None else (d[0] if d else None)
        r = d[1] if len(d) == 2 else None
        if len(d) != 2 or len(u) != 2 or d[0] != c or u[1] != c or u[0] != r or not (c is not None and 1 <= r <= c):
            problems.append(f"down has shape {d} and up {u}, expected ({c}, r) and (r, {c}) with 1 ≤ r ≤ {c}")
    if "bias" in shapes:
        c = c if c is not None else (shapes["bias"][0] if shapes["bias"] else None)
        if shapes["bias"] != (c,):
            problems.append(f"bias has shape {shapes['bias']}, expected {(c,)}")
    return problems


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


def attach_ghost(module: nn.Module, parts, device: torch.device | str | None = None) -> GhostOperator:
    """Give `module` an identity operator applied to its input; returns the operator.

    `parts` maps part names to shapes ({"weight": (C, C)}, {"down": (C, r), "up": (r, C), "bias": (C,)}, …, see
    `GhostOperator`); a bare shape (C×C or C) means {"weight": shape}. `device`: where the operator goes when
    `module`'s weights are on the meta device (not read yet), else it goes where they are.
    """
    ref = next(module.parameters())
    device = ref.device if device is None or not ref.is_meta else device  # a layer left in its file (offload)
    ghost = GhostOperator(parts, dtype=operator_dtype(ref.dtype), device=device)
    if not hasattr(module, "ghost"):
        module.__class__ = ghosted_class(type(module))
    module.ghost = ghost
    return ghost


def ghostlayers_classes(config_class: type, model_class: type) -> tuple[type, type]:
    """The config and causal-LM classes of an exact export whose base architecture is `model_class`.

    The config is the base config plus `ghost_operators` ({module name: {part: shape}}, or {module name: shape}
    as written before operators had parts, meaning {"weight": shape}); the model is the base model with those
    operators attached, kept in float32 when loaded in 16 bits, and `from_pretrained` refuses a checkpoint that
    lacks a part of one of them (transformers would otherwise leave it at identity with a warning) or holds one
    the config does not declare (which transformers would drop with a warning).
    """
    model_type = MODEL_TYPE_PREFIX + config_class.model_type
    config_cls = type("GhostlayersConfig", (config_class,), {"model_type": model_type, "__module__": __name__})

    def __init__(self, config):
        model_class.__init__(self, config)
        for name, parts in (getattr(config, "ghost_operators", None) or {}).items():
            attach_ghost(self.get_submodule(name), parts)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super(model_cls, cls).from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = sorted(k for k in info.get("missing_keys", ()) if ".ghost." in k)
        if missing:
            raise ValueError(f"this ghostlayers export is corrupted: its weights lack the operators {missing}")
        extra = sorted(k for k in info.get("unexpected_keys", ()) if ".ghost." in k)
        if extra:
            raise ValueError(
                f"this ghostlayers export is corrupted: its weights hold operators {extra} that its config does not declare"
            )
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
