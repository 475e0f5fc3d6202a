"""Surgery: configs stay consistent, the pruned model computes what skipping the layers computes, generation with a
KV cache agrees with generation without, and save -> load restores the same logits."""

import pytest
import torch

from conftest import FAMILIES, dense_operator, random_parts, random_windows, skipped_logits, tiny_model
from ghostlayers.errors import GhostlayersError
from ghostlayers.runtime import GhostOperator, attach_ghost
from ghostlayers.surgery import ghost_modules, install_ghost, prune


def random_operator(seed=0, c=16):
    g = torch.Generator().manual_seed(seed)
    return torch.eye(c, dtype=torch.float64) + 0.1 * torch.randn(c, c, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_and_layer_idx_consistent(family):
    model = tiny_model(family, layers=6)
    dense_types = getattr(model.config, "layer_types", None)
    pruned = prune(model, [1, 2, 4], {3: random_operator(), 5: random_operator(1)})
    assert pruned.config.num_hidden_layers == 3 == len(pruned.model.layers)
    for k, layer in enumerate(pruned.model.layers):
        assert layer.self_attn.layer_idx == k
    if dense_types is not None:
        assert pruned.config.layer_types == [dense_types[i] for i in (0, 3, 5)]
        for k, layer in enumerate(pruned.model.layers):
            if hasattr(layer, "attention_type"):
                assert layer.attention_type == pruned.config.layer_types[k]
    assert sorted(ghost_modules(pruned)) == ["model.layers.1", "model.layers.2"]
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6  # dense untouched


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("removed,boundaries", [([2, 3], [4]), ([1, 2, 4], [3, 5]), ([4, 5], [6])])
def test_pruned_model_equals_dense_with_layers_skipped(family, removed, boundaries):
    model = tiny_model(family, layers=6)
    windows = random_windows(2, 24)  # longer than the sliding window
    operators = {b: random_operator(b) for b in boundaries}
    pruned = prune(model, removed, operators)
    with torch.no_grad():
        got = pruned(windows).logits
    torch.testing.assert_close(got, skipped_logits(model, windows, removed, operators))


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_with_and_without_cache_agree(family):
    model = tiny_model(family, layers=6)
    pruned = prune(model, [1, 2], {3: random_operator()})
    prompt = random_windows(1, 5)
    kwargs = dict(max_new_tokens=14, do_sample=False, pad_token_id=0)  # runs past the sliding window
    with_cache = pruned.generate(prompt, use_cache=True, **kwargs)
    without = pruned.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)
    assert with_cache.shape[1] == 19


def test_prune_rejects_bad_plans():
    model = tiny_model("llama", layers=4)
    with pytest.raises(GhostlayersError):
        prune(model, [0, 1, 2, 3])
    with pytest.raises(GhostlayersError):
        prune(model, [7])
    pruned = prune(model, [1])
    torch.testing.assert_close(
        pruned(random_windows(1, 6)).logits, skipped_logits(model, random_windows(1, 6), [1], {})
    )


KINDS = ["dense", "diagonal", "dense+bias", "diagonal+bias", "low-rank", "low-rank+bias"]


@pytest.mark.parametrize("kind", KINDS)
def test_ghost_operator_forward_equals_dense_math(kind):
    """h @ W + b with W = weight, diag(weight) or I + down @ up, in float64; every kind starts at identity."""
    parts = random_parts(kind, seed=3)
    shapes = {k: tuple(v.shape) for k, v in parts.items()}
    op = GhostOperator(shapes, dtype=torch.float64)
    h = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert torch.equal(op(h), h)  # identity init
    for name, tensor in parts.items():
        getattr(op, name).data.copy_(tensor)
    assert sorted(op.state_dict()) == sorted(parts)  # absent parts are not in the state dict
    torch.testing.assert_close(op(h), dense_operator(h, parts), rtol=1e-12, atol=1e-12)
    if kind.startswith("low-rank"):
        w = torch.eye(16, dtype=torch.float64) + parts["down"] @ parts["up"]
        torch.testing.assert_close(op(h), h @ w + parts.get("bias", 0), rtol=1e-12, atol=1e-12)


def test_ghost_operator_refuses_what_is_not_an_operator():
    assert list(GhostOperator((16, 16)).state_dict()) == ["weight"]  # a bare shape is {"weight": shape}
    assert list(GhostOperator([16]).state_dict()) == ["weight"]
    for parts, message in [
        ({"down": (16, 4)}, "down without up"),
        ({"weight": (16, 16), "down": (16, 4), "up": (4, 16)}, "both weight and down and up"),
        ({"down": (16, 4), "up": (5, 16)}, r"up \(5, 16\)"),
        ({"down": (16, 17), "up": (17, 16)}, "1 ≤ r ≤ 16"),
        ({"weight": (16, 16), "bias": (8,)}, r"bias has shape \(8,\)"),
        ({"weight": (16, 8)}, "weight has shape"),
        ({"weight": (16,), "scale": (16,)}, "unknown parts"),
        ({"bias": (16,)}, "no weight, and no down and up"),
    ]:
        with pytest.raises(ValueError, match=message):
            GhostOperator(parts)
    model = tiny_model("llama", layers=2)
    with pytest.raises(GhostlayersError, match="weight has shape"):
        install_ghost(model.model.layers[1], torch.eye(8, dtype=torch.float64), hidden=16)
    with pytest.raises(GhostlayersError, match="down without up"):
        install_ghost(model.model.layers[1], {"down": torch.zeros(16, 2)})
    assert not hasattr(model.model.layers[1], "ghost")
    attach_ghost(model.model.layers[1], {"down": [16, 2], "up": [2, 16], "bias": [16]})  # lists, as in config.json
    assert sorted(model.model.layers[1].ghost.state_dict()) == ["bias", "down", "up"]


@pytest.mark.parametrize("family", FAMILIES)
def test_affine_and_low_rank_operators_equal_dense_reference(family):
    model = tiny_model(family, layers=6)
    windows = random_windows(2, 24)
    operators = {3: random_parts("low-rank+bias", 3), 5: random_parts("dense+bias", 5), 6: random_parts("low-rank", 6)}
    pruned = prune(model, [1, 2, 4], operators)
    ghosts = ghost_modules(pruned)
    assert sorted(ghosts) == ["model.layers.1", "model.layers.2", "model.norm"]
    assert sorted(ghosts["model.layers.1"].state_dict()) == ["bias", "down", "up"]
    assert ghosts["model.norm"].bias is None and ghosts["model.norm"].weight is None
    with torch.no_grad():
        got = pruned(windows).logits
    torch.testing.assert_close(got, skipped_logits(model, windows, [1, 2, 4], operators))
    with pytest.raises(GhostlayersError, match="down has shape"):
        prune(model, [1, 2], {3: {"down": torch.zeros(8, 2), "up": torch.zeros(2, 8)}})


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ghost_operator_in_a_16_bit_model_multiplies_in_float32(kind, dtype):
    """The product runs in float32 on the float32-stored parts and only the result is rounded to the model's dtype:
    rounding W = I + M to 8 mantissa bits first would lose ~4% of M (issue 13, defect 2)."""
    parts = random_parts(kind, seed=5)
    op = GhostOperator({k: tuple(v.shape) for k, v in parts.items()}, dtype=torch.float32)
    for name, tensor in parts.items():
        getattr(op, name).data.copy_(tensor)
    h = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(6)).to(dtype)
    want = dense_operator(h.double(), parts).float().to(dtype)  # exact product, rounded once
    got = op(h)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=float(want.float().abs().max()) * 2**-7)
    exact = dense_operator(h.double(), parts)
    assert (got.double() - exact).norm() <= (want.double() - exact).norm() * 1.01 + 1e-12


def test_pruned_model_shares_parameters_until_unshared():
    """prune() shares the dense model's parameter objects (no copy), so converting the pruned model in place converts
    the dense one's kept layers too; unshare() ends that without copying a weight (issue 13, defect 3)."""
    from ghostlayers.surgery import prune, unshare

    dense = tiny_model("llama", layers=4, dtype=torch.float32)
    pruned = prune(dense, [1])
    assert pruned.model.layers[1].mlp.down_proj.weight is dense.model.layers[2].mlp.down_proj.weight
    pruned.to(torch.bfloat16)
    assert dense.model.layers[2].mlp.down_proj.weight.dtype == torch.bfloat16  # the documented sharing
    dense = tiny_model("llama", layers=4, dtype=torch.float32)
    ids = torch.randint(0, 200, (2, 12))
    pruned = prune(dense, [1])
    with torch.no_grad():
        before = pruned(ids).logits
    unshare(pruned)
    w = pruned.model.layers[1].mlp.down_proj.weight
    assert w is not dense.model.layers[2].mlp.down_proj.weight
    assert w.data_ptr() == dense.model.layers[2].mlp.down_proj.weight.data_ptr()  # still no copy
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight  # ties kept
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, before, rtol=0, atol=0)
    pruned.to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in dense.parameters())
    assert all(p.dtype == torch.bfloat16 for p in pruned.parameters())


def test_a_family_added_as_one_entry_prunes_saves_and_recovers(tmp_path):
    """SmolLM3 (docs/design.md's worked example): Llama-shaped, with a per-layer list (`no_rope_layers`: which
    layers use rotary embeddings) that must follow the kept layers."""
    import ghostlayers
    from conftest import byte_tokenizer
    from ghostlayers.options import QUIET
    from ghostlayers.pipeline import Selection, calibrate, recover

    model = tiny_model("smollm3", layers=6)
    flags = list(model.config.no_rope_layers)
    assert 0 in flags and 1 in flags
    removed = [1, 2]
    pruned = prune(model, removed, {3: random_operator()})
    kept = [0, 3, 4, 5]
    assert pruned.config.no_rope_layers == [flags[i] for i in kept]
    assert [layer.self_attn.use_rope for layer in pruned.model.layers] == [flags[i] for i in kept]
    ids = random_windows(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, skipped_logits(model, ids, removed, {3: random_operator()}))
    out = ghostlayers.save(pruned, byte_tokenizer(), tmp_path / "exact")
    loaded, _, _ = ghostlayers.load(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, pruned(ids).logits)
    windows = random_windows(6, 24)
    stats, plan = calibrate(model, windows, Selection("streamline", 2), methods=("ghost", "procrustes"), run=QUIET)
    for method in ("ghost", "procrustes"):
        _, ops = recover(model, stats, plan, method)
        assert 0 < ops[0].errors[0] < 1, method
