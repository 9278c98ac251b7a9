"""The `replay` strategy: sequential training with a share of each earlier task's examples replayed (fully-collaborative)."""

from __future__ import annotations

import random
from typing import Iterator

from cairn.data.task import Task
from cairn.methods.replay import replay_sample
from cairn.options import ReplayOptions, TrainConfig
from cairn.workspace import Workspace


def run(model, stream, opts: ReplayOptions, cfg: TrainConfig, work: Workspace) -> Iterator:
    """Sequential training on task s plus `rate` x |task s| examples drawn from each earlier task
    (seeded); LoRA adapters are merged after each stage as in `sequential`."""
    for s, (task, earlier) in enumerate(stream, 1):
        k = round(opts.rate * len(task.train))
        mixed, drawn = list(task.train), {}
        for j, old in enumerate(earlier, 1):
            idx = replay_sample(len(old.train), k, random.Random(f"{cfg.seed}:{s}:{j}"))
            mixed += [old.train[i] for i in idx]
            drawn[old.name] = idx
        work.note(replayed=drawn)
        model = work.train(model, Task(f"{task.name}+replay", task.metric, {"train": mixed}), cfg)
        if cfg.method == "lora":
            model = model.merge_and_unload()
        yield model
