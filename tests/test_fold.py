"""Folding a scaled rotation h ← s·h·Q into the weights: the pruned model computes exactly what the same model with
an explicit operator s·Q computes, for every architecture that allows it, tied or untied, at one or several
boundaries (the final norm included); the dense model is untouched; Gemma 3 is refused; a vanilla export of the
folded model (its LM head untied) reloads with plain transformers to the same logits."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3

from conftest import random_windows
from ghostlayers.errors import GhostlayersError
from ghostlayers.export import load, save
from ghostlayers.outputs import FOLDING_METHODS, check_format
from ghostlayers.models import adapter
from ghostlayers.surgery import ghost_modules, prune

FOLDABLE = ["llama", "llama-bias", "mistral", "qwen2", "qwen3"]  # llama-bias: o_proj and down_proj have biases
# dense layers removed -> boundaries where the rotation goes (6 layers; 6 is the final norm)
PLANS = {
    "contiguous": ([2, 3], [4]),
    "two-blocks": ([1, 4], [2, 5]),
    "final-norm": ([4, 5], [6]),
    "block-and-final": ([1, 5], [2, 6]),
}
C = 16


def tiny(family, tied=True, dtype=torch.float64, eps=1e-6, layers=6, seed=0):
    """A random model of `family`, weights scaled up so every layer changes the residual stream, norm weights random
    too (they are what the fold absorbs)."""
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=260, hidden_size=C, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
        max_position_embeddings=128, num_hidden_layers=layers, tie_word_embeddings=tied, rms_norm_eps=eps,
    )
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kw))
    elif family == "llama-bias":
        model = LlamaForCausalLM(LlamaConfig(**kw, attention_bias=True, mlp_bias=True))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**kw, sliding_window=8))
    elif family == "qwen2":  # q/k/v biases
        model = Qwen2ForCausalLM(Qwen2Config(**kw, use_sliding_window=True, sliding_window=8, max_window_layers=2))
    elif family == "qwen3":  # q_norm/k_norm after q/k_proj
        model = Qwen3ForCausalLM(Qwen3Config(**kw))
    elif family == "gemma3_text":
        model = Gemma3ForCausalLM(Gemma3TextConfig(**kw, sliding_window=8))
    else:
        raise ValueError(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
            elif name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model.to(dtype).eval()


@pytest.fixture
def exact_norms(monkeypatch):
    """RMSNorm in the input's own precision: transformers normalises in float32 even in a float64 model, which would
    cap the agreement of two float64 models whose streams differ by a rotation at ~1e-7."""

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    for module, name in [
        (modeling_llama, "LlamaRMSNorm"),
        (modeling_mistral, "MistralRMSNorm"),
        (modeling_qwen2, "Qwen2RMSNorm"),
        (modeling_qwen3, "Qwen3RMSNorm"),
    ]:
        monkeypatch.setattr(getattr(module, name), "forward", forward)


def random_rotation(seed, c=C):
    q, r = torch.linalg.qr(torch.randn(c, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # Haar-distributed; sign fix makes det ±1 at random


def plan(name, seed=0):
    removed, boundaries = PLANS[name]
    rotations = {b: random_rotation(seed + b) for b in boundaries}
    scales = {b: 0.6 + 0.3 * i for i, b in enumerate(boundaries)}
    return removed, rotations, scales


def logits(model, windows):
    with torch.no_grad():
        return model(windows).logits


def snapshot(model):
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


@pytest.mark.parametrize("plan_name", PLANS)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", FOLDABLE)
def test_folded_rotation_and_scale_equal_the_explicit_operator(family, tied, plan_name, exact_norms):
    """prune(rotations={b: Q}, scales={b: s}) == prune(operators={b: s·Q}) to float64 precision, and the dense
    model keeps every tensor and its tie."""
    model = tiny(family, tied=tied, eps=1e-30)  # the scale fold is exact up to the norm's ε; the rotation is exact
    before = snapshot(model)
    removed, rotations, scales = plan(plan_name)
    folded = prune(model, removed, rotations=rotations, scales=scales)
    explicit = prune(model, removed, operators={b: scales[b] * q for b, q in rotations.items()})
    windows = random_windows(2, 20)  # longer than the sliding window
    want = logits(explicit, windows)
    torch.testing.assert_close(logits(folded, windows), want, rtol=0, atol=1e-10 * want.abs().max().item())
    assert not ghost_modules(folded)
    assert_unchanged(model, before)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied and model.config.tie_word_embeddings == tied
    # the folded model reads its stream only through absorbed weights, writes it through rotated ones, and keeps
    # the embeddings (the dense model's own tensor) while its LM head is its own
    assert folded.model.embed_tokens.weight is model.model.embed_tokens.weight
    assert folded.lm_head.weight is not folded.model.embed_tokens.weight and not folded.config.tie_word_embeddings
    assert torch.equal(folded.model.norm.weight, torch.ones(C, dtype=torch.float64))


@pytest.mark.parametrize("family", FOLDABLE)
def test_rotation_alone_is_exact_with_the_norm_epsilon(family, exact_norms):
    """‖hQ‖ = ‖h‖, so unlike a scale a rotation folds exactly whatever the norm's ε."""
    model = tiny(family, eps=1e-2)
    removed, rotations, _ = plan("block-and-final", seed=3)
    windows = random_windows(2, 12, seed=1)
    want = logits(prune(model, removed, operators=rotations), windows)
    got = logits(prune(model, removed, rotations=rotations), windows)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10 * want.abs().max().item())


@pytest.mark.parametrize("family", FOLDABLE)
def test_float32_with_transformers_norms(family):
    """In float32 with the architectures' own norms (which normalise in float32) the fold agrees to rounding."""
    model = tiny(family, dtype=torch.float32, eps=1e-12)
    before = snapshot(model)
    removed, rotations, scales = plan("two-blocks", seed=5)
    folded = prune(model, removed, rotations=rotations, scales=scales)
    explicit = prune(model, removed, operators={b: scales[b] * q for b, q in rotations.items()})
    windows = random_windows(2, 20, seed=2)
    want = logits(explicit, windows)
    got = logits(folded, windows)
    assert got.dtype == torch.float32 and all(p.dtype == torch.float32 for p in folded.parameters())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())
    assert_unchanged(model, before)


def test_folded_weights_follow_the_formulas(exact_norms):
    """One boundary, by hand: readers W diag(w) Qᵀ, norm weights 1, writes Q W and b Qᵀ, layers before untouched."""
    model = tiny("llama-bias", layers=4)
    q = random_rotation(7)
    folded = prune(model, [1], rotations={2: q})  # pruned layer 1 is dense layer 2
    dense, new = model.model.layers, folded.model.layers
    assert new[0].self_attn.q_proj.weight is dense[0].self_attn.q_proj.weight  # before the boundary: shared
    for k_new, k_dense in ((1, 2), (2, 3)):
        d, f = dense[k_dense], new[k_new]
        w_in, w_post = d.input_layernorm.weight, d.post_attention_layernorm.weight
        torch.testing.assert_close(f.self_attn.v_proj.weight, d.self_attn.v_proj.weight * w_in @ q.T)
        torch.testing.assert_close(f.mlp.up_proj.weight, d.mlp.up_proj.weight * w_post @ q.T)
        assert f.self_attn.v_proj.bias is d.self_attn.v_proj.bias  # a reader's bias is not in the stream
        torch.testing.assert_close(f.self_attn.o_proj.weight, q @ d.self_attn.o_proj.weight)
        torch.testing.assert_close(f.mlp.down_proj.bias, d.mlp.down_proj.bias @ q.T)
        assert torch.equal(f.input_layernorm.weight, torch.ones(C, dtype=torch.float64))
    torch.testing.assert_close(folded.lm_head.weight, model.lm_head.weight * model.model.norm.weight @ q.T)


def test_untied_head_stays_untied():
    """transformers' own tie_weights (run by some of its utilities) must not tie the folded head back."""
    model = tiny("qwen3")
    removed, rotations, _ = plan("contiguous")
    folded = prune(model, removed, rotations=rotations)
    head = folded.lm_head.weight
    folded.tie_weights()
    assert folded.lm_head.weight is head and folded.model.embed_tokens.weight is model.model.embed_tokens.weight


def test_gemma3_is_refused():
    model = tiny("gemma3_text")
    assert not adapter(model).can_fold_rotations
    assert all(adapter(tiny(f, layers=2)).can_fold_rotations for f in FOLDABLE)
    before = snapshot(model)
    with pytest.raises(GhostlayersError, match=r"gemma3_text cannot take.*use another recovery") as err:
        prune(model, [2, 3], rotations={4: random_rotation(0)}, scales={4: 0.5})
    assert "\n" not in str(err.value)
    assert_unchanged(model, before)
    prune(model, [2, 3], scales={4: 0.5})  # the scale alone still folds


def test_bad_rotations_are_refused():
    model = tiny("llama")
    with pytest.raises(GhostlayersError, match="not orthogonal"):
        prune(model, [2, 3], rotations={4: 1.5 * random_rotation(0)})
    with pytest.raises(GhostlayersError, match="shape"):
        prune(model, [2, 3], rotations={4: torch.eye(8, dtype=torch.float64)})
    with pytest.raises(GhostlayersError, match="removed layer 3"):
        prune(model, [2, 3], rotations={3: random_rotation(0)})
    with pytest.raises(GhostlayersError, match="rotations cannot precede operators"):
        prune(model, [1, 4], operators={5: torch.eye(C, dtype=torch.float64)}, rotations={2: random_rotation(0)})
    # an operator before the first rotation is fine: it sees the stream as it is
    prune(model, [1, 4], operators={2: torch.eye(C, dtype=torch.float64)}, rotations={5: random_rotation(0)})


def test_procrustes_saves_vanilla():
    assert "procrustes" in FOLDING_METHODS
    check_format("vanilla", False, "recovery 'procrustes'")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_vanilla_export_of_a_tied_model_reloads_with_plain_transformers(family, tmp_path, tokenizer):
    model = tiny(family, tied=True, dtype=torch.float32)
    removed, rotations, scales = plan("block-and-final", seed=11)
    folded = prune(model, removed, rotations=rotations, scales=scales)
    manifest = {"recovery": {"method": "procrustes"}, "kept_layers": [i for i in range(6) if i not in removed]}
    out = save(folded, tokenizer, tmp_path / "vanilla", manifest, format="vanilla")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["model_type"] == family
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(f.keys())
    plain = AutoModelForCausalLM.from_pretrained(out)  # no remote code, no ghostlayers
    assert type(plain) is type(folded) and not ghost_modules(plain)
    assert plain.lm_head.weight is not plain.model.embed_tokens.weight
    windows = random_windows(2, 16, seed=4)
    want = logits(folded, windows)
    torch.testing.assert_close(logits(plain, windows), want, rtol=0, atol=0)
    torch.testing.assert_close(logits(load(out)[0], windows), want, rtol=0, atol=0)
    explicit = prune(model, removed, operators={b: scales[b] * q for b, q in rotations.items()})
    torch.testing.assert_close(logits(plain, windows), logits(explicit, windows), rtol=0, atol=1e-4 * want.abs().max().item())
