"""Strategies turn a task stream into one model per stage. Each is a short generator in a registry.

A strategy receives the base model (its own copy), the stream (one task at a time), its spec,
the training config, and a workspace that trains contributions or reuses identical ones. It
yields the model to evaluate after each stage.
"""

from __future__ import annotations

from typing import Callable, Iterator

STRATEGIES: dict[str, Callable] = {}


def register(kind: str):
    def add(fn):
        STRATEGIES[kind] = fn
        return fn

    return add


@register("sequential")
def sequential(model, stream, spec, cfg, work) -> Iterator:
    """Fine-tune on each task in turn. LoRA: merge each adapter and start a fresh one (the
    reference study's protocol), or keep training one adapter with `continue_adapter: true`."""
    for task in stream:
        model = work.train(model, task, cfg)
        if cfg.method == "lora" and not spec.continue_adapter:
            model = model.merge_and_unload()
        yield model
