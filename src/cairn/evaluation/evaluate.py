"""Score a model on a task split: batched generation, then the task's metric per example."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from cairn.data.task import Task
from cairn.data.lm_eval import LmEvalProbe
from cairn.evaluation.generation import generate
from cairn.evaluation.lm_eval_probe import run_probe
from cairn.evaluation.metrics import score


@dataclass
class EvalResult:
    task: str
    metric: str
    split: str
    n: int
    score: float
    predictions: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def max_new_tokens_for(task: Task, tokenizer, *, cap: int = 512) -> int:
    """Room for the longest answer in the task (all splits), plus a quarter, within `cap`."""
    answers = [ex.answer for split in task.splits.values() for ex in split]
    longest = max((len(tokenizer(" " + a, add_special_tokens=False)["input_ids"]) for a in answers), default=16)
    return min(cap, longest + max(4, longest // 4))


def single_line(task: Task) -> bool:
    """True when no answer spans lines: generation may then stop at the first newline."""
    return not any("\n" in ex.answer.strip() for split in task.splits.values() for ex in split)


def evaluate_task(model, tokenizer, task: Task, *, split: str = "test", batch_size: int = 32, progress: bool = False) -> EvalResult:
    """Greedy-decode every prompt of `task`'s split and score it; keeps per-example predictions.
    An lm-eval probe is run by lm-evaluation-harness instead (its predictions: one row per task)."""
    if isinstance(task, LmEvalProbe):
        mean, rows = run_probe(task, model, tokenizer)
        return EvalResult(task.name, task.metric, "lm-eval", len(rows), mean, rows)
    examples = task.split(split)
    preds = generate(
        model,
        tokenizer,
        [ex.prompt for ex in examples],
        max_new_tokens=max_new_tokens_for(task, tokenizer),
        batch_size=batch_size,
        stop_at_newline=single_line(task),
        first_character=task.metric == "choice",  # the choice metric reads the first non-space character only
        progress=progress,
    )
    rows = [
        {"prompt": ex.prompt, "answer": ex.answer, "prediction": p, "score": score(task.metric, p, ex.answer, ex.prompt, task.extract)}
        for ex, p in zip(examples, preds)
    ]
    mean = sum(r["score"] for r in rows) / len(rows) if rows else 0.0
    return EvalResult(task.name, task.metric, split, len(rows), mean, rows)
