"""Load a model (local folder, hub id, .gguf file or alias) and the one adapter for the Llama family.

Everything downstream sees a plain floating-point `PreTrainedModel` (no gguf quantization config) and reaches its
parts only through `Adapter`, which is keyed on `config.model_type`, never on module or checkpoint names.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .data import hub_offline
from .errors import GhostlayersError
from .locate import ALIASES, gguf_layer_types, smollm2_gguf
from .runtime import MODEL_TYPE_PREFIX, ghostlayers_classes

@dataclass(frozen=True)
class Family:
    """What differs between the supported architectures, all of them a decoder `model.layers[i]` between
    `model.embed_tokens` and `model.norm`, each layer a residual block `h + attn(norm(h))`, `h + mlp(norm(h))`, with
    q/k/v/o and gate/up/down projections and RMSNorms named as in Llama.

    mlp_adds_to_residual: the MLP output is added to the stream as it is (False: through another norm first, as in
                          Gemma 3), which matters to methods that fold into the MLP.
    rotations_fold:       an orthogonal map of the stream folds exactly into the weights (SliceGPT's invariance):
                          every norm reading the stream computes normalise(h)·w, the linears after it read nothing
                          else, and o_proj(…), down_proj(…) are added as they are. Not Gemma 3, whose post-norms
                          normalise each output before the addition.
    per_layer_config:     config fields holding one entry per decoder layer, which a pruned config keeps for the
                          kept layers only.
    gguf_arch:            llama.cpp's name for the architecture (`--format gguf`), None where it is not written.
    """

    mlp_adds_to_residual: bool = True
    rotations_fold: bool = True
    per_layer_config: tuple[str, ...] = ("layer_types",)
    gguf_arch: str | None = None


# keyed on config.model_type; adding a Llama-shaped family is one entry here (see docs/design.md)
FAMILIES: dict[str, Family] = {
    "llama": Family(gguf_arch="llama"),
    "mistral": Family(gguf_arch="llama"),  # llama.cpp runs Mistral as llama
    "qwen2": Family(gguf_arch="qwen2"),
    "qwen3": Family(gguf_arch="qwen3"),
    "gemma3_text": Family(mlp_adds_to_residual=False, rotations_fold=False, gguf_arch="gemma3"),
    "smollm3": Family(per_layer_config=("layer_types", "no_rope_layers")),  # some layers without rotary embeddings
}
SUPPORTED_TYPES = tuple(FAMILIES)


@dataclass(frozen=True)
class Adapter:
    """What the algorithms need to know about a decoder-only model, and nothing more."""

    model: PreTrainedModel

    @property
    def backbone(self) -> nn.Module:
        return self.model.model

    @property
    def layers(self) -> nn.ModuleList:
        return self.backbone.layers

    @property
    def layers_prefix(self) -> str:
        """State-dict prefix of the decoder layers; layer i's keys start with f"{prefix}.{i}."."""
        return "model.layers"

    @property
    def final_norm(self) -> nn.Module:
        return self.backbone.norm

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def mlp_adds_to_residual(self) -> bool:
        return self.family.mlp_adds_to_residual

    @property
    def family(self) -> Family:
        return family(self.model.config)

    def mlp(self, index: int) -> nn.Module:
        """Layer `index`'s MLP; its output is what the layer adds to the residual stream after attention (unless
        `mlp_adds_to_residual` is False)."""
        return self.layers[index].mlp

    def down_proj(self, index: int) -> nn.Module:
        return self.layers[index].mlp.down_proj

    def scale_residual_writes(self, index: int, factor: float, replace) -> None:
        """Scale what layer `index` adds to the residual stream by `factor`, with `replace(module, name, tensor)`."""
        layer = self.layers[index]
        if self.mlp_adds_to_residual:  # h + o_proj(…) and h + down_proj(…)
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                replace(linear, "weight", linear.weight.double() * factor)
                if getattr(linear, "bias", None) is not None:
                    replace(linear, "bias", linear.bias.double() * factor)
        else:  # Gemma 3: h + post_norm(…), post_norm(x) = normalise(x) · (1 + w)
            for norm in (layer.post_attention_layernorm, layer.post_feedforward_layernorm):
                replace(norm, "weight", (1.0 + norm.weight.double()) * factor - 1.0)

    @property
    def can_fold_rotations(self) -> bool:
        """Whether an orthogonal map h ← h Q of the residual stream can be folded into the weights (see
        `surgery.Folds`); False for Gemma 3."""
        return self.family.rotations_fold

    def check_can_fold_rotations(self) -> None:
        """Refuse, in one line that names another recovery, an architecture where `can_fold_rotations` is False."""
        if not self.can_fold_rotations:
            model_type = base_model_type(self.model.config.model_type)
            raise GhostlayersError(
                f"procrustes folds a rotation into the weights, which {model_type} cannot take: its post-attention and "
                "post-feedforward norms normalise each layer's output before it reaches the residual stream, so no "
                "rotation passes through them; use another recovery on this architecture (ghost keeps its operator "
                "as a module)"
            )

    @property
    def embed_tokens(self) -> nn.Module:
        return self.backbone.embed_tokens

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    @property
    def lm_head_tied(self) -> bool:
        return self.lm_head.weight is self.embed_tokens.weight

    def norm_reads(self, index: int) -> list[tuple[nn.Module, list[nn.Linear]]]:
        """The RMSNorms that read the residual stream at boundary `index`, each with the linears that read its output:
        layer `index`'s input norm (q/k/v projections) and post-attention norm (gate/up projections), or, for
        index == num_layers, the final norm and the LM head. Qwen 3's q_norm/k_norm act after q/k_proj, per head,
        and are not readers of the stream. Only for architectures where `can_fold_rotations`."""
        if index == self.num_layers:
            return [(self.final_norm, [self.lm_head])]
        layer = self.layers[index]
        attn, mlp = layer.self_attn, layer.mlp
        return [
            (layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
            (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]),
        ]

    def o_proj(self, index: int) -> nn.Linear:
        """The linear that writes layer `index`'s attention context z to the stream (through a norm on Gemma 3)."""
        return self.layers[index].self_attn.o_proj

    def write_norm(self, index: int, part: str) -> nn.Module | None:
        """The norm between layer `index`'s write projection (`part` "o_proj" or "down_proj") and the residual stream:
        None where the projection's output is added as it is, Gemma 3's post-attention / post-feedforward norm
        (normalise(x) · (1 + w)) otherwise."""
        if self.mlp_adds_to_residual:
            return None
        layer = self.layers[index]
        return layer.post_attention_layernorm if part == "o_proj" else layer.post_feedforward_layernorm

    def unnormalise(self, norm: nn.Module, target: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """What the input of a `write_norm` should be for its output to be `target` (N, C), at the scale of its
        current input `at` (N, C): target / g · rms(at) per token, with norm(x) = x / rms(x) · g and g = 1 + w
        (Gemma 3). A norm keeps only the direction of its input, so its inverse is fixed up to that scale."""
        eps = float(getattr(norm, "eps", 1e-6))
        rms = (at.square().mean(-1, keepdim=True) + eps).sqrt()
        gain = 1.0 + norm.weight.detach().to(target.device, target.dtype)
        return target / gain * rms

    def input_norm(self, index: int) -> nn.Module:
        """The norm before layer `index`'s attention: its input is the stream the attention's write is added to."""
        return self.layers[index].input_layernorm

    def mid_norm(self, index: int) -> nn.Module:
        """The norm before layer `index`'s MLP: its input is the layer's mid-state (the stream after attention)."""
        layer = self.layers[index]
        return layer.post_attention_layernorm if self.mlp_adds_to_residual else layer.pre_feedforward_layernorm

    def residual_writes(self, index: int) -> list[nn.Linear]:
        """The linears whose outputs layer `index` adds to the residual stream as they are (when
        `mlp_adds_to_residual`): o_proj and down_proj."""
        return [self.o_proj(index), self.down_proj(index)]

    def untie_lm_head(self) -> None:
        """Give the LM head a parameter of its own (a copy, unless it already has one) and mark the model untied, so
        neither `tie_weights` nor a saved checkpoint ties it back to the embeddings."""
        head = self.lm_head
        if self.lm_head_tied:
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
        self.model.config.tie_word_embeddings = False
        if hasattr(self.model, "all_tied_weights_keys"):  # transformers' record of what to tie, taken at build time
            self.model.all_tied_weights_keys = self.model.get_expanded_tied_weights_keys(all_submodels=True)

    def boundary_module(self, index: int) -> nn.Module:
        """The module whose input is h_index: decoder layer `index`, or the final norm for index == num_layers."""
        return self.final_norm if index == self.num_layers else self.layers[index]


def base_model_type(model_type: str | None) -> str | None:
    """The architecture of a model_type; an exact export's "ghostlayers_llama" is a "llama"."""
    if isinstance(model_type, str) and model_type.startswith(MODEL_TYPE_PREFIX):
        return model_type[len(MODEL_TYPE_PREFIX) :]
    return model_type


def base_classes(model_type: str) -> tuple[type, type]:
    """The transformers config and causal-LM classes of the (base) architecture `model_type`."""
    base = base_model_type(model_type)
    if base not in FAMILIES:
        raise GhostlayersError(f"unsupported architecture {base!r}: ghostlayers supports {', '.join(SUPPORTED_TYPES)}")
    config_cls = CONFIG_MAPPING[base]
    return config_cls, MODEL_FOR_CAUSAL_LM_MAPPING[config_cls]


def check_supported(config) -> None:
    family(config)


def family(config) -> Family:
    """The family of a (dense, or exact-export) config; an unsupported one is refused, naming the supported."""
    model_type = base_model_type(getattr(config, "model_type", None))
    if model_type not in FAMILIES:
        raise GhostlayersError(
            f"unsupported architecture {model_type!r}: ghostlayers supports {', '.join(SUPPORTED_TYPES)}"
        )
    return FAMILIES[model_type]


def adapter(model: PreTrainedModel) -> Adapter:
    check_supported(model.config)
    return Adapter(model)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise GhostlayersError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GhostlayersError(f"--device {device} asked for, but no CUDA device is visible; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise GhostlayersError(f"unsupported device {device!r}: use cpu, cuda, cuda:N or auto")
    return dev


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def resolve_dtype(dtype: str, config_dtype: torch.dtype | None = None) -> torch.dtype:
    """`auto` keeps a checkpoint's own dtype (so a saved model reloads bit-identical), float32 when it has none."""
    if dtype == "auto":
        return config_dtype if config_dtype in DTYPES.values() else torch.float32
    if dtype not in DTYPES:
        raise GhostlayersError(f"unknown dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_context(model: PreTrainedModel, seq_len: int) -> None:
    """Refuse windows longer than the model's context (`max_position_embeddings`), in one line."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise GhostlayersError(f"--seq-len {seq_len} exceeds the model's context of {limit} tokens: use at most {limit}")


def load_model(
    spec: str, dtype: str = "auto", device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `spec` (alias, .gguf file, local folder or hub id) as a plain float model in eval mode.

    dtype `auto` keeps the checkpoint's dtype (float32 for GGUF files, whose weights are dequantised).
    """
    dev = resolve_device(device)
    if dtype != "auto":
        resolve_dtype(dtype)  # fail on a bad name before any loading
    if spec in ALIASES:
        spec = str(smollm2_gguf())
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise GhostlayersError(f"GGUF file {spec} does not exist")
        model, tokenizer = _load_gguf(path, resolve_dtype(dtype))
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise GhostlayersError(f"{spec} is a folder but has no config.json: point --model at a Hugging Face model folder")
        model, tokenizer = _load_pretrained(str(path), dtype, local=True)
    elif path.exists():
        raise GhostlayersError(f"{spec} is a file but not a .gguf: pass a model folder, a .gguf file or a hub id")
    else:
        org, _, name = spec.partition("/")
        if not (org and name and "/" not in name and not spec.startswith((".", "~"))):
            raise GhostlayersError(
                f"unknown model {spec!r}: no such folder or .gguf file, and not a hub id (org/name) "
                f"or an alias ({', '.join(ALIASES)})"
            )
        if hub_offline():
            raise GhostlayersError(
                f"model {spec!r} is not a local folder and the hub is offline (HF_HUB_OFFLINE=1): "
                "download it first or pass a local folder"
            )
        model, tokenizer = _load_pretrained(spec, dtype, local=False)
    return model.to(dev).eval(), tokenizer


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load_pretrained(name: str, dtype: str, local: bool):
    """A transformers checkpoint (or an exact ghostlayers export, rebuilt with this package's `runtime` classes,
    never with the folder's code); safetensors weights only; every failure becomes one GhostlayersError line."""
    where = "folder" if local else "hub model"
    try:
        values, _ = PretrainedConfig.get_config_dict(name, local_files_only=local)
        model_type = values.get("model_type")
        if isinstance(model_type, str) and model_type.startswith(MODEL_TYPE_PREFIX):
            values = {k: v for k, v in values.items() if k not in ("model_type", "auto_map")}
            config_cls, model_cls = ghostlayers_classes(*base_classes(model_type))
            config = config_cls.from_dict(values)
        else:
            config, model_cls = AutoConfig.from_pretrained(name, local_files_only=local), AutoModelForCausalLM
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise GhostlayersError(f"cannot read the config of {where} {name!r}: {_first_line(err)}") from None
    check_supported(config)
    if local:
        _check_safetensors(Path(name))
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, config=config, local_files_only=local)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise GhostlayersError(f"cannot load the tokenizer of {where} {name!r}: {_first_line(err)}") from None
    torch_dtype = resolve_dtype(dtype, getattr(config, "dtype", None))
    try:
        model = model_cls.from_pretrained(
            name, config=config, dtype=torch_dtype, local_files_only=local, use_safetensors=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise GhostlayersError(f"cannot load the weights of {where} {name!r}: {_first_line(err)}") from None
    return model, tokenizer


def _check_safetensors(folder: Path) -> None:
    """Refuse a folder whose weights exist only as pickle files: loading them can run arbitrary code."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise GhostlayersError(
            f"{folder} has only pickle weights ({', '.join(pickles)}), which ghostlayers never loads because "
            "unpickling can run arbitrary code: convert them to safetensors first (from a source you trust)"
        )
    raise GhostlayersError(f"{folder} has no weights (*.safetensors): point --model at a complete model folder")


def _load_gguf(path: Path, dtype: torch.dtype):
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as err:
        raise GhostlayersError("reading .gguf files needs the gguf package: pip install gguf") from err
    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        types = gguf_layer_types(path, config.num_hidden_layers)
        if types is not None and getattr(config, "layer_types", None) is not None:
            config.layer_types = types
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise GhostlayersError(f"cannot load GGUF file {path}: {_first_line(err)}") from None
    check_supported(model.config)
    # The dequantised model still carries the gguf quantization config, which blocks saving. Rebuild it without.
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return rebuild(model, config, lambda name: name), tokenizer


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


def num_parameters(model: nn.Module) -> int:
    """Parameters counted once even when shared (tied embeddings)."""
    return sum(p.numel() for p in model.parameters())
