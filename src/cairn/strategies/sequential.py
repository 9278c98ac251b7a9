"""The `sequential` strategy: fine-tune on each task in turn (the reference study's baseline)."""

from __future__ import annotations

from typing import Iterator

from cairn.options import SequentialOptions, TrainConfig
from cairn.workspace import Workspace


def run(model, stream, opts: SequentialOptions, cfg: TrainConfig, work: Workspace) -> Iterator:
    """Fine-tune on each task in turn. LoRA: merge each adapter and start a fresh one (the
    reference study's protocol), or keep training one adapter with `continue_adapter: true`."""
    for task in stream:
        model = work.train(model, task, cfg)
        if cfg.method == "lora" and not opts.continue_adapter:
            model = model.merge_and_unload()
        yield model
