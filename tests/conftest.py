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
