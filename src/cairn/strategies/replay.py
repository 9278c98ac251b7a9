"""The `replay` strategy: sequential training with a share of each earlier task's examples replayed
(fully-collaborative), and optionally general data replayed beside them (`general`)."""

from __future__ import annotations

import random
from typing import Iterator

from cairn.data.chat import as_chat
from cairn.data.loaders import load_train_split
from cairn.data.task import Task
from cairn.methods.replay import replay_sample
from cairn.options import ReplayOptions, TrainConfig
from cairn.workspace import Workspace


def run(model, stream, opts: ReplayOptions, cfg: TrainConfig, work: Workspace) -> Iterator:
    """Sequential training on task s plus `rate` x |task s| examples drawn from each earlier task
    (seeded); with `general`, also `general_rate` x |task s| examples of that source's train split
    at every stage (seeded; recorded as `replayed_general`; `general_chat_template`: its prompts in the
    model's chat template). LoRA adapters are merged after each
    stage as in `sequential`."""
    general = load_train_split(opts.general, seed=cfg.seed) if opts.general else None
    if general is not None and opts.general_chat_template:
        general = as_chat(general, work.tokenizer)
    for s, (task, earlier) in enumerate(stream, 1):
        k = round(opts.rate * len(task.train))
        mixed, drawn = list(task.train), {}
        for j, old in enumerate(earlier, 1):
            idx = replay_sample(len(old.train), k, random.Random(f"{cfg.seed}:{s}:{j}"))
            mixed += [old.train[i] for i in idx]
            drawn[old.name] = idx
        work.note(replayed=drawn)
        if general is not None:
            idx = replay_sample(len(general.train), round(opts.general_rate * len(task.train)), random.Random(f"{cfg.seed}:{s}:general"))
            mixed += [general.train[i] for i in idx]
            work.note(replayed_general={general.name: idx})
        model = work.train(model, Task(f"{task.name}+replay", task.metric, {"train": mixed}), cfg)
        if cfg.method == "lora":
            model = model.merge_and_unload()
        yield model
