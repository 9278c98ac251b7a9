"""Shared test helpers: offline hub, the tiny-random model, and a writer for task files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TRACE = SHARED_DATA / "trace-500"
# The provenance a merge or mixture records in its manifest, for tests that call the methods directly.
MADE_FROM = {"base": "tiny-random", "base_fingerprint": "0" * 64}


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the deterministic tiny-random Llama; callers must not mutate it."""
    from cairn.models import load_model

    return load_model("tiny-random")


@pytest.fixture
def write_jsonl(tmp_path):
    def write(records, name="task.jsonl") -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return path

    return write


def qa(n: int, **extra) -> list[dict]:
    """n distinct prompt/answer records."""
    return [{"prompt": f"Question: what is item {i}?\nAnswer:", "answer": f"thing{i}", **extra} for i in range(n)]


def code_tasks(folder: Path, names=("alpha", "beta")) -> list[str]:
    """JSONL task files of 6 train and 6 test `Question: NAME code i?` examples each."""
    paths = []
    for name in names:
        path = folder / f"{name}.jsonl"
        rows = [{"prompt": f"Question: {name} code {i}?\nAnswer:", "answer": f"{name[:2]}{i}", "split": s} for i in range(6) for s in ("train", "test")]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(str(path))
    return paths


def stored_contribution(folder: Path) -> tuple[Path, Path]:
    """(store, other base): a tiny-random contribution added to a store as `mine`, and a copy of
    tiny-random with one weight changed, on which that contribution must be refused."""
    import shutil

    from safetensors.torch import load_file, save_file

    from cairn.data import Example, Task
    from cairn.models import resolve_folder
    from cairn.store import Store
    from cairn.options import TrainConfig
    from cairn.contributions import train_contribution

    task = Task("t", "exact", {"train": [Example(f"q{i}", f"a{i}") for i in range(4)]})
    train_contribution("tiny-random", task, TrainConfig(epochs=1, batch_size=4), folder / "c", progress=False)
    Store(folder / "s").add(folder / "c", "mine")
    other = folder / "other-base"
    shutil.copytree(resolve_folder("tiny-random"), other)
    weights = load_file(other / "model.safetensors")
    weights["model.norm.weight"] += 1
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    return folder / "s", other
