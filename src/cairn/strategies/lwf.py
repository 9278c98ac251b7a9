"""The `lwf` strategy: sequential training distilled to the previous stage's model on the current
task's data (methods/lwf.py); semi-collaborative."""

from __future__ import annotations

import copy
from typing import Iterator

from cairn.methods.lwf import Distillation
from cairn.options import LwFOptions, TrainConfig
from cairn.strategies.l2 import note_penalty
from cairn.workspace import Workspace


def run(model, stream, opts: LwFOptions, cfg: TrainConfig, work: Workspace) -> Iterator:
    """As `sequential` (LoRA: each adapter merged, a fresh one per stage), with stage s ≥ 2's loss +
    λ · KL(previous model ‖ current) on its own batches; stage 1 has no previous stage to keep and is
    the task's plain contribution, shared with `sequential` through the cache. The teacher is the
    model the stage starts from: for LoRA the same weights with the new adapter disabled (no copy),
    for FFT a frozen copy. Each distilled stage records `penalty_ratio`, the term over the task loss."""
    for s, task in enumerate(stream, 1):
        if s == 1 or not opts.lambda_:
            model = work.train(model, task, cfg)
        else:
            teacher = None if work.config_for(task, cfg).method == "lora" else copy.deepcopy(model).eval().requires_grad_(False)
            with Distillation(model, teacher, opts.lambda_, opts.temperature) as loss:
                model = work.train(model, task, cfg, extra_loss=loss, key=("lwf", opts.model_dump()))
            del teacher
            note_penalty(work)
        if cfg.method == "lora":
            model = model.merge_and_unload()
        yield model
