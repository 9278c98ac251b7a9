"""Score a model on a task split: batched generation, then the task's metric per example."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from cairn.data.task import Task
from cairn.data.lm_eval import LmEvalProbe
from cairn.evaluation.generation import generate
from cairn.evaluation.lm_eval_probe import run_probe
from cairn.evaluation.metrics import score

log = logging.getLogger("cairn")


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


def warn_if_mostly_empty(task: str, split: str, predictions: list[str], *, stopped_at_newline: bool) -> None:
    """Say so when most predictions are empty: they score 0 whatever the model knows, and the cause
    is usually the prompt format, not the knowledge (the bundled instruct model, prompted without
    its chat template, starts every answer with a newline and scored 0.0 on 81 of 81). Said by
    `cairn eval`, not by a run's scoring, where a base model that knows none of a pack's invented
    facts answers nothing before it is trained on them, as expected."""
    empty = sum(not p.strip() for p in predictions)
    if predictions and empty > len(predictions) / 2:
        why = ["an instruction-tuned model may need its chat template (--chat-template; `chat_template: true` in a config)"]
        if stopped_at_newline:
            why.append("generation stops at the first newline (no answer of the task spans lines), so an answer that starts with one is empty")
        log.warning(f"{task} {split}: {empty} of {len(predictions)} predictions are empty and score 0; " + "; ".join(why))


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
