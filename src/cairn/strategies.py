"""Strategies turn a task stream into one model per stage. Each is a short generator in a registry.

A strategy receives the base model (its own copy), the stream, its typed options, the training
config, and a workspace that trains contributions or reuses identical ones; it yields the model
to evaluate after each stage. What the stream holds is the data boundary between settings:

- a semi-collaborative strategy gets each task's train split once, as the stage's `Task`, and the
  runner empties that split once the stage is done: earlier data cannot be read later;
- a strategy registered with `needs_history=True` (fully-collaborative only; or a function of its
  options, e.g. `moe` with a `trained` router) gets `(task, earlier_tasks)` pairs.

Strategies never see eval or test splits. What a strategy can run is declared with it (the
training methods it trains with, a check of its options against the training config), so an
experiment config is refused when it is read, before any model is loaded.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Literal

from pydantic import Field

from cairn.data.task import Task
from cairn.errors import ConfigError
from cairn.validation import Strict

if TYPE_CHECKING:
    from cairn.training import TrainConfig


class NoOptions(Strict):
    pass


TRAIN_METHODS = ("lora", "fft")  # TrainConfig.method's values


@dataclass(frozen=True)
class Strategy:
    fn: Callable[..., Iterator]
    options: type[Strict] = NoOptions
    needs_history: bool | Callable[[Strict], bool] = False  # reads earlier tasks' data (full setting only); may depend on the options
    methods: tuple[str, ...] = TRAIN_METHODS  # the training methods (TrainConfig.method) it trains with
    fits: Callable[[Strict, TrainConfig], None] | None = None  # raises ValueError/ConfigError where its options do not go with the training

    def reads_history(self, opts: Strict) -> bool:
        return self.needs_history(opts) if callable(self.needs_history) else self.needs_history

    def check(self, opts: Strict, cfg: TrainConfig) -> None:
        """Raise ValueError (its message follows "strategy NAME (kind KIND) ") where this strategy
        cannot run options `opts` with the training config `cfg`."""
        if cfg.method not in self.methods:
            raise ValueError(f"trains with method {' or '.join(self.methods)} only, got train method {cfg.method!r}; set train: {{method: {self.methods[0]}}}")
        if self.fits is not None:
            try:
                self.fits(opts, cfg)
            except ConfigError as exc:
                raise ValueError(f"with train method {cfg.method}: {exc}") from None


STRATEGIES: dict[str, Strategy] = {}


def register(kind: str, options: type[Strict] = NoOptions, needs_history: bool | Callable[[Strict], bool] = False, *,
             methods: tuple[str, ...] = TRAIN_METHODS, fits: Callable[[Strict, TrainConfig], None] | None = None):  # fmt: skip
    def add(fn):
        STRATEGIES[kind] = Strategy(fn, options, needs_history, tuple(methods), fits)
        return fn

    return add


class SequentialOptions(Strict):
    continue_adapter: bool = False


@register("sequential", SequentialOptions)
def sequential(model, stream, opts: SequentialOptions, cfg, work) -> Iterator:
    """Fine-tune on each task in turn. LoRA: merge each adapter and start a fresh one (the
    reference study's protocol), or keep training one adapter with `continue_adapter: true`."""
    for task in stream:
        model = work.train(model, task, cfg)
        if cfg.method == "lora" and not opts.continue_adapter:
            model = model.merge_and_unload()
        yield model


class ReplayOptions(Strict):
    rate: float = Field(0.1, ge=0, le=10, description="examples replayed from each earlier task, as a fraction of the current task (0: sequential training, the control)")


def replay_sample(n_from: int, k: int, rng: random.Random) -> list[int]:
    """`k` indices into a task of `n_from` examples: without repetition while it lasts, then again."""
    out: list[int] = []
    while len(out) < k:
        out += rng.sample(range(n_from), min(n_from, k - len(out)))
    return out


@register("replay", ReplayOptions, needs_history=True)
def replay(model, stream, opts: ReplayOptions, cfg, work) -> Iterator:
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


class JointOptions(Strict):
    mix: Literal["balanced", "natural"] = "balanced"


def joint_mixture(tasks: list[Task], mix: str, seed: int) -> list:
    """The union of the tasks' train splits; `balanced` upsamples each to the largest (seeded)."""
    if mix == "natural":
        return [ex for t in tasks for ex in t.train]
    size = max(len(t.train) for t in tasks)
    rng = random.Random(seed)
    return [t.train[i] for t in tasks for i in replay_sample(len(t.train), size, rng)]


@register("joint", JointOptions, needs_history=True)
def joint(model, stream, opts: JointOptions, cfg, work) -> Iterator:
    """At stage s, train from the base model on the union of tasks 1..s."""
    for task, earlier in stream:
        seen = [*earlier, task]
        # The union of one task is the task: stage 1 shares its contribution with the other strategies.
        union = Task("+".join(t.name for t in seen), task.metric, {"train": joint_mixture(seen, opts.mix, cfg.seed)}) if earlier else task
        yield work.train(copy.deepcopy(model), union, cfg)
from cairn.methods import olora as _olora  # noqa: E402,F401  registers "olora"
from cairn.methods import merge_strategy as _merge  # noqa: E402,F401  registers "merge"
from cairn.methods import moe_strategy as _moe  # noqa: E402,F401  registers "moe"
