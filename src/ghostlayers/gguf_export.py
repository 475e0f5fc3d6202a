"""Write a pruned model as a GGUF file of its base architecture, for llama.cpp, Ollama and LM Studio.

Only models whose recovery folded into the weights can leave this way: a GGUF has no place for a ghost operator.

Two sources of everything that is not a weight:
  a GGUF source   (the dense model was read from a .gguf) its metadata is copied (tokenizer, chat template, rope
                  settings, general.*), with the block count and per-layer arrays cut to the kept layers. Each of its
                  tensors that the pruning left unchanged is copied byte for byte, quantisation and all; only the
                  tensors that changed (the folded ones) are written anew, at `quant`.
  a Hugging Face  (a folder or hub model) the hyperparameters come from config.json, the tensor names from gguf's
  model           own `TensorNameMap`, the vocabulary from gguf's vocab helpers (`SentencePieceVocab`, `BpeVocab`,
                  `LlamaHfVocab`, and `SpecialVocab` for merges, special tokens and the chat template); every tensor
                  is written at `quant`.

Layout differences from transformers, mirrored exactly by transformers' GGUF reader:
  llama   q/k projections interleave the two rotary halves of each head (`_permute`);
  gemma3  RMSNorm weights are stored as 1 + w (transformers stores w, the offset from one).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .locate import gguf_source
from .version import __version__
from .errors import GhostlayersError
from .models import FAMILIES, adapter
from .outputs import check_format, check_output_file, check_quant
from .surgery import ghost_modules

if TYPE_CHECKING:
    from .offload import Offloaded

# transformers model_type -> llama.cpp's architecture name: `models.FAMILIES` (`Family.gguf_arch`)
ARCHS = {name: f.gguf_arch for name, f in FAMILIES.items() if f.gguf_arch}
NORM_OFFSET = {"gemma3"}  # architectures whose GGUF norms hold 1 + w
PERMUTED_QK = {"llama"}  # architectures whose GGUF q/k rows interleave the rotary halves
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass
class Written:
    """What `save_gguf` wrote: the file, and which tensors were copied from the source and which written anew."""

    path: Path
    quant: str
    source: Path | None
    copied: list[str] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)
    fallback: list[str] = field(default_factory=list)  # asked for q8_0 but the row length is not a multiple of 32
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.source is None:
            what = f"{len(self.rewritten)} tensors at {self.quant} (1-D ones in f32)"
        else:
            what = (f"{len(self.copied)} tensors copied unchanged from {self.source.name}, "
                    f"{len(self.rewritten)} changed ones written at {self.quant}")
        if self.fallback:
            what += f"; {len(self.fallback)} in f16 (rows not a multiple of 32, which q8_0 needs)"
        return what


def gguf_arch(model_type: str) -> str:
    try:
        return ARCHS[model_type]
    except KeyError:
        raise GhostlayersError(
            f"GGUF export supports {', '.join(sorted(set(ARCHS)))} models, not {model_type!r}: use --format vanilla"
        ) from None


def check_gguf_exportable(model: PreTrainedModel, method: str | None) -> None:
    """Refuse what a GGUF cannot hold: operators kept as modules, or settings llama.cpp would run differently."""
    check_format("gguf", bool(ghost_modules(model)), f"recovery {method!r}" if method else "this model")
    check_gguf_config(model.config, model.config.num_hidden_layers, from_hf=False)


def check_gguf_config(config, num_layers: int, from_hf: bool = True) -> None:
    """Refuse a config (of a model that will have `num_layers` layers) that llama.cpp would run differently;
    `from_hf`: written from the config (no GGUF source), so its rope settings must be expressible."""
    arch = gguf_arch(config.model_type)
    if from_hf:
        _rope(config)
    if arch == "gemma3":
        # llama.cpp scales attention by head_dim^-1/2, except for a 62-layer model (Gemma 3 27B) by (hidden/heads)^-1/2
        want = config.hidden_size // config.num_attention_heads if num_layers == 62 else config.head_dim
        if config.query_pre_attn_scalar != want:
            raise GhostlayersError(
                f"llama.cpp would scale this Gemma 3's attention by {want}^-1/2, not by query_pre_attn_scalar "
                f"{config.query_pre_attn_scalar}^-1/2: a {num_layers}-layer GGUF of it would not be the same "
                "model; use --format vanilla"
            )
        if getattr(config, "attn_logit_softcapping", None):
            raise GhostlayersError("llama.cpp's gemma3 has no attention logit soft-capping: use --format vanilla")


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """transformers' q/k rows (per head: first rotary half, second half) -> llama.cpp's (the halves interleaved)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _heads(name: str, config) -> int | None:
    if ".attn_q." in name:
        return config.num_attention_heads
    if ".attn_k." in name:
        return config.num_key_value_heads
    return None


def to_gguf(arch: str, name: str, w: np.ndarray, config) -> np.ndarray:
    """A tensor in transformers' layout -> the same tensor as llama.cpp stores it under GGUF name `name`."""
    if arch in PERMUTED_QK and (heads := _heads(name, config)):
        w = _permute(w, heads)
    if arch in NORM_OFFSET and name.endswith("norm.weight"):
        w = w + np.float32(1)
    return w


def to_hf(arch: str, name: str, w: np.ndarray, config) -> np.ndarray:
    """The inverse of `to_gguf`, computed the way transformers' GGUF reader computes it (so a tensor it loaded
    compares equal)."""
    if arch in PERMUTED_QK and (heads := _heads(name, config)):
        w = _unpermute(w, heads)
    if arch in NORM_OFFSET and name.endswith("norm.weight"):
        w = w - 1
    return w


def tensor_names(model: PreTrainedModel) -> dict[str, str]:
    """{GGUF name: transformers state-dict name} of every tensor a GGUF of `model` holds (no output.weight when
    the head is tied to the embedding), named with gguf's own `TensorNameMap`."""
    import gguf

    config = model.config
    arch = gguf_arch(config.model_type)
    key = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    table = gguf.get_tensor_name_map(key, config.num_hidden_layers)
    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr())
    names = {}
    for hf in model.state_dict():
        module, _, suffix = hf.rpartition(".")
        if tied and hf == "lm_head.weight":
            continue
        name = table.get_name(module)
        if name is None:
            raise GhostlayersError(f"internal: gguf has no name for {hf} in a {arch} model")
        names[f"{name}.{suffix}"] = hf
    return names


def encode(w: np.ndarray, quant: str) -> tuple[np.ndarray, Any, bool]:
    """(data, raw GGML type or None, fell back to f16) of a float32 tensor at `quant`; 1-D tensors stay f32, as
    llama.cpp wants its norms and biases."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim == 1 or quant == "f32":
        return w, None, False
    if quant == "q8_0" and w.shape[-1] % 32 == 0:
        return gguf.quants.quantize(w, Q.Q8_0), Q.Q8_0, False
    if quant == "bf16":
        return gguf.quants.quantize(w, Q.BF16), Q.BF16, False
    return w.astype(np.float16), None, quant == "q8_0"


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def _rope(config) -> tuple[float, float | None, dict[str, Any]]:
    """(rope base, base of the sliding layers or None, scaling) from a config; only what GGUF can express."""
    params = getattr(config, "rope_parameters", None)
    swa = None
    if not params:  # transformers 4: rope_theta, rope_scaling and (Gemma 3) rope_local_base_freq
        scaling = dict(getattr(config, "rope_scaling", None) or {})
        params = {"rope_theta": getattr(config, "rope_theta", 10000.0), **scaling,
                  "rope_type": scaling.get("rope_type", scaling.get("type", "default"))}
        swa = getattr(config, "rope_local_base_freq", None) if config.model_type == "gemma3_text" else None
    if "full_attention" in params:  # one entry per layer type (Gemma 3)
        swa = params.get("sliding_attention", {}).get("rope_theta")
        params = params["full_attention"]
    kind = params.get("rope_type", "default")
    if kind not in ("default", "linear"):
        raise GhostlayersError(
            f"rope scaling {kind!r} is not written by ghostlayers' GGUF export from a Hugging Face model: export "
            "from the model's own GGUF instead (prune --model FILE.gguf, or export --source FILE.gguf)"
        )
    return float(params["rope_theta"]), swa, ({"factor": params["factor"]} if kind == "linear" else {})


def _hparams(w, config) -> list[str]:
    """The architecture's hyperparameters from a (pruned) config; returns warnings about what llama.cpp ignores."""
    from gguf import RopeScalingType

    arch = gguf_arch(config.model_type)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    theta, theta_swa, scaling = _rope(config)
    w.add_rope_freq_base(theta)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if scaling:
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    warnings = []
    if arch == "gemma3":
        if config.sliding_window:
            w.add_sliding_window(config.sliding_window)
            w.add_sliding_window_pattern(sliding_pattern(config))
        if theta_swa is not None:
            w.add_rope_freq_base_swa(theta_swa)
        if getattr(config, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(config.final_logit_softcapping)
    else:
        window = getattr(config, "sliding_window", None)
        slides = window and (config.model_type != "qwen2" or getattr(config, "use_sliding_window", False))
        if slides and window < config.max_position_embeddings:
            warnings.append(f"llama.cpp's {arch} has no sliding window: beyond {window} tokens its attention "
                            "differs from transformers'")
    return warnings


def sliding_pattern(config) -> list[bool]:
    """Per kept layer: does it attend through the sliding window (llama.cpp's `attention.sliding_window_pattern`)."""
    return [t == "sliding_attention" for t in config.layer_types]


def _tokenizer(w, tokenizer: PreTrainedTokenizerBase, config, pre: str) -> list[str]:
    """The vocabulary, merges, special tokens and chat template from a transformers tokenizer, through gguf's vocab
    helpers (the tokenizer is saved to a temporary folder, which is what they read)."""
    import gguf

    warnings = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tokenizer.save_pretrained(folder)
        config.to_json_file(str(folder / "config.json"))
        vocab = None
        # SentencePiece first, as llama.cpp's converter does: LlamaHfVocab gives every token the score -1000,
        # which llama.cpp's SentencePiece tokenizer merges by
        for kind in (gguf.SentencePieceVocab, gguf.BpeVocab, gguf.LlamaHfVocab):
            try:
                vocab = kind(folder)
                break
            except (FileNotFoundError, TypeError, ImportError, RuntimeError, ValueError, KeyError):
                continue
        if vocab is None:
            raise GhostlayersError("cannot write this tokenizer to GGUF: gguf's vocab helpers read GPT-2 BPE, "
                                   "Llama byte-fallback BPE and SentencePiece tokenizers only")
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind)
        data = json.loads((folder / "tokenizer.json").read_text()) if (folder / "tokenizer.json").is_file() else {}
        special = {t["id"]: t.get("special", False) for t in data.get("added_tokens", [])}
        for i, is_special in special.items():  # added tokens: special ones control, the others user-defined text
            if i < len(types) and types[i] in (gguf.TokenType.NORMAL, gguf.TokenType.CONTROL):
                types[i] = gguf.TokenType.CONTROL if is_special else gguf.TokenType.USER_DEFINED
        for i in range(len(tokens), config.vocab_size):  # rows of the embedding no token uses
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        w.add_tokenizer_model(vocab.tokenizer_model)
        if vocab.tokenizer_model == "gpt2":
            w.add_tokenizer_pre(pre)
            if pre == "default":
                warnings.append("llama.cpp will pre-tokenize with its default regex: pass --gguf-pre with the name "
                                "llama.cpp gives this tokenizer (e.g. llama-bpe, qwen2, smollm) to match exactly")
        w.add_token_list(tokens)
        w.add_token_scores(scores)  # zeros for BPE; readers of some architectures (transformers' Gemma) want them
        w.add_token_types(types)
        special_vocab = gguf.SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens))
        # whether it adds BOS / EOS, as the tokenizer behaves (llama.cpp's defaults differ by pre-tokenizer)
        plain, marked = (tokenizer("a", add_special_tokens=flag)["input_ids"] for flag in (False, True))
        for kind, token_id, at in (("bos", tokenizer.bos_token_id, 0), ("eos", tokenizer.eos_token_id, -1)):
            special_vocab.add_special_token[kind] = token_id is not None and len(marked) > len(plain) and marked[at] == token_id
        # does it prefix a space to the text (SentencePiece's "▁"; never for a GPT-2 BPE)
        w.add_add_space_prefix(vocab.tokenizer_model == "llama" and
                               tokenizer.convert_ids_to_tokens(plain)[0].startswith("\u2581"))
        special_vocab.add_to_gguf(w, quiet=True)
    return warnings


def _general(w, manifest: dict[str, Any], name: str, base: dict[str, str]) -> None:
    """general.* and ghostlayers.* keys: what this file is and how it was made."""
    removed, n = manifest.get("removed_layers", []), manifest.get("num_layers_dense")
    recovery = (manifest.get("recovery") or {}).get("method")
    refit = (manifest.get("recovery") or {}).get("refit")
    selection = (manifest.get("selection") or {}).get("criterion")
    w.add_name(f"{name} ({n - len(removed)} of {n} layers)" if n else name)
    refitted = sorted({m["layer"] for m in (refit or {}).get("matrices", [])})
    w.add_description(
        f"{name} with decoder layers {', '.join(map(str, removed))} of {n} removed by ghostlayers {__version__} "
        f"(selection {selection}, recovery {recovery}"
        + (f", dense layers {', '.join(map(str, refitted))} refitted" if refitted else "") + ")"
    )
    w.add_base_model_count(1)
    w.add_base_model_name(0, base["name"])
    if base.get("organization"):
        w.add_base_model_organization(0, base["organization"])
    if base.get("repo"):
        w.add_base_model_repo_url(0, f"https://huggingface.co/{base['repo']}")
        w.add_source_repo_url(f"https://huggingface.co/{base['repo']}")
    w.add_string("ghostlayers.base_model", base["source"])  # as it was given: a path, hub id or alias
    w.add_array("ghostlayers.removed_layers", [int(i) for i in removed])
    w.add_string("ghostlayers.version", __version__)
    w.add_string("ghostlayers.manifest", json.dumps(manifest, sort_keys=True))


_REWRITTEN_KEYS = ("general.name", "general.description", "general.size_label", "general.source.url",
                   "general.source.repo_url", "general.base_model.", "general.architecture", "ghostlayers.")


def _copy_metadata(w, reader, arch: str, kept: list[int], dense: int) -> None:
    """Every key of the source GGUF but those this export rewrites; arrays with one entry per dense layer keep the
    kept layers' entries."""
    from gguf import GGUFValueType as V

    # the writer pads to its own alignment; shards are not written
    skip = (f"{arch}.block_count", f"{arch}.attention.sliding_window_pattern", "general.alignment")
    for key, f in reader.fields.items():
        if key.startswith(("GGUF.", "split.")) or key in skip or key.startswith(_REWRITTEN_KEYS):
            continue
        kind = f.types[0]
        if kind == V.ARRAY:
            if len(f.types) != 2 or not f.data:  # empty (nothing to write) or nested (not kept: no reader needs it)
                continue
            sub = f.types[-1]
            values = ([bytes(f.parts[i]) for i in f.data] if sub == V.STRING else
                      [f.parts[i].tolist()[0] for i in f.data])
            if key.startswith(f"{arch}.") and len(values) == dense:
                values = [values[i] for i in kept]
            w.add_key_value(key, values, kind, sub_type=sub)
        elif kind == V.STRING:
            w.add_key_value(key, bytes(f.parts[f.data[0]]), kind)
        else:
            w.add_key_value(key, f.parts[f.data[0]].tolist()[0], kind)


def _base_of(manifest: dict[str, Any], reader) -> dict[str, str]:
    spec = str(manifest.get("base_model") or "unknown")
    base = {"name": spec, "source": spec}
    if reader is not None:
        for key, item in (("general.name", "name"), ("general.organization", "organization")):
            if value := gguf_value(reader, key):
                base[item] = value
    elif "/" in spec and not Path(spec).expanduser().exists():
        base["repo"] = spec  # a hub id
        base["name"] = spec.rpartition("/")[2]
        base["organization"] = spec.partition("/")[0]
    return base


def save_gguf(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out: str | Path,
    manifest: dict[str, Any],
    *,
    quant: str = "f16",
    source: str | Path | None = None,
    overwrite: bool = False,
    pre: str = "default",
    progress: bool = True,
    layers: Offloaded | None = None,
) -> Written:
    """Write the pruned `model` (made as `manifest` says) to the GGUF file `out`, atomically.

    source: the dense model's .gguf, whose metadata and unchanged tensors are kept as they were; None to write
    everything from the transformers model. pre: llama.cpp's pre-tokenizer name for a GPT-2-style tokenizer
    written from a Hugging Face model (a GGUF source keeps its own).
    layers: for a layer-by-layer result, the `Offloaded` dense model whose files hold what `model` (its pruned
    shell) left on meta: each tensor is then read and encoded as the writer reaches it, one layer resident.
    """
    import gguf

    check_quant("gguf", quant)
    target = check_output_file(out, overwrite, ".gguf", protect=(source,) if source is not None else ())
    check_gguf_exportable(model, (manifest.get("recovery") or {}).get("method"))
    config = model.config
    arch = gguf_arch(config.model_type)
    kept = list(manifest.get("kept_layers") or range(config.num_hidden_layers))
    dense = int(manifest.get("num_layers_dense") or config.num_hidden_layers)
    if len(kept) != config.num_hidden_layers:
        raise GhostlayersError(f"the manifest keeps {len(kept)} layers but the model has {config.num_hidden_layers}")
    names = tensor_names(model)
    state = model.state_dict()
    get = state.__getitem__ if layers is None else _streamed(model, layers, kept)
    if layers is not None and source is not None:
        raise GhostlayersError("internal: a layer-by-layer result is written from its safetensors, not a GGUF source")
    reader = _open_source(source, arch, config, dense) if source is not None else None
    written = Written(target, quant, Path(source) if source is not None else None)

    def encoded(name: str) -> tuple[np.ndarray, Any, bool]:
        w = get(names[name]).detach().to("cpu", torch.float32).numpy()
        return encode(to_gguf(arch, name, w, config), quant)

    def new_tensor(name: str) -> tuple[Any, Any]:
        if layers is None:
            data, raw, fell_back = encoded(name)
        else:  # encoded when the writer reaches it
            data = _Deferred(tuple(state[names[name]].shape), quant, lambda: encoded(name)[0])
            raw, fell_back = data.raw, data.fell_back
        written.rewritten.append(name)
        if fell_back:
            written.fallback.append(name)
        return data, raw

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
        os.close(fd)
    except OSError as err:
        raise GhostlayersError(f"cannot write to {target.parent}: {err.strerror or err}") from None
    tmp = Path(tmp_name)
    w = None
    try:
        w = gguf.GGUFWriter(tmp, arch)
        tensors: list[tuple[str, np.ndarray, Any]] = []
        if reader is None:
            written.warnings += _hparams(w, config)
            written.warnings += _tokenizer(w, tokenizer, config, pre)
            w.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[quant]))
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            tensors = [(name, *new_tensor(name)) for name in names]
        else:
            _copy_metadata(w, reader, arch, kept, dense)
            w.add_block_count(config.num_hidden_layers)
            if arch == "gemma3" and getattr(config, "sliding_window", None):
                w.add_sliding_window_pattern(sliding_pattern(config))
            position = {old: new for new, old in enumerate(kept)}
            seen = set()
            for t in reader.tensors:
                match = _BLOCK.match(t.name)
                if match and int(match[1]) not in position:
                    continue
                name = f"blk.{position[int(match[1])]}.{match[2]}" if match else t.name
                seen.add(name)
                if name not in names or _unchanged(arch, name, t, state[names[name]], config):
                    tensors.append((name, t.data, t.tensor_type))
                    written.copied.append(name)
                else:
                    tensors.append((name, *new_tensor(name)))
            tensors += [(name, *new_tensor(name)) for name in names if name not in seen]  # e.g. an untied head
        for name, data, raw in tensors:
            w.add_tensor(name, data, raw_dtype=raw)
        base = _base_of(manifest, reader)
        _general(w, manifest, base["name"], base)
        total, *_ = w.get_total_parameter_count()
        w.add_size_label(gguf.size_label(total, 0, 0, 0))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=progress)
        w.close()
        w = None
        del reader  # its memory map of the source, before anything replaces files
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the result should look like any other file
        os.replace(tmp, target)
    except OSError as err:
        _discard(w, tmp)
        raise GhostlayersError(f"cannot write {target}: {err.strerror or err}") from None
    except (ValueError, NotImplementedError) as err:  # the writer's or the dequantiser's refusals
        _discard(w, tmp)
        raise GhostlayersError(f"cannot write {target}: {err}") from None
    except BaseException:
        _discard(w, tmp)
        raise
    return written


def _streamed(model: PreTrainedModel, source: Offloaded, kept: list[int]):
    """A getter of `model`'s tensors by state-dict name for a layer-by-layer result: a decoder layer's are read
    (with what the run replaced in it, folds applied) while `source.hold` has its dense layer resident, one layer
    cached at a time; the rest (embeddings, final norm, LM head) as `source.hold_rest` makes them."""
    ad = adapter(model)
    prefix = ad.layers_prefix + "."
    rest: dict[str, torch.Tensor] = {}
    layer: dict[str, torch.Tensor] = {}  # the tensors of one layer, the one last asked for

    def get(name: str) -> torch.Tensor:
        if not name.startswith(prefix):  # the embeddings, final norm and LM head, folded as the model's are
            if not rest:
                with source.hold_rest(model):
                    rest.update((k, v) for k, v in model.state_dict().items() if not k.startswith(prefix))
            return rest[name]
        if name not in layer:
            index = int(name[len(prefix):].split(".", 1)[0])
            layer.clear()
            with source.hold([kept[index]]):
                layer.update(ad.layers[index].state_dict(prefix=f"{prefix}{index}."))
        return layer[name]

    return get


class _Deferred:
    """A tensor the GGUF writer encodes when it writes it (`tofile`), with the shape, dtype and size it will have."""

    def __init__(self, shape: tuple[int, ...], quant: str, make):
        # encoding is row by row: one row of zeros tells the type, the row's encoded size and any fallback
        sample, self.raw, self.fell_back = encode(np.zeros((1, shape[-1]) if len(shape) > 1 else shape, np.float32),
                                                  quant)
        self.dtype = sample.dtype
        self.shape = (*shape[:-1], sample.shape[-1]) if len(shape) > 1 else sample.shape
        self.nbytes = int(np.prod(self.shape)) * sample.dtype.itemsize
        self.make = make

    def tofile(self, fout) -> None:
        data = self.make()
        if data.nbytes != self.nbytes:
            raise GhostlayersError(f"internal: a GGUF tensor encoded to {data.nbytes} bytes, {self.nbytes} planned")
        data.tofile(fout)


def _discard(writer, tmp: Path) -> None:
    """Close a writer left open by a failure and remove its temporary file."""
    if writer is not None:
        try:
            writer.close()
        except (OSError, ValueError):
            pass
    tmp.unlink(missing_ok=True)


def read_gguf(path: Path, what: str):
    """A GGUFReader of `path` (`what` names it in the one-line errors)."""
    import gguf

    if not path.is_file():
        raise GhostlayersError(f"{what} {path} does not exist")
    try:
        return gguf.GGUFReader(path)
    except (OSError, ValueError, KeyError, IndexError) as err:
        raise GhostlayersError(f"cannot read {what} {path}: {err}") from None


def gguf_value(reader, key: str) -> Any:
    """A metadata value of a GGUFReader (str, number or list), None when the key is absent."""
    return reader.fields[key].contents() if key in reader.fields else None


def _open_source(source: str | Path, arch: str, config, dense: int):
    """The dense model's GGUF, checked to be the model that was pruned (architecture, depth and width)."""
    path = Path(source).expanduser()
    reader = read_gguf(path, "GGUF source (the dense model's .gguf, --source)")
    if (gguf_value(reader, "split.count") or 1) > 1:
        raise GhostlayersError(f"GGUF source {path} is one shard of a split model: merge it first "
                               "(llama-gguf-split --merge) and pass the merged file")
    found = (gguf_value(reader, "general.architecture"), gguf_value(reader, f"{arch}.block_count"),
             gguf_value(reader, f"{arch}.embedding_length"))
    if found != (arch, dense, config.hidden_size):
        raise GhostlayersError(
            f"GGUF source {path} is a {found[0]} model with {found[1]} layers of width {found[2]}, not the dense "
            f"{arch} with {dense} layers of width {config.hidden_size} that was pruned: pass the right --source"
        )
    return reader


def _unchanged(arch: str, name: str, t, tensor: torch.Tensor, config) -> bool:
    """Is the model's `tensor` exactly what transformers reads from the source tensor `t`?"""
    import gguf

    values = to_hf(arch, name, gguf.quants.dequantize(t.data, t.tensor_type), config)
    if tuple(values.shape) != tuple(tensor.shape):
        return False
    return torch.equal(torch.from_numpy(np.array(values, dtype=np.float32)).to(tensor.dtype), tensor.detach().cpu())


def describe_gguf(path: str | Path) -> dict[str, Any]:
    """What `ghostlayers info FILE.gguf` prints (the shape of `export.describe`), from the file's metadata and tensor
    headers; the dense size is the source GGUF's file when it is still there."""
    file = Path(path).expanduser()
    reader = read_gguf(file, "GGUF file")

    def value(key: str) -> Any:  # this file's metadata
        return gguf_value(reader, key)

    arch = value("general.architecture")
    manifest = json.loads(value("ghostlayers.manifest") or "{}")
    kinds: dict[str, int] = {}
    for t in reader.tensors:
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    source = gguf_source(manifest.get("base_model"))
    return {
        "path": str(file),
        "export": "gguf" if manifest else "GGUF file, not written by ghostlayers",
        "model_type": arch,
        "base_model": manifest.get("base_model") or value("general.name"),
        "layers": {"dense": manifest.get("num_layers_dense"), "pruned": value(f"{arch}.block_count"),
                   "removed": manifest.get("removed_layers")},
        "selection": manifest.get("selection"),
        "recovery": manifest.get("recovery"),
        "operators": [],
        "calibration": manifest.get("calibration"),
        "weights_dtype": [f"{k} x{n}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])],
        "parameters": {"pruned": sum(int(t.n_elements) for t in reader.tensors), "operators": 0,
                       "dense": manifest.get("dense_parameters")},
        "size_bytes": {"folder": file.stat().st_size, "weights": file.stat().st_size,
                       "dense_weights_computed": None, "dense_file": source.stat().st_size if source else None},
        "created": manifest.get("created"),
        "versions": manifest.get("versions"),
    }
