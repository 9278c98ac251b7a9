"""Examples, tasks, their loaders, knowledge packs, probe sets and batching."""

from cairn.data.loaders import load_task
from cairn.data.task import METRICS, SPLITS, Example, Task

__all__ = ["Example", "METRICS", "SPLITS", "Task", "load_task"]
