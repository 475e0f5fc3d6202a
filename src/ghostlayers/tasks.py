"""Offline zero-shot tasks from held-out Wikipedia text, written as lm-eval task YAML + JSONL.

    gl_wiki_nextsent  (HellaSwag style) three consecutive sentences of a held-out article; choose the true next
                      sentence among four: it, and three sentences of similar length from other held-out articles.
    gl_wiki_lastword  (LAMBADA style) three consecutive sentences without the last word; choose that word among four:
                      it, and three other words of the same passage.

Only the `wiki` source's held-out articles are used (never the calibration part), so a model calibrated on `wiki`
is scored on text it has not seen. Items are a deterministic function of the seed. Chance is 25% on both.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from .errors import GhostlayersError

OFFLINE_TASKS = ("gl_wiki_nextsent", "gl_wiki_lastword")
PAPER_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "openbookqa", "rte", "copa", "race")
PRESETS = {"paper": PAPER_TASKS, "offline": OFFLINE_TASKS}
CHOICES = 4

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WORD = re.compile(r"[A-Za-z]+")
_STOPWORDS = frozenset(
    "that this with from have were been their which there these those they them than then also into only other "
    "such some more most when where while what about after before over under between through during each many "
    "very much being would could should will shall upon"
    .split()
)


def expand(tasks: str) -> list[str]:
    """Comma-separated task names and preset names (paper, offline) -> task names, in order, without repeats."""
    names: list[str] = []
    for item in (t.strip() for t in tasks.split(",")):
        for name in PRESETS.get(item, (item,) if item else ()):
            if name not in names:
                names.append(name)
    if not names:
        raise GhostlayersError("--tasks needs at least one task name, e.g. --tasks offline or --tasks arc_easy,hellaswag")
    return names


def _good(sentence: str) -> bool:
    """A clean prose sentence: no leftover markup, mostly letters, a sensible length."""
    if not 40 <= len(sentence) <= 240 or not sentence.endswith(".") or not sentence[0].isupper():
        return False
    if any(c in sentence for c in "|=[]{}<>*#_\n"):
        return False
    return sum(c.isalpha() or c == " " for c in sentence) / len(sentence) > 0.9


def passages(articles: list[str], length: int) -> list[tuple[int, list[str]]]:
    """(article index, `length` consecutive good sentences) for every such run inside a paragraph, overlapping."""
    runs = []
    for a, article in enumerate(articles):
        for paragraph in article.split("\n"):
            sentences = [" ".join(s.split()) for s in _SENTENCE_END.split(paragraph.strip())]  # \xa0 -> space
            for i in range(len(sentences) - length + 1):
                window = sentences[i : i + length]
                if all(_good(s) for s in window):
                    runs.append((a, window))
    return runs


def _pick(rng: random.Random, runs: list, items: int) -> list:
    """`items` runs at random, at most a quarter of them from one article, no two sharing a sentence."""
    rng.shuffle(runs)
    per_article: dict[int, int] = {}
    used: set[str] = set()
    chosen = []
    for article, window in runs:
        if per_article.get(article, 0) >= max(1, items // 4) or used.intersection(window):
            continue
        chosen.append((article, window))
        used.update(window)
        per_article[article] = per_article.get(article, 0) + 1
        if len(chosen) == items:
            break
    return chosen


def _item(rng: random.Random, context: str, truth: str, distractors: list[str]) -> dict:
    choices = [truth, *distractors]
    rng.shuffle(choices)
    return {"context": context, "choices": choices, "label": choices.index(truth)}


def next_sentence_items(articles: list[str], items: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    pool = [(a, s) for a, window in passages(articles, 1) for s in window]
    out = []
    for article, window in _pick(rng, passages(articles, 4), items):
        truth = window[-1]
        similar = [s for a, s in pool if a != article and 0.67 <= len(s) / len(truth) <= 1.5 and s != truth]
        if len(similar) < CHOICES - 1:
            continue
        out.append(_item(rng, " ".join(window[:-1]), truth, rng.sample(similar, CHOICES - 1)))
    return out


def last_word_items(articles: list[str], items: int, seed: int) -> list[dict]:
    rng = random.Random(seed + 1)
    out = []
    for _, window in _pick(rng, passages(articles, 3), 2 * items):
        text = " ".join(window)[:-1]  # without the final period
        context, _, truth = text.rpartition(" ")
        if not (truth.isalpha() and truth.islower() and len(truth) >= 4 and truth not in _STOPWORDS):
            continue
        words = {w for w in _WORD.findall(context) if w.islower() and len(w) >= 4 and w not in _STOPWORDS and w != truth}
        if len(words) < CHOICES - 1:
            continue
        out.append(_item(rng, context, truth, rng.sample(sorted(words), CHOICES - 1)))
        if len(out) == items:
            break
    return out


def _yaml(task: str, data: Path) -> str:
    # JSON is valid YAML: no YAML library needed to write it, and every value is quoted safely
    config = {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0, "source": "ghostlayers: held-out articles of the gensim Wikipedia excerpt"},
    }
    return json.dumps(config, indent=2) + "\n"


def write_offline_tasks(out: str | Path, items: int = 300, seed: int = 0) -> list[str]:
    """Write both offline tasks (YAML + JSONL each) into folder `out`; returns the task names."""
    if items < 10:
        raise GhostlayersError("offline tasks need at least 10 items each")
    from .data import load_documents  # imports torch: not needed by the CLI's --help

    articles = load_documents("wiki", "eval")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for task, make in zip(OFFLINE_TASKS, (next_sentence_items, last_word_items)):
        rows = make(articles, items, seed)
        if len(rows) < items:
            raise GhostlayersError(f"the held-out wiki text yields only {len(rows)} items for {task}: ask for fewer")
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{task}.yaml").write_text(_yaml(task, data))
    return list(OFFLINE_TASKS)
