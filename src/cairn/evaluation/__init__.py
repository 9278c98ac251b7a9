"""Generation, per-example metrics and task scores."""

from cairn.evaluation.evaluate import EvalResult, evaluate_task
from cairn.evaluation.generation import generate
from cairn.evaluation.metrics import METRIC_FNS, score

__all__ = ["EvalResult", "METRIC_FNS", "evaluate_task", "generate", "score"]
