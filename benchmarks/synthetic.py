"""Synthetic Llama checkpoints of real shapes, for measuring memory and time at sizes that cannot be downloaded here.

    python benchmarks/synthetic.py --shape 8b --out /work/scale/llama3-8b-shape

writes a Hugging Face folder (config.json, bf16 safetensors shards of at most 5 GB with their index, and the bundled
SmolLM2 tokenizer, whose 49 152 ids all fall inside the embedding) whose weights are random but scaled like a
trained model's: projections and embeddings N(0, 0.02²) (the initializer range Llama's config states), the
residual writes (o_proj, down_proj) N(0, (0.02 / √(2L))²) as GPT-2-style initialisations scale them so the stream
grows as in a trained model, norm weights 1. Each tensor's values come from its own seeded generator, so the same
command writes the same files. Nothing about quality can be read from such a model; it measures memory, time and
bytes, and whether both modes of the tool write the same tensors.
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path

import torch

SHAPES = {  # Llama-3-8B and Llama-3.2-1B, as their config.json files give them
    "8b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
               max_position_embeddings=8192),
    "1b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
               max_position_embeddings=8192),
    "small": dict(num_hidden_layers=8, hidden_size=256, intermediate_size=768, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=49152, tie_word_embeddings=True, rope_theta=10000.0,
                  max_position_embeddings=2048),
}
SHARD_BYTES = 5 * 1024**3


def config(shape: str):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, dtype="bfloat16")


def tensors(cfg) -> list[tuple[str, tuple[int, ...], float]]:
    """(name, shape, std) of every tensor, in the order transformers names them; std 0 means a norm (ones)."""
    c, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = c // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    write = 0.02 / (2 * L) ** 0.5
    out = [("model.embed_tokens.weight", (cfg.vocab_size, c), 0.02)]
    for layer in range(L):
        p = f"model.layers.{layer}."
        out += [(p + "input_layernorm.weight", (c,), 0.0), (p + "self_attn.q_proj.weight", (q, c), 0.02),
                (p + "self_attn.k_proj.weight", (kv, c), 0.02), (p + "self_attn.v_proj.weight", (kv, c), 0.02),
                (p + "self_attn.o_proj.weight", (c, q), write), (p + "post_attention_layernorm.weight", (c,), 0.0),
                (p + "mlp.gate_proj.weight", (i, c), 0.02), (p + "mlp.up_proj.weight", (i, c), 0.02),
                (p + "mlp.down_proj.weight", (c, i), write)]
    out.append(("model.norm.weight", (c,), 0.0))
    if not cfg.tie_word_embeddings:
        out.append(("lm_head.weight", (cfg.vocab_size, c), 0.02))
    return out


def make(name: str, shape: tuple[int, ...], std: float) -> torch.Tensor:
    if std == 0.0:
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    out = torch.empty(shape, dtype=torch.bfloat16)
    rows = max(1, (64 * 1024**2) // (4 * shape[-1]))  # float32 draws a block of rows at a time
    for start in range(0, shape[0], rows):
        block = torch.randn((min(rows, shape[0] - start), *shape[1:]), generator=g) * std
        out[start : start + len(block)] = block.to(torch.bfloat16)
    return out


def write(shape: str, out: Path) -> Path:
    from safetensors.torch import save_file

    from ghostlayers.models import load_model

    cfg = config(shape)
    if (out / "model.safetensors.index.json").is_file():
        print(f"{out} exists: keeping it", file=sys.stderr)
        return out
    out.mkdir(parents=True, exist_ok=True)
    specs = tensors(cfg)
    groups: list[list[tuple[str, tuple[int, ...], float]]] = [[]]
    size = 0
    for spec in specs:
        nbytes = 2 * int(torch.Size(spec[1]).numel())
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += nbytes
    weight_map, total = {}, 0
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {name: make(name, shp, std) for name, shp, std in group}
        save_file(shard, str(out / file), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in shard.values())
        weight_map.update({name: file for name in shard})
        print(f"wrote {file} ({sum(t.numel() for t in shard.values()) / 1e9:.2f}B parameters)", file=sys.stderr)
        del shard
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.to_json_file(str(out / "config.json"))
    _, tokenizer = load_model("smollm2-135m", "float32")  # the bundled tokenizer (its ids < every vocab here)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="8b")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    write(args.shape, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
