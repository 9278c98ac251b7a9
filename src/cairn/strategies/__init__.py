"""Strategies turn a task stream into one model per stage. Each kind is one short file; STRATEGIES lists them.

A strategy receives the base model (its own copy), the stream, its typed options, the training
config, and a workspace that trains contributions or reuses identical ones; it yields the model
to evaluate after each stage. What the stream holds is the data boundary between settings:

- a semi-collaborative strategy gets each task's train split once, as the stage's `Task`, and the
  runner empties that split once the stage is done: earlier data cannot be read later;
- a kind whose options' `reads_history()` is true (fully-collaborative only: `replay`, `joint`,
  `moe` with a `trained` router) gets `(task, earlier_tasks)` pairs.

Strategies never see eval or test splits. What a kind can run is declared with its options
(`cairn.options.STRATEGY_OPTIONS`: the training methods it trains with, a check of its options against the training config), so an
experiment config is refused when it is read, before any model is loaded.
"""

from __future__ import annotations

from typing import Callable, Iterator

from cairn.options import STRATEGY_OPTIONS
from cairn.strategies import ewc, joint, l2, lwf, magmax, merge, moe, olora, opcm, osf, replay, sequential

# kind -> run(model, stream, opts, cfg, work), yielding the model of each stage. Each kind's
# options, and what it declares it can run, are its `STRATEGY_OPTIONS` entry (importable without torch).
STRATEGIES: dict[str, Callable[..., Iterator]] = {
    "sequential": sequential.run,
    "replay": replay.run,
    "joint": joint.run,
    "olora": olora.run,
    "merge": merge.run,
    "moe": moe.run,
    "l2": l2.run,
    "ewc": ewc.run,
    "magmax": magmax.run,
    "lwf": lwf.run,
    "opcm": opcm.run,
    "osf": osf.run,
}
if STRATEGIES.keys() != STRATEGY_OPTIONS.keys():
    raise ImportError(f"cairn.strategies.STRATEGIES {sorted(STRATEGIES)} and cairn.options.STRATEGY_OPTIONS {sorted(STRATEGY_OPTIONS)} must name the same kinds")
