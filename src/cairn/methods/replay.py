"""Drawing replayed examples: from earlier tasks (`replay`) or into a balanced union of tasks (`joint`)."""

from __future__ import annotations

import random

from cairn.data.task import Task


def replay_sample(n_from: int, k: int, rng: random.Random) -> list[int]:
    """`k` indices into a task of `n_from` examples: without repetition while it lasts, then again."""
    out: list[int] = []
    while len(out) < k:
        out += rng.sample(range(n_from), min(n_from, k - len(out)))
    return out


def joint_mixture(tasks: list[Task], mix: str, seed: int) -> list:
    """The union of the tasks' train splits; `balanced` upsamples each to the largest (seeded)."""
    if mix == "natural":
        return [ex for t in tasks for ex in t.train]
    size = max(len(t.train) for t in tasks)
    rng = random.Random(seed)
    return [t.train[i] for t in tasks for i in replay_sample(len(t.train), size, rng)]
