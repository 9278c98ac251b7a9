"""The `joint` strategy: at each stage, train from the base on every task seen so far (the fully-collaborative upper reference)."""

from __future__ import annotations

import copy
from typing import Iterator

from cairn.data.task import Task
from cairn.methods.replay import joint_mixture
from cairn.options import JointOptions, TrainConfig
from cairn.workspace import Workspace


def run(model, stream, opts: JointOptions, cfg: TrainConfig, work: Workspace) -> Iterator:
    """At stage s, train from the base model on the union of tasks 1..s."""
    for task, earlier in stream:
        seen = [*earlier, task]
        # The union of one task is the task: stage 1 shares its contribution with the other strategies.
        union = Task("+".join(t.name for t in seen), task.metric, {"train": joint_mixture(seen, opts.mix, cfg.seed)}) if earlier else task
        yield work.train(copy.deepcopy(model), union, cfg)
