"""The probe source `lm-eval:TASK1,TASK2,...`: general ability measured by lm-evaluation-harness
(run by cairn.evaluation.lm_eval_probe).

Options after `?`: `fewshot=N` (lm-eval's num_fewshot), `limit=N` (examples per task), `batch=N`,
and `include=DIR` (a folder of task YAML files, for custom or offline tasks), e.g.
`lm-eval:arc_easy,hellaswag?fewshot=0&limit=200` or `lm-eval:my_task?include=tasks/`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

from cairn.errors import DataError

PREFIX = "lm-eval:"
OPTIONS = {"fewshot": int, "limit": int, "batch": int, "include": str}


@dataclass
class LmEvalProbe:
    """A probe run by lm-evaluation-harness; `evaluate_task` scores it like a Cairn task."""

    tasks: list[str]
    fewshot: int | None = None
    limit: int | None = None
    batch: int = 16
    include: str | None = None
    name: str = "lm-eval"
    metric: str = "lm-eval"
    source: str = field(default="", repr=False)

    def data_hash(self) -> str:
        """Identifies what is measured (source, lm-eval version, the include folder's YAML files),
        so cached scores are reused only for the same measurement."""
        from importlib.metadata import version

        h = hashlib.sha256(json.dumps([self.source, version("lm_eval")]).encode())
        if self.include:
            for f in sorted(Path(self.include).rglob("*")):
                if f.is_file():
                    h.update(f.name.encode() + f.read_bytes())
        return h.hexdigest()

    def split(self, name: str) -> list:
        return []  # lm-eval holds the data; nothing here for Cairn's own loops


def parse_probe(source: str) -> LmEvalProbe:
    """`lm-eval:TASKS[?options]` -> LmEvalProbe; a DataError naming the bad part otherwise."""
    spec, _, query = source.removeprefix(PREFIX).partition("?")
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    if not tasks:
        raise DataError(f"{source}: no lm-eval task named; expected lm-eval:TASK1,TASK2[?fewshot=N&limit=N&include=DIR]")
    options = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in OPTIONS:
            raise DataError(f"{source}: unknown option {key!r}; expected one of {', '.join(OPTIONS)}")
        try:
            options[key] = OPTIONS[key](value)
        except ValueError:
            raise DataError(f"{source}: option {key}={value!r} is not a whole number") from None
        if OPTIONS[key] is int and options[key] < (0 if key == "fewshot" else 1):
            raise DataError(f"{source}: option {key} must be at least {0 if key == 'fewshot' else 1}, got {options[key]}")
    if "include" in options and not Path(options["include"]).is_dir():
        raise DataError(f"{source}: include folder {options['include']!r} not found")
    name = "lm-eval:" + ",".join(tasks)
    return LmEvalProbe(tasks, name=name, source=source, **options)
