"""GGUF export (issue 15): tiny models of every family written as GGUF and read back by transformers give the vanilla
export's logits (equal in f32, within stated bounds in f16/bf16/q8_0); from a GGUF source, metadata and unchanged
tensors are kept byte for byte; what a GGUF cannot hold is refused in one line; llama.cpp itself (when
llama-cpp-python is installed) runs the files with transformers' logits and greedy continuations."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf

from conftest import VOCAB, random_windows
from ghostlayers import load, save
from ghostlayers.capture import capture
from ghostlayers.cli import main
from ghostlayers.errors import GhostlayersError
from ghostlayers.gguf_export import save_gguf, sliding_pattern, tensor_names
from ghostlayers.hadamard import hadamard
from ghostlayers.models import load_model
from ghostlayers.pipeline import recover
from ghostlayers.plan import make_plan
from ghostlayers.recovery import spec_for

gguf = pytest.importorskip("gguf")

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]
FOLDING = ["none", "prunecomp", "replaceme", "procrustes"]
REMOVED = [2, 3]
KEPT = [0, 1, 4, 5]
HIDDEN = 32  # rows of 32 so that q8_0 applies (its blocks are 32 wide)
# relative Frobenius error of the logits read back, against the vanilla export's (measured: at most 3.2e-3, 1.8e-2,
# 6.2e-2 over these families and methods)
TOLERANCE = {"f32": 0.0, "f16": 1e-2, "bf16": 5e-2, "q8_0": 1.2e-1}
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed: `make gguf-check` "
                                     "builds it from source and runs these tests")


def gguf_model(family: str, layers: int = 6, tied: bool = True, seed: int = 0) -> tf.PreTrainedModel:
    """A float32 random model of `family` in a shape transformers' GGUF reader and llama.cpp both read as it is:
    Qwen3 with the head_dim transformers assumes for a Qwen3 GGUF (128), Gemma 3 with head_dim = query_pre_attn_scalar
    (the scale llama.cpp uses), and norms away from their neutral value so that a layout slip shows."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, max_position_embeddings=128, num_hidden_layers=layers, tie_word_embeddings=tied)
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**kw))
    elif family == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**kw, sliding_window=None))
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**kw))
    elif family == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**{**kw, "head_dim": 128}))
    elif family == "gemma3_text":
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**{**kw, "head_dim": 256}, query_pre_attn_scalar=256,
                                                         sliding_window=8, layer_types=types))
    else:
        raise ValueError(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
            elif "norm" in name:
                p.normal_(0.0 if family == "gemma3_text" else 1.0, 0.2)
            else:
                p.normal_(0, 0.1)  # biases
    return model.float().eval()


def merge_tokenizer() -> tf.PreTrainedTokenizerFast:
    """A byte-level BPE with three merges (llama.cpp refuses a GPT-2 vocabulary without merges) and an <eos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("t", "h"), ("th", "e"), ("Ġ", "th")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="module")
def tokenizer():
    return merge_tokenizer()


def manifest(removed=REMOVED, method="none", layers=6) -> dict:
    return {"base_model": "tiny", "removed_layers": list(removed), "num_layers_dense": layers,
            "kept_layers": [i for i in range(layers) if i not in removed], "recovery": {"method": method},
            "selection": {"criterion": "manual"}}


_PRUNED: dict = {}


def pruned(family: str, method: str, tied: bool = True) -> tf.PreTrainedModel:
    """The tiny model with layers 2, 3 removed and `method` fitted on random windows and folded."""
    key = (family, method, tied)
    if key not in _PRUNED:
        model = gguf_model(family, tied=tied)
        plan = make_plan(6, REMOVED)
        stats = capture(model, random_windows(4, 20), spec_for((method,), plan), progress=False,
                        rotation=hadamard(HIDDEN))
        _PRUNED[key] = recover(model, stats, plan, method)[0]
    return _PRUNED[key]


def logits(model, windows) -> torch.Tensor:
    with torch.no_grad():
        return model(windows).logits


def cases():
    return [(f, m) for f in FAMILIES for m in FOLDING if not (f == "gemma3_text" and m in ("replaceme", "procrustes"))]


@pytest.mark.parametrize("family,method", cases())
def test_f32_gguf_reads_back_as_the_vanilla_export(family, method, tmp_path, tokenizer):
    model = pruned(family, method)
    vanilla = save(model, tokenizer, tmp_path / "vanilla", manifest(method=method), format="vanilla")
    written = save_gguf(model, tokenizer, tmp_path / "m.gguf", manifest(method=method), quant="f32", progress=False)
    assert written.source is None and not written.copied and len(written.rewritten) == len(tensor_names(model))
    windows = random_windows(2, 16, seed=1)  # 16 tokens: past Gemma 3's sliding window of 8
    want = logits(load(vanilla)[0], windows)
    ours, tok = load_model(str(tmp_path / "m.gguf"))
    assert ours.config.num_hidden_layers == 4
    torch.testing.assert_close(logits(ours, windows), want, rtol=0, atol=0)
    assert tok("the them").input_ids == tokenizer("the them").input_ids
    plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    if family == "gemma3_text":
        # transformers' GGUF reader ignores the per-layer attention pattern (llama.cpp reads it: see the llama.cpp
        # test) and gives every kept layer the dense model's pattern by index; ghostlayers.load_model restores it
        assert ours.config.layer_types == sliding_pattern_names(model) != plain.config.layer_types
    else:
        torch.testing.assert_close(logits(plain, windows), want, rtol=0, atol=0)
    if method == "procrustes":  # the fold unties the head: the GGUF carries output.weight
        assert "output.weight" in {t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}


def sliding_pattern_names(model) -> list[str]:
    return ["sliding_attention" if s else "full_attention" for s in sliding_pattern(model.config)]


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0"])
@pytest.mark.parametrize("family", FAMILIES)
def test_quantised_gguf_is_within_its_tolerance(family, quant, tmp_path, tokenizer):
    model = pruned(family, "prunecomp")
    written = save_gguf(model, tokenizer, tmp_path / "m.gguf", manifest(method="prunecomp"), quant=quant, progress=False)
    assert not written.fallback  # every row here is a multiple of 32
    windows = random_windows(2, 16, seed=1)
    want = logits(model, windows)
    got = logits(load_model(str(tmp_path / "m.gguf"))[0], windows)
    error = ((got - want).norm() / want.norm()).item()
    assert 0 < error < TOLERANCE[quant], error
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert all(kind == "F32" for name, kind in kinds.items() if "norm" in name or name.endswith(".bias"))
    assert {kind for name, kind in kinds.items() if name.endswith("ffn_down.weight")} == {quant.upper()}


def test_q8_0_falls_back_to_f16_for_rows_it_cannot_block(tmp_path, tokenizer):
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                               num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2))
    written = save_gguf(model.eval(), tokenizer, tmp_path / "m.gguf", manifest([], layers=2), quant="q8_0",
                        progress=False)
    assert written.fallback == ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]  # rows of 48
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert kinds["blk.0.ffn_down.weight"] == "F16" and kinds["blk.0.ffn_up.weight"] == "Q8_0"


def _dense_source(family: str, path: Path, tokenizer, quant: str = "q8_0") -> Path:
    """A dense tiny model written as a GGUF (the source a user would prune), with a key of our own and a per-layer
    array, to see that both survive."""
    model = gguf_model(family)
    w = save_gguf(model, tokenizer, path, manifest([]), quant=quant, progress=False)
    reader = gguf.GGUFReader(w.path)
    writer = gguf.GGUFWriter(path.with_suffix(".tmp"), reader.fields["general.architecture"].contents())
    for key, f in reader.fields.items():
        if not key.startswith(("GGUF.", "general.architecture")):
            sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    writer.add_string("test.untouched", "kept as it was")
    writer.add_array(f"{reader.fields['general.architecture'].contents()}.test_per_layer", list(range(10, 16)))
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    path.with_suffix(".tmp").replace(path)
    return path


@pytest.mark.parametrize("family,method,changed", [
    ("llama", "none", set()),
    ("llama", "replaceme", {"blk.1.ffn_down.weight"}),  # ReplaceMe folds into the MLP before the block
    ("qwen2", "prunecomp", None),  # its scales touch several residual writes: whatever differs is rewritten
    ("llama", "procrustes", None),  # rotations fold into most weights and untie the head: output.weight is new
    ("gemma3_text", "none", set()),
])
def test_gguf_source_keeps_metadata_and_unchanged_tensors(family, method, changed, tmp_path, tokenizer):
    source = _dense_source(family, tmp_path / "dense.gguf", tokenizer)
    dense, tok = load_model(str(source))
    plan = make_plan(6, REMOVED)
    stats = capture(dense, random_windows(4, 20), spec_for((method,), plan), progress=False,
                    rotation=hadamard(HIDDEN))
    model = recover(dense, stats, plan, method)[0]
    written = save_gguf(model, tok, tmp_path / "pruned.gguf", manifest(method=method), quant="f32", source=source,
                        progress=False)
    src, out = gguf.GGUFReader(source), gguf.GGUFReader(written.path)
    arch = src.fields["general.architecture"].contents()
    assert out.fields[f"{arch}.block_count"].contents() == 4
    assert out.fields["test.untouched"].contents() == "kept as it was"
    assert out.fields[f"{arch}.test_per_layer"].contents() == [10 + i for i in KEPT]
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.pre"):
        assert out.fields[key].contents() == src.fields[key].contents()
    assert out.fields["ghostlayers.removed_layers"].contents() == REMOVED
    assert json.loads(out.fields["ghostlayers.manifest"].contents())["recovery"]["method"] == method
    if family == "gemma3_text":
        assert out.fields["gemma3.attention.sliding_window_pattern"].contents() == [i % 2 == 0 for i in KEPT]
    old = {t.name: t for t in src.tensors}
    renamed = {f"blk.{new}.": f"blk.{k}." for new, k in enumerate(KEPT)}
    for t in out.tensors:
        prefix = t.name[: t.name.index(".", 4) + 1] if t.name.startswith("blk.") else ""
        before = old.get(t.name.replace(prefix, renamed[prefix], 1) if prefix else t.name)
        if before is None:  # not in the dense file: the untied head of a Procrustes fold
            assert method == "procrustes" and t.name == "output.weight" and t.name in written.rewritten
        elif t.name in written.copied:
            assert t.tensor_type == before.tensor_type and bytes(t.data) == bytes(before.data)
        else:
            assert t.name in written.rewritten and t.tensor_type.name == "F32"
    assert len(written.copied) + len(written.rewritten) == len(out.tensors)
    if changed is not None:
        assert set(written.rewritten) == changed
    elif method == "prunecomp":
        assert written.rewritten and all("attn_output" in n or "ffn_down" in n or "token_embd" in n
                                         for n in written.rewritten)
    windows = random_windows(2, 16, seed=1)
    torch.testing.assert_close(logits(load_model(str(written.path))[0], windows), logits(model, windows),
                               rtol=0, atol=0)


def test_source_of_another_model_is_refused(tmp_path, tokenizer):
    source = save_gguf(gguf_model("llama", layers=4), tokenizer, tmp_path / "other.gguf", manifest([], layers=4),
                       quant="f32", progress=False).path
    with pytest.raises(GhostlayersError, match="with 4 layers of width 32, not the dense llama with 6"):
        save_gguf(pruned("llama", "none"), tokenizer, tmp_path / "m.gguf", manifest(), source=source)
    assert not (tmp_path / "m.gguf").exists()


def test_missing_or_unreadable_gguf_is_one_line(tmp_path, tokenizer, capsys):
    with pytest.raises(GhostlayersError, match="GGUF source .* does not exist"):
        save_gguf(pruned("llama", "none"), tokenizer, tmp_path / "m.gguf", manifest(), source=tmp_path / "no.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(GhostlayersError, match="cannot read GGUF source"):
        save_gguf(pruned("llama", "none"), tokenizer, tmp_path / "m.gguf", manifest(), source=tmp_path / "junk.gguf")
    assert main(["info", str(tmp_path / "junk.gguf")]) == 2
    assert "cannot read GGUF file" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()


def test_refusals_name_the_fix(tmp_path, tokenizer):
    from ghostlayers.surgery import prune

    ghost = prune(gguf_model("llama"), REMOVED, {4: torch.eye(HIDDEN, dtype=torch.float64)})
    with pytest.raises(GhostlayersError, match="cannot hold: --format gguf works for none, prunecomp, replaceme, "
                                               "procrustes"):
        save_gguf(ghost, tokenizer, tmp_path / "m.gguf", manifest(method="ghost"))
    gemma = gguf_model("gemma3_text")
    gemma.config.query_pre_attn_scalar = 64
    with pytest.raises(GhostlayersError, match="llama.cpp would scale this Gemma 3's attention by 256"):
        save_gguf(gemma, tokenizer, tmp_path / "m.gguf", manifest([]))
    smol = tf.SmolLM3ForCausalLM(tf.SmolLM3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                  num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                                                  pad_token_id=0, bos_token_id=1, eos_token_id=2))
    with pytest.raises(GhostlayersError, match="GGUF export supports gemma3_text, llama, mistral, qwen2, qwen3"):
        save_gguf(smol, tokenizer, tmp_path / "m.gguf", manifest([], layers=2))
    with pytest.raises(GhostlayersError, match="should end in .gguf"):
        save_gguf(pruned("llama", "none"), tokenizer, tmp_path / "m.bin", manifest())
    (tmp_path / "m.gguf").write_bytes(b"old")
    with pytest.raises(GhostlayersError, match="already exists: pass --overwrite"):
        save_gguf(pruned("llama", "none"), tokenizer, tmp_path / "m.gguf", manifest())
    with pytest.raises(GhostlayersError, match="unknown --quant 'q4_0'"):
        save_gguf(pruned("llama", "none"), tokenizer, tmp_path / "n.gguf", manifest(), quant="q4_0")
    assert (tmp_path / "m.gguf").read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_the_source_is_never_overwritten_and_rope_is_checked_first(tmp_path, tokenizer):
    from ghostlayers.gguf_export import check_gguf_config

    source = _dense_source("llama", tmp_path / "dense.gguf", tokenizer)
    before = source.read_bytes()
    dense, tok = load_model(str(source))
    from ghostlayers.surgery import prune

    with pytest.raises(GhostlayersError, match="it is the input model"):
        save_gguf(prune(dense, REMOVED, {}), tok, source, manifest(), source=source, overwrite=True)
    assert source.read_bytes() == before
    config = tf.LlamaConfig(num_hidden_layers=4, rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    with pytest.raises(GhostlayersError, match="rope scaling 'llama3' is not written"):
        check_gguf_config(config, 2)
    check_gguf_config(config, 2, from_hf=False)  # a GGUF source keeps its own rope settings


def test_interrupted_write_leaves_nothing_and_keeps_the_old_file(tmp_path, tokenizer, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"old")

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_gguf(pruned("llama", "none"), tokenizer, tmp_path / "m.gguf", manifest(), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"] and (tmp_path / "m.gguf").read_bytes() == b"old"


def test_metadata_says_how_it_was_made(tmp_path, tokenizer):
    model = pruned("llama", "replaceme")
    info = manifest(method="replaceme") | {"base_model": "org/tiny-llama"}
    out = gguf.GGUFReader(save_gguf(model, tokenizer, tmp_path / "m.gguf", info, progress=False).path)
    field = lambda key: out.fields[key].contents()  # noqa: E731
    assert field("general.name") == "tiny-llama (4 of 6 layers)"
    assert "layers 2, 3 of 6 removed" in field("general.description") and "recovery replaceme" in field("general.description")
    assert field("general.base_model.0.name") == "tiny-llama" and field("general.base_model.0.organization") == "org"
    assert field("general.base_model.0.repo_url") == "https://huggingface.co/org/tiny-llama"
    assert field("ghostlayers.removed_layers") == REMOVED
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.merges") == ["t h", "th e", "Ġ th"]
    eos = tokenizer.convert_tokens_to_ids("<eos>")
    assert field("tokenizer.ggml.eos_token_id") == eos and field("tokenizer.ggml.token_type")[eos] == 3  # CONTROL


def test_cli_prune_and_export_write_gguf(capsys, tmp_path, tokenizer):
    folder = tmp_path / "dense"
    gguf_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    text = tmp_path / "prose.txt"
    from conftest import PROSE

    text.write_text(PROSE * 30)
    common = ["prune", "--model", folder, "--drop", 2, "--recover", "none", "--calib", text, "--calib-samples", 8,
              "--seq-len", 32, "--quiet"]  # none with the default refit of the two layers after the boundary
    assert main([str(a) for a in common + ["--format", "vanilla", "--out", tmp_path / "vanilla"]]) == 0
    assert main([str(a) for a in common + ["--format", "gguf", "--quant", "f32", "--out", tmp_path / "p.gguf"]]) == 0
    windows = random_windows(2, 16, seed=1)
    want = logits(load(tmp_path / "vanilla")[0], windows)
    torch.testing.assert_close(logits(load_model(str(tmp_path / "p.gguf"))[0], windows), want, rtol=0, atol=0)
    code = main(["export", str(tmp_path / "vanilla"), "--format", "gguf", "--quant", "f32", "--out",
                 str(tmp_path / "e.gguf")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "tensors at f32" in err and "warning: llama.cpp will pre-tokenize with its default regex" in err
    torch.testing.assert_close(logits(load_model(str(tmp_path / "e.gguf"))[0], windows), want, rtol=0, atol=0)
    assert main(["export", str(tmp_path / "vanilla"), "--format", "exact", "--quant", "q8_0", "--out",
                 str(tmp_path / "x")]) == 2
    assert "--quant is for --format gguf" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "p.gguf")]) == 0
    out = capsys.readouterr().out
    assert "gguf export, model_type llama" in out and "layers:      4 of 6; removed" in out and "F32 x38" in out
    from ghostlayers.surgery import prune

    save(prune(gguf_model("llama"), REMOVED, {4: torch.eye(HIDDEN)}), tokenizer, tmp_path / "ghosted",
         manifest(method="ghost"))
    assert main(["export", str(tmp_path / "ghosted"), "--format", "gguf", "--out", str(tmp_path / "g.gguf")]) == 2
    assert "recovery 'ghost' keeps operators as modules, which a GGUF cannot hold" in capsys.readouterr().err


# --- llama.cpp itself (llama-cpp-python) ---------------------------------------------------------------------


def llama_cpp_logits(path: Path, tokens: list[int]) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2, seed=0)
    llm.eval(tokens)
    scores = np.array(llm.scores[: len(tokens)])
    llm.close()
    return scores


def llama_cpp_greedy(path: Path, tokens: list[int], n: int) -> list[int]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=64, verbose=False, n_threads=2, seed=0)
    out: list[int] = []
    for token in llm.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0):
        out.append(token)
        if len(out) == n:
            break
    llm.close()
    return out


def greedy(model, tokens: list[int], n: int) -> list[int]:
    """transformers' greedy continuation by plain argmax over full forwards (no generation config in the way)."""
    ids = list(tokens)
    for _ in range(n):
        ids.append(int(logits(model, torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(tokens):]


@needs_llama_cpp
@pytest.mark.parametrize("quant", ["f32", "q8_0"])
@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_runs_the_file_as_transformers_does(family, quant, tmp_path, tokenizer):
    """llama.cpp's logits on 20 tokens (past Gemma 3's window of 8, so its per-layer pattern counts) against
    transformers' on the same file, and their greedy continuations of 12 tokens."""
    model = pruned(family, "prunecomp")
    path = save_gguf(model, tokenizer, tmp_path / "m.gguf", manifest(method="prunecomp"), quant=quant,
                     progress=False).path
    tokens = random_windows(1, 20, seed=3)[0].tolist()
    ours = load_model(str(path))[0]
    want = logits(ours, torch.tensor([tokens]))[0].numpy()
    got = llama_cpp_logits(path, tokens)
    error = np.linalg.norm(got - want) / np.linalg.norm(want)
    # llama.cpp keeps its KV cache in f16, and multiplies q8_0 weights with activations quantised to 8 bits
    assert error < (5e-3 if quant == "f32" else 1e-1), error
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8  # a random model's top logits are close
    if quant == "f32":
        assert llama_cpp_greedy(path, tokens, 8) == greedy(ours, tokens, 8)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [True, False])
def test_layer_by_layer_writes_the_in_memory_gguf_byte_for_byte(family, tied, tmp_path, tokenizer):
    """none, prunecomp and procrustes, each with the default refit, pruned layer by layer and in memory: the same
    .gguf file (each tensor read from the dense files, folded and encoded as the writer reaches it), at f32 and
    q8_0."""
    import ghostlayers
    from ghostlayers.offload import Offloaded
    from ghostlayers.select import Selection

    model = gguf_model(family, tied=tied)
    model.save_pretrained(tmp_path / "dense", max_shard_size="40KB")
    windows = random_windows(4, 20)
    for recover in ("none", "prunecomp") + (("procrustes",) if family != "gemma3_text" else ()):
        spec = ghostlayers.PruneSpec(Selection("manual", 2, REMOVED), recover, progress=False)
        memory = ghostlayers.prune(model, windows, spec)
        layered = ghostlayers.prune(Offloaded(tmp_path / "dense"), windows, spec)
        assert len(layered.refits) == 4
        layered.manifest["created"] = memory.manifest["created"]  # the one thing that may differ: when it was made
        for quant in ("f32", "q8_0"):
            a = memory.save_gguf(tmp_path / f"m-{recover}-{quant}.gguf", tokenizer, quant, progress=False)
            b = layered.save_gguf(tmp_path / f"l-{recover}-{quant}.gguf", tokenizer, quant, progress=False)
            assert (a.rewritten, a.fallback) == (b.rewritten, b.fallback)
            assert a.path.read_bytes() == b.path.read_bytes(), (recover, quant)
