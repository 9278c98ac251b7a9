"""`Example` (one prompt -> answer pair) and `Task` (named splits plus a metric)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from cairn.errors import DataError

SPLITS = ("train", "eval", "test")
METRICS = ("exact", "choice", "rouge_l", "edit_sim", "sari")
EXTRACTIONS = ("full", "first_line", "first_clause", "prefix")  # what of a generation the metric judges (evaluation.metrics.extract)


@dataclass(frozen=True)
class Example:
    """One prompt -> answer pair; training puts the loss on the answer tokens only."""

    prompt: str
    answer: str


@dataclass
class Task:
    """A named dataset with train / eval / test splits, scored by `metric` (see METRICS)."""

    name: str
    metric: str
    splits: dict[str, list[Example]] = field(default_factory=dict)
    extract: str = "full"  # what of a generation the metric judges: one of EXTRACTIONS

    def __post_init__(self) -> None:
        if self.extract not in EXTRACTIONS:
            raise DataError(f"task {self.name!r}: unknown extract {self.extract!r}; expected one of {', '.join(EXTRACTIONS)}")
        if self.metric not in METRICS:
            raise DataError(
                f"task {self.name!r}: unknown metric {self.metric!r}; expected one of {', '.join(METRICS)}"
            )
        for split in SPLITS:
            self.splits.setdefault(split, [])

    @property
    def train(self) -> list[Example]:
        return self.splits["train"]

    @property
    def eval(self) -> list[Example]:
        return self.splits["eval"]

    @property
    def test(self) -> list[Example]:
        return self.splits["test"]

    def split(self, name: str) -> list[Example]:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return self.splits[name]

    def limited(self, limits: dict[str, int], seed: int = 0) -> "Task":
        """This task with each split in `limits` cut to at most that many examples: a seeded
        sample, kept in the split's order (for quick studies on large tasks)."""
        import random

        splits = {}
        for name, examples in self.splits.items():
            n = limits.get(name)
            keep = sorted(random.Random(f"{seed}:{name}").sample(range(len(examples)), n)) if n is not None and n < len(examples) else range(len(examples))
            splits[name] = [examples[i] for i in keep]
        return Task(self.name, self.metric, splits, self.extract)

    def data_hash(self) -> str:
        """sha256 over every split's examples: identifies the data a contribution was trained on."""
        h = hashlib.sha256()
        for split in SPLITS:
            for ex in self.splits[split]:
                h.update(json.dumps([split, ex.prompt, ex.answer], ensure_ascii=False).encode())
                h.update(b"\n")
        return h.hexdigest()
