"""Streaming sums: they match explicit activations, add across batches and runs, and ignore padding."""

import pytest
import torch

from conftest import random_windows, tiny_model
from ghostlayers.capture import CaptureSpec, capture
from ghostlayers.errors import GhostlayersError

SPEC = CaptureSpec(
    grams=frozenset({0, 1, 3}), cross=frozenset({(0, 3), (1, 2), (3, 6)}), cosine=frozenset({(1, 2), (2, 6), (0, 3)})
)


def hidden_inputs(model, windows):
    """h_0..h_{L-1} from transformers' own output (h_L there is after the final norm, so not used)."""
    with torch.no_grad():
        hs = model(windows, output_hidden_states=True).hidden_states
    return [h.reshape(-1, h.shape[-1]) for h in hs[:-1]]


def assert_stats_close(a, b, rtol=1e-10):
    assert a.tokens == b.tokens and a.sequences == b.sequences
    for x, y in zip(a.tensors(), b.tensors(), strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=1e-9)


def test_sums_equal_explicit_activations():
    model = tiny_model("llama")
    windows = random_windows(3, 20)
    stats = capture(model, windows, SPEC, batch_size=2, progress=False)
    h = hidden_inputs(model, windows)
    torch.testing.assert_close(stats.gram[1], h[1].T @ h[1])
    torch.testing.assert_close(stats.cross[(1, 2)], h[1].T @ h[2])
    torch.testing.assert_close(stats.sumsq[4], h[4].square().sum())
    cos = torch.nn.functional.cosine_similarity(h[1], h[2], dim=-1)
    assert stats.mean_cos((1, 2)) == pytest.approx(float(cos.mean()), rel=1e-10)
    last = cos.view(3, 20)[:, -1]
    assert stats.mean_angle((1, 2), last_token=True) == pytest.approx(float(torch.arccos(last).mean() / torch.pi))
    assert stats.tokens == 60 and stats.sequences == 3
    assert (2, 6) not in stats.cross and (3, 6) not in stats.cos  # only what was asked for
    torch.testing.assert_close(stats.cross[(3, 6)], h[3].T @ stats_h6(model, windows))


def stats_h6(model, windows):
    """h_L, the input of the final norm (transformers reports it after the norm)."""
    got = {}
    handle = model.model.norm.register_forward_pre_hook(lambda m, args: got.setdefault("h", args[0]))
    with torch.no_grad():
        model(windows)
    handle.remove()
    return got["h"].reshape(-1, got["h"].shape[-1])


def test_streamed_batches_equal_one_big_batch():
    model = tiny_model("qwen2")
    windows = random_windows(6, 16)
    one = capture(model, windows, SPEC, batch_size=6, progress=False)
    streamed = capture(model, windows, SPEC, batch_size=1, progress=False)
    assert_stats_close(one, streamed)


def test_two_halves_add_up_to_the_whole():
    model = tiny_model("gemma3_text")
    windows = random_windows(6, 16)
    whole = capture(model, windows, SPEC, batch_size=4, progress=False)
    halves = capture(model, windows[:3], SPEC, progress=False) + capture(model, windows[3:], SPEC, progress=False)
    assert_stats_close(whole, halves)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma3_text"])
def test_padding_changes_nothing(family):
    model = tiny_model(family)
    short, long = random_windows(1, 11, seed=1)[0], random_windows(1, 19, seed=2)[0]
    alone = capture(model, short[None], SPEC, progress=False) + capture(model, long[None], SPEC, progress=False)
    padded = torch.full((2, 19), 7)  # right padding with an arbitrary token
    padded[0, :11], padded[1] = short, long
    mask = torch.zeros(2, 19, dtype=torch.long)
    mask[0, :11], mask[1] = 1, 1
    together = capture(model, padded, SPEC, batch_size=2, masks=mask, progress=False)
    assert_stats_close(alone, together, rtol=1e-8)


def test_hooks_removed_even_when_the_forward_fails():
    model = tiny_model("llama")

    def count():
        return sum(len(m._forward_pre_hooks) for m in model.modules())

    capture(model, random_windows(1, 8), SPEC, progress=False)
    assert count() == 0
    with pytest.raises(IndexError):
        capture(model, torch.full((1, 8), 10_000), SPEC, progress=False)  # token id beyond the vocabulary
    assert count() == 0


def test_non_finite_activations_are_reported():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(GhostlayersError, match="non-finite activations entering layer 3"):
        capture(model, random_windows(2, 8), SPEC, progress=False)


def test_same_inputs_same_sums():
    model = tiny_model("llama")
    windows = random_windows(2, 12)
    a = capture(model, windows, SPEC, progress=False)
    b = capture(model, windows, SPEC, progress=False)
    for x, y in zip(a.tensors(), b.tensors()):
        assert torch.equal(x, y)
