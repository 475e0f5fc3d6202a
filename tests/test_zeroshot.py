"""The offline tasks (deterministic, built from held-out text only, truthful labels) and the lm-eval path: its
accuracy equals a log-likelihood argmax computed by hand, on the in-memory model."""

import json

import pytest
import torch

from conftest import byte_tokenizer, tiny_model
from ghostlayers.data import load_documents
from ghostlayers.errors import GhostlayersError
from ghostlayers.tasks import OFFLINE_TASKS, PAPER_TASKS, expand, write_offline_tasks
from ghostlayers.zeroshot import accuracy, prepare, summarise


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    write_offline_tasks(folder, items=60, seed=0)
    return {t: [json.loads(line) for line in (folder / f"{t}.jsonl").read_text().splitlines()] for t in OFFLINE_TASKS}


def long_context_model():
    model = tiny_model("llama", dtype=torch.float32)
    model.config.max_position_embeddings = 2048  # byte tokens: a passage is a few hundred of them
    return model


def test_offline_items_are_true_to_held_out_text_and_deterministic(offline, tmp_path):
    held_out = " ".join(" ".join(a.split()) for a in load_documents("wiki", "eval"))
    calibration = " ".join(" ".join(a.split()) for a in load_documents("wiki", "calib"))
    for task, rows in offline.items():
        assert len(rows) == 60
        for row in rows:
            truth = row["choices"][row["label"]]
            assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4
            passage = " ".join(f"{row['context']} {truth}".split()) + ("." if task == "gl_wiki_lastword" else "")
            assert passage in held_out and passage not in calibration, passage[:80]
        assert len({r["label"] for r in rows}) == 4  # the answer's position varies
    write_offline_tasks(tmp_path / "again", items=60, seed=0)
    write_offline_tasks(tmp_path / "other", items=60, seed=1)
    for task in OFFLINE_TASKS:
        again = [json.loads(line) for line in (tmp_path / "again" / f"{task}.jsonl").read_text().splitlines()]
        other = [json.loads(line) for line in (tmp_path / "other" / f"{task}.jsonl").read_text().splitlines()]
        assert again == offline[task] and other != offline[task]
        config = json.loads((tmp_path / "again" / f"{task}.yaml").read_text())  # JSON is YAML
        assert config["task"] == task and config["output_type"] == "multiple_choice"


def test_presets_and_names():
    assert expand("paper") == list(PAPER_TASKS) and len(PAPER_TASKS) == 9
    assert expand("offline,arc_easy,gl_wiki_lastword") == [*OFFLINE_TASKS, "arc_easy"]
    with pytest.raises(GhostlayersError, match="at least one task"):
        expand(" , ")


def _loglikelihood(model, tok, context, continuation):
    ctx, cont = tok(context).input_ids, tok(continuation).input_ids
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def test_lm_eval_accuracy_equals_loglikelihood_argmax(offline):
    model, tok = long_context_model(), byte_tokenizer()
    suite = prepare(list(OFFLINE_TASKS), limit=6)
    result = accuracy(model, tok, suite, batch_size=4)
    for task in OFFLINE_TASKS:
        hits, hits_norm = 0, 0
        for row in offline[task][:6]:  # seed 0, as `prepare` generates: the same first items
            scores = [_loglikelihood(model, tok, row["context"], " " + c) for c in row["choices"]]
            norm = [s / len(" " + c) for s, c in zip(scores, row["choices"])]
            hits += max(range(4), key=scores.__getitem__) == row["label"]
            hits_norm += max(range(4), key=norm.__getitem__) == row["label"]
        got = result["tasks"][task]
        assert got["items"] == 6
        assert got["acc"] == pytest.approx(hits / 6) and got["acc_norm"] == pytest.approx(hits_norm / 6), task
    mean = sum(result["tasks"][t]["acc"] for t in OFFLINE_TASKS) / 2
    assert result["average"]["acc"] == pytest.approx(mean) and result["average"]["acc_tasks"] == 2


def test_averages_say_what_they_cover():
    results = {"a": {"acc,none": 0.5, "acc_norm,none": 0.7}, "b": {"acc,none": 0.3}}
    summary = summarise(results, {"a": {"effective": 10}}, ["a", "b"])
    assert summary["average"] == {"acc": 0.4, "acc_tasks": 2, "acc_norm": 0.7, "acc_norm_tasks": 1}
    assert summary["tasks"]["b"]["acc_norm"] is None and summary["tasks"]["a"]["items"] == 10


def test_unknown_task_and_bad_tasks_dir():
    with pytest.raises(GhostlayersError, match="not a folder"):
        prepare(["x"], tasks_dir="/nonexistent/tasks")
    with pytest.raises(GhostlayersError, match="unknown task no_such_task_xyz"):
        prepare(["no_such_task_xyz"])
