"""Apply a plan: drop decoder layers and install operators as real modules.

The pruned model is a new `PreTrainedModel` built on the meta device from the pruned config, whose parameters and
buffers are the dense model's own tensor objects (no copy, ties preserved). Building from the new config is what
renumbers `layer_idx`, per-layer attention types and sliding windows consistently: every layer is constructed for
its new position. The dense model is left untouched, so one calibration pass can feed many variants.

Because the two models share parameter objects, an in-place conversion of the pruned one (`pruned.to(torch.bfloat16)`,
`pruned.cuda()`) converts the dense model's kept layers too. Call `unshare(pruned)` first when the dense model is
still in use: it gives the pruned model parameter objects of its own, still without copying any weight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel

from .errors import GhostlayersError
from .maps import Edits, Operator
from .models import adapter, rebuild
from .plan import Plan
from .runtime import GhostOperator, attach_ghost, operator_problems


def install_ghost(
    module: nn.Module, parts: torch.Tensor | Mapping[str, torch.Tensor], hidden: int | None = None
) -> GhostOperator:
    """Make `module` apply the operator `parts` to its input (see `runtime.GhostOperator`): a tensor is the weight
    (h ← h·W, C×C, or C for a diagonal); a mapping names the parts, {"weight": W} or {"down": D, "up": U} (h ← h +
    h·D·U), either with an optional "bias": b added after. `hidden`, when given, is the C the shapes must have."""
    tensors = {"weight": parts} if isinstance(parts, torch.Tensor) else dict(parts)
    if not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise GhostlayersError(f"internal: operator parts must be tensors, got {sorted(tensors)}")
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    problems = operator_problems(shapes, hidden)
    if problems:
        raise GhostlayersError("not a ghost operator: " + "; ".join(problems))
    ghost = attach_ghost(module, shapes, next(iter(tensors.values())).device)
    for name, tensor in tensors.items():
        target = getattr(ghost, name)
        target.data.copy_(tensor.to(target.device, target.dtype))
    return ghost


def ghost_modules(model: PreTrainedModel) -> dict[str, GhostOperator]:
    """Installed operators by the name of the module they feed, e.g. {"model.layers.17": op}."""
    # by class name too: a model loaded with trust_remote_code has the export's own copy of the class
    return {name.rsplit(".", 1)[0]: m for name, m in model.named_modules() if type(m).__name__ == GhostOperator.__name__}


def unshare(model: PreTrainedModel) -> PreTrainedModel:
    """Give every parameter of `model` a `Parameter` object of its own, on the same storage (nothing is copied; tied
    parameters stay tied), so that `model.to(dtype or device)` replaces only `model`'s tensors and leaves the model
    it was pruned from as it is. Returns `model`."""
    own: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is not None:
                if id(param) not in own:
                    own[id(param)] = nn.Parameter(param.data, requires_grad=param.requires_grad)
                module._parameters[key] = own[id(param)]
    return model


def prune(
    model: PreTrainedModel,
    removed: Sequence[int],
    operators: Mapping[int, torch.Tensor | Mapping[str, torch.Tensor]] | None = None,
    scales: Mapping[int, float] | None = None,
    transforms: Mapping[int, torch.Tensor] | None = None,
    rotations: Mapping[int, torch.Tensor] | None = None,
) -> PreTrainedModel:
    """The model without the decoder layers `removed` (dense numbering), with recovery installed or folded.
    (`build` with every fold applied.)

    operators:  dense boundary b -> operator applied to h_b as a module (b is a kept layer, or num_layers for the
                final norm): a weight W (h_b ← h_b W), or its parts {"weight"|"down","up"[,"bias"]} (see
                `install_ghost`)
    scales:     dense boundary b -> α, folded: h_b ← α h_b (see `Folds`)
    transforms: dense layer l -> T, folded: layer l's MLP output m ← m T (W_down ← Tᵀ W_down)
    rotations:  dense boundary b -> orthogonal Q (C×C), folded: h_b ← h_b Q (see `Folds`); boundaries as
                for operators, several compose; unties a tied LM head. No operator may sit at or after a rotation
    The dense model is never modified: folded tensors are new parameters of the pruned model only.
    """
    return build(model, removed, Edits(dict(operators or {}), dict(scales or {}), dict(rotations or {}),
                                       dict(transforms or {})))[0]


def build(model: PreTrainedModel, removed: Sequence[int], edits: Edits, defer_folds: bool = False,
          ) -> tuple[PreTrainedModel, Folds]:
    """`prune` with `edits` (dense numbering), and the folds in the pruned model's numbering; with `defer_folds`
    those are left for the caller to apply layer by layer (`Folds.apply`: a model whose layers are still in their
    files, `offload.Offloaded.hold`)."""
    operators, scales, transforms, rotations = edits.operators, edits.scales, edits.transforms, edits.rotations
    ad = adapter(model)
    if ghost_modules(model):
        raise GhostlayersError("this model is already pruned: prune the dense model instead")
    n = ad.num_layers
    dropped = set(removed)
    if not dropped or not all(0 <= i < n for i in dropped) or len(dropped) >= n:
        raise GhostlayersError(f"cannot remove layers {sorted(dropped)} from a model with {n} layers")
    plan = Plan(n, tuple(sorted(dropped)))
    keep = plan.kept
    if rotations:
        ad.check_can_fold_rotations()
        if operators and max(operators) >= min(rotations):
            raise GhostlayersError(
                f"internal: an operator at boundary {max(operators)} would see the stream a rotation folded at "
                f"{min(rotations)} leaves unrotated: rotations cannot precede operators"
            )

    config = plan.pruned_config(model.config, ad.family.per_layer_config)

    prefix = ad.layers_prefix + "."

    def old_name(name: str) -> str:
        if not name.startswith(prefix):
            return name
        index, rest = name[len(prefix) :].split(".", 1)
        return f"{prefix}{keep[int(index)]}.{rest}"

    pruned = rebuild(model, config, old_name)
    new_ad = adapter(pruned)

    def new_index(dense: int, what: str) -> int:
        if dense != n and dense not in keep:
            raise GhostlayersError(f"internal: {what} at removed layer {dense}")
        return plan.pruned_index(dense)

    folds = Folds({new_index(b, "scale"): a for b, a in (scales or {}).items()},
                  {new_index(layer, "transform"): t for layer, t in (transforms or {}).items()},
                  {new_index(b, "rotation"): q for b, q in (rotations or {}).items()})
    folds.check(new_ad)
    if not defer_folds:
        for k in range(new_ad.num_layers + 1):
            folds.apply(new_ad, k)
    for boundary, parts in (operators or {}).items():
        install_ghost(new_ad.boundary_module(new_index(boundary, "operator")), parts, getattr(config, "hidden_size", None))
    return pruned, folds


def replace_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Give `module` a new parameter (never edit in place: the dense model shares the old one)."""
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.to(old.dtype), requires_grad=old.requires_grad))


def fold_mlp_transform(ad, layer: int, transform: torch.Tensor) -> None:
    """Layer `layer`'s MLP output m becomes m T: W_down ← Tᵀ W_down (nn.Linear stores (out, in)), b ← b T."""
    down = ad.down_proj(layer)
    t = transform.to(down.weight.device, torch.float64)
    replace_parameter(down, "weight", t.T @ down.weight.double())
    if getattr(down, "bias", None) is not None:
        replace_parameter(down, "bias", down.bias.double() @ t)


@dataclass
class Folds:
    """What folds into a pruned model's weights, keyed in its own numbering, applied one layer at a time (`apply`),
    so that a model whose layers are read from disk one at a time (layer by layer) folds each as it is read:

    scales:     boundary b -> α: h_b ← α h_b. RMSNorm makes every layer blind to the scale of its input, so this is
                the same, up to an overall factor the final norm removes, as multiplying everything written to the
                stream after b by 1/α: layer k's writes are scaled by Π 1/α_b over the boundaries b ≤ k. Unlike
                scaling the embeddings and the writes before b, this leaves the embedding (and a tied LM head) alone.
    transforms: layer l -> T: its MLP output m ← m T (W_down ← Tᵀ W_down, nn.Linear storing (out, in); b ← b T).
    rotations:  boundary b -> orthogonal Q (C×C; b a layer, or num_layers for the final norm): h_b ← h_b Q, folded
                exactly (SliceGPT's RMSNorm invariance). Let R_k = Q_b1 Q_b2 ⋯ over the boundaries b ≤ k in order.
                The model with the operators has residual stream g_k = f_k R_k, where f_k is the folded model's
                stream, which stays unrotated. Since ‖h R‖ = ‖h‖, a norm reading g gives normalise(f) R diag(w), so
                every linear W (nn.Linear's (out, in)) reading it becomes W diag(w) R_kᵀ and the norm weight becomes
                1; every write o (o_proj, down_proj) must land in f's frame, o Rᵀ: W ← R_k W, b ← b R_kᵀ. Layers
                before the first boundary and the embeddings are untouched; the final norm and the LM head fold like
                any reader, so a tied LM head gets its own parameter (see `Adapter.untie_lm_head`).
    Float64 arithmetic, results in each tensor's dtype; new parameters only (`replace_parameter`).
    """

    scales: dict[int, float] = field(default_factory=dict)
    transforms: dict[int, torch.Tensor] = field(default_factory=dict)
    rotations: dict[int, torch.Tensor] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.scales or self.transforms or self.rotations)

    def check(self, ad) -> None:
        """Refuse rotations the architecture cannot take, of the wrong shape, or not orthogonal."""
        if not self.rotations:
            return
        ad.check_can_fold_rotations()
        n, c = ad.num_layers, ad.hidden_size
        for b, q in self.rotations.items():
            if not 0 <= b <= n:
                raise GhostlayersError(f"internal: rotation at boundary {b} of a model with {n} layers")
            if tuple(q.shape) != (c, c):
                raise GhostlayersError(f"internal: the rotation at boundary {b} has shape {tuple(q.shape)}, expected {(c, c)}")
            q64 = q.detach().to("cpu", torch.float64)
            error = (q64.T @ q64 - torch.eye(c, dtype=torch.float64)).abs().max().item()
            if not error <= 1e-5:
                raise GhostlayersError(f"internal: the rotation at boundary {b} is not orthogonal (|QᵀQ − I| = {error:.1e})")

    def _rotation_upto(self, k: int) -> torch.Tensor | None:
        """R_k = Q_b1 Q_b2 ⋯ over the boundaries b ≤ k, in order (products kept: each is made once)."""
        total, cache = None, self.__dict__.setdefault("_products", {})
        for b in sorted(self.rotations):
            if b > k:
                break
            if b not in cache:
                q = self.rotations[b].detach().to("cpu", torch.float64)
                cache[b] = q if total is None else total @ q
            total = cache[b]
        return total

    def apply(self, ad, k: int) -> None:
        """Fold into pruned layer k (k = num_layers: the final norm and the LM head); layers are independent."""
        n = ad.num_layers
        if k < n and k in self.transforms:
            fold_mlp_transform(ad, k, self.transforms[k])
        factor = 1.0
        for b in sorted(self.scales):
            if b <= k:
                factor /= self.scales[b]
        if k < n and factor != 1.0:
            ad.scale_residual_writes(k, factor, replace_parameter)
        total = self._rotation_upto(k)
        if total is None:
            return
        for norm, readers in ad.norm_reads(k):
            w = norm.weight.detach().to("cpu", torch.float64)
            absorbed = w[:, None] * total.T  # diag(w) R_kᵀ
            for linear in readers:
                replace_parameter(linear, "weight", _right_multiply(linear.weight.detach(), absorbed))
            replace_parameter(norm, "weight", torch.ones_like(norm.weight))
        if k < n:
            for linear in ad.residual_writes(k):  # (R W)ᵀ = Wᵀ Rᵀ: rows of Wᵀ, a block at a time
                replace_parameter(linear, "weight", _right_multiply(linear.weight.detach().T, total.T).T.contiguous())
                if getattr(linear, "bias", None) is not None:
                    replace_parameter(linear, "bias", _right_multiply(linear.bias.detach()[None], total.T)[0])
        else:
            ad.untie_lm_head()


def _right_multiply(weight: torch.Tensor, matrix: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """weight @ matrix in float64, cast back to weight's dtype, a block of rows at a time (an LM head in float64
    at once would take vocab × C × 8 bytes)."""
    m = matrix.to(weight.device, torch.float64)
    out = torch.empty(weight.shape[0], m.shape[1], dtype=weight.dtype, device=weight.device)
    for start in range(0, weight.shape[0], chunk):
        out[start : start + chunk] = (weight[start : start + chunk].double() @ m).to(weight.dtype)
    return out


def apply(model: PreTrainedModel, removed: Sequence[int], operators: list[Operator]) -> PreTrainedModel:
    """The dense model without `removed`, with `operators` installed as modules or folded into the weights."""
    return apply_deferred(model, removed, operators, False)[0]


def apply_deferred(model: PreTrainedModel, removed: Sequence[int], operators: list[Operator],
                   defer_folds: bool = True) -> tuple[PreTrainedModel, Folds]:
    """`apply`, the folds left to the caller (`build`)."""
    edits = Edits()
    for op in operators:
        op.map.place(edits, op.block)
    return build(model, removed, edits, defer_folds)
