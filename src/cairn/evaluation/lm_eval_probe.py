"""General ability measured by lm-evaluation-harness: the probe source `lm-eval:TASK1,TASK2,...`.

Options after `?`: `fewshot=N` (lm-eval's num_fewshot), `limit=N` (examples per task), `batch=N`,
and `include=DIR` (a folder of task YAML files, for custom or offline tasks), e.g.
`lm-eval:arc_easy,hellaswag?fewshot=0&limit=200` or `lm-eval:my_task?include=tasks/`.

The stage model is scored in memory (wrapped in lm-eval's HFLM, never re-saved). Each task's
score is the reference study's choice: acc_norm where the task reports it, else acc, else
exact_match; the probe's score (G) is their mean, and every task's score is kept with the result.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

from cairn.errors import DataError

PREFIX = "lm-eval:"
PREFERENCE = ("acc_norm", "acc", "exact_match")
OPTIONS = {"fewshot": int, "limit": int, "batch": int, "include": str}


@dataclass
class LmEvalProbe:
    """A probe run by lm-evaluation-harness; `evaluate_task` scores it like a Cairn task."""

    tasks: list[str]
    fewshot: int | None = None
    limit: int | None = None
    batch: int = 16
    include: str | None = None
    name: str = "lm-eval"
    metric: str = "lm-eval"
    source: str = field(default="", repr=False)

    def data_hash(self) -> str:
        """Identifies what is measured (source, lm-eval version, the include folder's YAML files),
        so cached scores are reused only for the same measurement."""
        from importlib.metadata import version

        h = hashlib.sha256(json.dumps([self.source, version("lm_eval")]).encode())
        if self.include:
            for f in sorted(Path(self.include).rglob("*")):
                if f.is_file():
                    h.update(f.name.encode() + f.read_bytes())
        return h.hexdigest()

    def split(self, name: str) -> list:
        return []  # lm-eval holds the data; nothing here for Cairn's own loops


def parse_probe(source: str) -> LmEvalProbe:
    """`lm-eval:TASKS[?options]` -> LmEvalProbe; a DataError naming the bad part otherwise."""
    spec, _, query = source.removeprefix(PREFIX).partition("?")
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    if not tasks:
        raise DataError(f"{source}: no lm-eval task named; expected lm-eval:TASK1,TASK2[?fewshot=N&limit=N&include=DIR]")
    options = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in OPTIONS:
            raise DataError(f"{source}: unknown option {key!r}; expected one of {', '.join(OPTIONS)}")
        try:
            options[key] = OPTIONS[key](value)
        except ValueError:
            raise DataError(f"{source}: option {key}={value!r} is not a whole number") from None
        if OPTIONS[key] is int and options[key] < (0 if key == "fewshot" else 1):
            raise DataError(f"{source}: option {key} must be at least {0 if key == 'fewshot' else 1}, got {options[key]}")
    if "include" in options and not Path(options["include"]).is_dir():
        raise DataError(f"{source}: include folder {options['include']!r} not found")
    name = "lm-eval:" + ",".join(tasks)
    return LmEvalProbe(tasks, name=name, source=source, **options)


def task_score(metrics: dict) -> tuple[str, float]:
    """(metric, value) from one task's lm-eval results: acc_norm, else acc, else exact_match
    (whatever filter follows the comma; stderr entries are not scores)."""
    for wanted in PREFERENCE:
        for key, value in metrics.items():
            if key.split(",")[0] == wanted and isinstance(value, (int, float)):
                return key, float(value)
    raise DataError(f"lm-eval reported none of {', '.join(PREFERENCE)} for this task (it reported {sorted(metrics)})")


def run_probe(probe: LmEvalProbe, model, tokenizer) -> tuple[float, list[dict]]:
    """(mean of the tasks' scores, one row per task) of `model` on the probe's lm-eval tasks."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise DataError(f"probe {probe.source}: lm-evaluation-harness is not installed (pip install lm_eval)") from exc
    was_training = model.training
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=probe.batch)
    manager = TaskManager(include_path=probe.include) if probe.include else TaskManager()
    unknown = [t for t in probe.tasks if t not in manager.all_tasks]
    if unknown:
        raise DataError(f"probe {probe.source}: lm-eval knows no task {', '.join(unknown)} (check the name, or give include=DIR)")
    results = simple_evaluate(model=lm, tasks=probe.tasks, num_fewshot=probe.fewshot, limit=probe.limit, task_manager=manager)
    model.train(was_training)
    rows = []
    for task in probe.tasks:
        metric, value = task_score(results["results"][task])
        rows.append({"task": task, "metric": metric, "score": value, "n": results.get("n-samples", {}).get(task, {}).get("effective")})
    return sum(r["score"] for r in rows) / len(rows), rows
