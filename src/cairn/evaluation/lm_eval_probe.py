"""General ability measured by lm-evaluation-harness (a probe source `lm-eval:TASKS`, cairn.data.lm_eval).

The stage model is scored in memory (wrapped in lm-eval's HFLM, never re-saved). Each task's
score is the reference study's choice: acc_norm where the task reports it, else acc, else
exact_match; the probe's score (G) is their mean, and every task's score is kept with the result.
"""

from __future__ import annotations

from cairn.data.lm_eval import LmEvalProbe
from cairn.errors import DataError

PREFERENCE = ("acc_norm", "acc", "exact_match")

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
