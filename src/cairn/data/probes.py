"""Probe sets: questions about real-world facts the base model already answers (old knowledge)."""

from __future__ import annotations

from importlib import resources

from cairn.data.task import Task
from cairn.errors import DataError

PROBES = {"general": "general.jsonl"}


def load_probe(name: str) -> Task:
    """A built-in probe set as a Task whose test split holds every question (metric `exact`)."""
    if name not in PROBES:
        raise DataError(f"unknown probe set {name!r}; available: {', '.join(PROBES)}")
    from cairn.data.loaders import read_examples

    with resources.as_file(resources.files("cairn.data") / "probes" / PROBES[name]) as path:
        examples = read_examples(path)
    return Task(f"probe:{name}", "exact", {"test": examples})
