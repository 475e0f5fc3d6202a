"""Tiny random models and a byte-level tokenizer, built in the test process (no download)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]
VOCAB = 260  # 256 bytes + specials of the test tokenizer

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    intermediate_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=4,
    max_position_embeddings=128,
)


def tiny_model(family: str = "llama", layers: int = 6, seed: int = 0, dtype=torch.float64, tied: bool = True):
    """A random model of `family` with a sliding window short enough that the tests exercise it."""
    torch.manual_seed(seed)
    kwargs = dict(_COMMON, num_hidden_layers=layers, tie_word_embeddings=tied)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**kwargs, sliding_window=8))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kwargs, use_sliding_window=True, sliding_window=8, max_window_layers=2))
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**kwargs))
    elif family == "gemma3_text":
        # every other layer slides, so dropping layers must keep each survivor's own attention type
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        model = Gemma3ForCausalLM(Gemma3TextConfig(**kwargs, sliding_window=8, layer_types=types))
    elif family == "smollm3":  # not in FAMILIES: the worked example of docs/design.md, tested on its own
        model = SmolLM3ForCausalLM(SmolLM3Config(**kwargs, no_rope_layers=[int(i % 3 != 2) for i in range(layers)],
                                                 pad_token_id=0, bos_token_id=1, eos_token_id=2))
    else:
        raise ValueError(family)
    # random init is tiny; scale weights up so layers change the residual stream noticeably
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model = model.to(dtype).eval()
    for name, b in buffers.items():  # like from_pretrained: rotary buffers stay in their own (float32) precision
        if dtype != torch.float64:
            module, _, key = name.rpartition(".")
            model.get_submodule(module)._buffers[key] = b
    return model


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per UTF-8 byte) with an <eos>, needing no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def random_windows(n: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, length), generator=g)


def random_parts(kind: str, seed: int = 0, c: int = 16, r: int = 4) -> dict[str, torch.Tensor]:
    """Operator parts (float64) of `kind`: "dense", "diagonal" or "low-rank", with "+bias" for an affine one."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, s=0.1: s * torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    linear, _, bias = kind.partition("+")
    if linear == "dense":
        parts = {"weight": torch.eye(c, dtype=torch.float64) + rnd(c, c)}
    elif linear == "diagonal":
        parts = {"weight": 1 + rnd(c)}
    elif linear == "low-rank":
        parts = {"down": rnd(c, r, s=0.4), "up": rnd(r, c, s=0.4)}
    else:
        raise ValueError(kind)
    if bias:
        parts["bias"] = rnd(c, s=0.3)
    return parts


def dense_operator(h: torch.Tensor, parts) -> torch.Tensor:
    """The operator `parts` applied to h by plain dense math in float64: h @ W + b with W = weight (diag(weight)
    for a vector) or I + down @ up, cast back to h's dtype."""
    parts = {"weight": parts} if isinstance(parts, torch.Tensor) else parts
    c = h.shape[-1]
    if "weight" in parts:
        w = parts["weight"].double()
        w = torch.diag(w) if w.dim() == 1 else w
    else:
        w = torch.eye(c, dtype=torch.float64) + parts["down"].double() @ parts["up"].double()
    out = h.double() @ w
    if "bias" in parts:
        out = out + parts["bias"].double()
    return out.to(h.dtype)


def skipped_logits(model, windows, removed, operators):
    """Reference: the dense model with removed layers turned into identities (forward hooks returning their input)
    and each operator (a weight, or a parts mapping: see `dense_operator`) applied to its boundary's input by a
    pre-hook."""
    handles = []
    for i in removed:
        handles.append(model.model.layers[i].register_forward_hook(lambda m, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True))
    n = len(model.model.layers)
    for b, w in operators.items():
        module = model.model.norm if b == n else model.model.layers[b]

        def pre(m, args, kwargs, w=w):
            apply = (lambda h: h @ w.to(h.dtype)) if isinstance(w, torch.Tensor) else (lambda h: dense_operator(h, w))
            if args:
                return (apply(args[0]), *args[1:]), kwargs
            kwargs["hidden_states"] = apply(kwargs["hidden_states"])
            return args, kwargs

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            return model(windows).logits
    finally:
        for h in handles:
            h.remove()


def saved_tiny_llama(tmp_path_factory):
    """A 6-layer float32 tiny Llama saved with the byte tokenizer in a folder, and PROSE × 30 beside it in
    prose.txt (for command-line tests)."""
    path = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_model("llama", layers=6, dtype=torch.float32).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    (path.parent / "prose.txt").write_text(PROSE * 30)
    return path


@pytest.fixture
def tokenizer():
    return byte_tokenizer()


PROSE = (
    "The river rose through the night and by morning the lower town was under water. "
    "Farmers moved their animals to the ridge while the council opened the school as a shelter. "
    "Engineers said the levee had held for forty years but the rain this spring was unlike any on record. "
)
