"""Surgery: configs stay consistent, the pruned model computes what skipping the layers computes, generation with a
KV cache agrees with generation without, and save -> load restores the same logits."""

import pytest
import torch

from conftest import FAMILIES, random_windows, skipped_logits, tiny_model
from ghostlayers.errors import GhostlayersError
from ghostlayers.surgery import ghost_modules, prune


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
