"""Zero-shot accuracy through lm-evaluation-harness, on the in-memory model (a pruned model is scored as it is,
operators included, without saving it first)."""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .errors import GhostlayersError
from .data import hub_offline
from .tasks import OFFLINE_TASKS, write_offline_tasks


@dataclass
class Suite:
    """What to score, resolved once (names checked, offline tasks generated) and reusable for many models."""

    tasks: list[str]
    manager: Any  # lm_eval.tasks.TaskManager
    limit: int | None = None  # only the first N items of each task
    num_fewshot: int | None = None
    generated: tempfile.TemporaryDirectory | None = None  # the offline tasks' files live as long as the suite


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise GhostlayersError(f"zero-shot accuracy needs lm-evaluation-harness: pip install lm-eval ({err})") from None
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return lm_eval, HFLM, TaskManager


def prepare(
    tasks: list[str],
    tasks_dir: str | Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    seed: int = 0,
) -> Suite:
    """Check the task names and settings, and generate the offline tasks (with `seed`) if asked for.

    Names are lm-eval's own (downloaded from the hub when online), those defined by YAML files in `tasks_dir`, or
    the offline tasks gl_wiki_nextsent, gl_wiki_lastword."""
    _, _, TaskManager = _lm_eval()
    if limit is not None and limit < 1:
        raise GhostlayersError("--limit must be at least 1")
    if tasks_dir is not None and not Path(tasks_dir).is_dir():
        raise GhostlayersError(f"--tasks-dir {tasks_dir} is not a folder of lm-eval task YAML files")
    include = [str(tasks_dir)] if tasks_dir is not None else []
    generated = None
    if any(t in OFFLINE_TASKS for t in tasks):
        generated = tempfile.TemporaryDirectory(prefix="ghostlayers-tasks-")
        write_offline_tasks(generated.name, seed=seed)
        include.append(generated.name)
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):  # indexing lm-eval's own takes ~10 s
        manager = TaskManager(include_path=include or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise GhostlayersError(
            f"unknown task {', '.join(unknown)}: use lm-eval task names, the presets paper or offline, or add "
            "--tasks-dir with their YAML files"
        )
    return Suite(list(tasks), manager, limit, num_fewshot, generated)


def accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    suite: Suite,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """acc and acc_norm (with standard errors) per task of `suite`, and their averages, for the in-memory model.

    Returns {"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "items"}}, "average": {...}}.
    """
    lm_eval, HFLM, _ = _lm_eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(
            model=lm, tasks=suite.tasks, num_fewshot=suite.num_fewshot, limit=suite.limit, task_manager=suite.manager,
            log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed, bootstrap_iters=1000,
        )
    except (ConnectionError, OSError, ValueError) as err:
        hint = " (the hub is offline: use --tasks offline or --tasks-dir)" if hub_offline() else ""
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise GhostlayersError(f"lm-eval could not run {', '.join(suite.tasks)}: {first}{hint}") from None
    return summarise(out["results"], out.get("n-samples", {}), suite.tasks)


def _metric(values: dict[str, Any], name: str) -> float | None:
    value = values.get(f"{name},none")
    return float(value) if isinstance(value, (int, float)) and not math.isnan(value) else None


def summarise(results: dict[str, Any], samples: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    """Per-task acc / acc_norm and two averages: acc over every task, acc_norm over the tasks that report it."""
    per_task = {}
    for name in tasks:
        values = results.get(name, {})
        per_task[name] = {
            "acc": _metric(values, "acc"),
            "acc_stderr": _metric(values, "acc_stderr"),
            "acc_norm": _metric(values, "acc_norm"),
            "acc_norm_stderr": _metric(values, "acc_norm_stderr"),
            "items": (samples.get(name) or {}).get("effective"),
        }
    accs = [v["acc"] for v in per_task.values() if v["acc"] is not None]
    norms = [v["acc_norm"] for v in per_task.values() if v["acc_norm"] is not None]
    average = {
        "acc": sum(accs) / len(accs) if accs else None,
        "acc_tasks": len(accs),
        "acc_norm": sum(norms) / len(norms) if norms else None,
        "acc_norm_tasks": len(norms),
    }
    return {"tasks": per_task, "average": average}
