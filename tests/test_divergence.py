"""KL divergence, top-1 agreement and greedy agreement of a pruned model against its dense model (issue 24)."""

import json
import math

import pytest
import torch

from conftest import PROSE, byte_tokenizer, random_windows, tiny_model
from ghostlayers.data import factual_prompts, load_documents
from ghostlayers.divergence import against, against_stored, agreement, store_base, summarise
from ghostlayers.errors import GhostlayersError


def _perturbed(model, scale: float = 0.05, seed: int = 1):
    other = tiny_model("llama", layers=4, dtype=torch.float32)
    other.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.model.layers[2].parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return other


def test_identical_models_give_zero_kl_and_full_agreement():
    model = tiny_model("llama", layers=4, dtype=torch.float32)
    windows = random_windows(3, 20)
    out = against(model, model, windows, progress=False).as_dict()
    assert out["kl_mean"] < 1e-6 and out["kl_p99"] < 1e-6 and out["top1_agreement"] == 100.0
    assert out["perplexity"] == out["perplexity_dense"] and out["tokens"] == 3 * 19
    gen = agreement(model, model, [w[:8] for w in windows], new_tokens=10)
    assert gen["mean_same_prefix"] == 10 and gen["exact_first_8"] == 100.0


def test_kl_and_agreement_are_their_definitions_on_explicit_logits():
    dense = tiny_model("llama", layers=4, dtype=torch.float32)
    pruned = _perturbed(dense)
    windows = random_windows(4, 24)
    result = against(dense, pruned, windows, batch_size=3, progress=False)
    with torch.no_grad():
        p = dense(windows).logits[:, :-1].log_softmax(-1)
        q = pruned(windows).logits[:, :-1].log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).flatten()
    torch.testing.assert_close(result.kl, kl, rtol=1e-5, atol=1e-7)
    assert result.kl.mean() > 1e-4  # the perturbation shows
    same = (p.argmax(-1) == q.argmax(-1)).flatten()
    assert torch.equal(result.same_top, same)
    nll = -q.gather(-1, windows[:, 1:, None]).sum()
    assert result.as_dict()["perplexity"] == pytest.approx(math.exp(float(nll) / kl.numel()), rel=1e-6)


def test_the_stored_base_gives_the_streamed_figures_and_refuses_other_windows(tmp_path):
    dense = tiny_model("llama", layers=4, dtype=torch.float32)
    pruned = _perturbed(dense)
    windows = random_windows(4, 24)
    streamed = against(dense, pruned, windows, progress=False).as_dict()
    base = store_base(dense, windows, tmp_path / "dense.npy", progress=False)
    stored = against_stored(base, pruned, windows, progress=False).as_dict()
    for key in ("kl_mean", "kl_median", "perplexity", "perplexity_dense"):
        assert stored[key] == pytest.approx(streamed[key], rel=2e-2, abs=1e-4), key
    assert abs(stored["top1_agreement"] - streamed["top1_agreement"]) <= 100 / stored["tokens"] * 2
    with pytest.raises(GhostlayersError, match="other windows"):
        against_stored(base, pruned, random_windows(4, 24, seed=9), progress=False)


def test_eval_against_prints_and_records_the_comparison(tmp_path, capsys):
    from ghostlayers.cli import main

    model = tiny_model("llama", layers=4, dtype=torch.float32)
    for name, m in (("dense", model), ("other", _perturbed(model))):
        m.save_pretrained(tmp_path / name)
        byte_tokenizer().save_pretrained(tmp_path / name)
    (tmp_path / "prose.txt").write_text(PROSE * 20)
    base = ["eval", "--model", str(tmp_path / "other"), "--against", str(tmp_path / "dense"), "--text",
            str(tmp_path / "prose.txt"), "--seq-len", "32", "--max-windows", "4", "--prompts", "2", "--quiet"]
    assert main([*base, "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    streamed = row["against"]
    assert streamed["tokens"] == 4 * 31 and 0 < streamed["kl_mean"] and 0 <= streamed["top1_agreement"] <= 100
    assert streamed["generation"]["windows"]["prompts"] == 2
    assert main([*base, "--base-file", str(tmp_path / "base.npy")]) == 0
    out = capsys.readouterr().out
    assert "KL(dense ‖ pruned) mean" in out and "top-1 agreement" in out and (tmp_path / "base.npy").is_file()


def test_summarise_counts_shared_prefixes_and_answers_said():
    prompts = [torch.tensor([1, 2]), torch.tensor([3]), torch.tensor([4])]
    dense = [[5, 6, 7, 8], [9, 9, 9, 9], [1, 2, 3, 4]]
    pruned = [[5, 6, 0, 8], [9, 9, 9, 9], [7, 2, 3, 4]]
    answers = [[5, 6], [9, 8], [7]]
    out = summarise(prompts, dense, pruned, 4, answers)
    assert [r["same_prefix"] for r in out["examples"]] == [2, 4, 0]
    assert out["mean_same_prefix"] == 2.0 and out["exact_first_8"] == pytest.approx(100 / 3)
    assert [(r["dense_right"], r["pruned_right"]) for r in out["examples"]] == [(True, True), (False, False),
                                                                               (False, True)]
    assert out["lost"] == 0 and out["gained"] == 1 and out["pruned_right"] == pytest.approx(200 / 3)


@pytest.mark.parametrize("source", ["wiki", "news"])
def test_factual_prompts_are_sentences_of_the_held_out_text_cut_before_their_last_word(source):
    facts = factual_prompts(source, 12)
    assert len(facts) == 12 and facts == factual_prompts(source, 12)
    held_out = "\n".join(load_documents(source, "eval"))
    for prompt, answer in facts:
        assert f"{prompt} {answer}." in held_out
        assert answer not in prompt and (answer.isdigit() or answer[0].isupper())
    calibration = "\n".join(load_documents(source, "calib"))
    assert not any(f"{p} {a}." in calibration for p, a in facts)
