"""Turn a task source (file, TRACE folder, `datasets` folder, `pack:NAME`, `probe:NAME`) into a `Task`.

A file or folder source may end in `?limit=N`: each split cut to a seeded sample of at most N
examples (as a config's `limit`), for a quick look at a large task.

Every user error names the file, the line or record and what was expected.
"""

from __future__ import annotations

import json
import random
import sys
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qsl

from cairn.data.lm_eval import parse_probe
from cairn.data.packs import make_pack
from cairn.data.task import METRICS, SPLITS, Example, Task
from cairn.errors import DataError

# TRACE's metric per task (folder name), as the TRACE benchmark scores them.
TRACE_METRICS = {
    "C-STANCE": "choice",
    "FOMC": "choice",
    "ScienceQA": "choice",
    "NumGLUE-cm": "exact",
    "NumGLUE-ds": "exact",
    "Py150": "edit_sim",
    "20Minuten": "sari",
    "MeetingBank": "rouge_l",
    "Lima": "rouge_l",
}
SPLIT_ALIASES = {"train": "train", "eval": "eval", "validation": "eval", "dev": "eval", "test": "test"}
_EXTS = (".json", ".jsonl")
PROBES = {"general": "general.jsonl"}  # built-in probe sets (questions about real-world facts the base model answers), in data/probes/


def load_task(source: str, *, metric: str | None = None, name: str | None = None, seed: int = 0) -> Task:
    """Load any task source; `metric` overrides the inferred metric, `seed` drives the 80/10/10 split."""
    if metric is not None and metric not in METRICS:
        raise DataError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    source = str(source)
    if source.startswith("lm-eval:"):  # measured by lm-evaluation-harness: a probe, not a Task
        if metric:
            raise DataError(f"{source}: an lm-eval probe takes each task's own metric (acc_norm, else acc, else exact_match); drop the metric")
        probe = parse_probe(source)
        probe.name = name or probe.name
        return probe
    if source.startswith("pack:"):
        task = _load_pack(source)
    elif source.startswith("probe:"):
        task = load_probe(source.split(":", 1)[1])
    else:
        source, path, limit = _existing_path(source, "a .json/.jsonl file, a folder, pack:NAME or probe:NAME")
        if path.is_dir():
            task = _load_folder(path, seed)
        else:
            task = _from_records(path.stem, _read_records(path), "exact", seed, str(path))
        if limit is not None:
            task = task.limited(dict.fromkeys(SPLITS, limit), seed)
    if metric:
        task.metric = metric
    if name:
        task.name = name
    if not any(task.splits.values()):
        raise DataError(f"{source}: no examples")
    return task


def load_train_split(source: str, *, seed: int = 0) -> Task:
    """The train split alone of a task source, for data used only as training material (general
    data replayed beside the tasks, as TRACE replays Lima): a TRACE or datasets folder is read for
    its train split only (its eval and test may be empty or absent), a file's records marked with
    another split are skipped unread, and a file without splits is all train (no 80/10/10 cut).
    `pack:NAME` gives its train split; `?limit=N` cuts it to a seeded sample."""
    source = str(source)
    if source.startswith(("lm-eval:", "probe:")):
        raise DataError(f"{source}: an evaluation set has no training examples; give a file, a folder or pack:NAME")
    if source.startswith("pack:"):
        pack = _load_pack(source)
        return Task(pack.name, "exact", {"train": pack.train})
    _, path, limit = _existing_path(source, "a .json/.jsonl file, a folder or pack:NAME")
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        examples = _hf_train_rows(path)
    elif path.is_dir():
        files = [path / f"train{ext}" for ext in _EXTS if (path / f"train{ext}").is_file()]
        if not files:
            raise DataError(f"{path}: no train.json or train.jsonl (a replay-only source needs its train split, nothing else)")
        examples = read_examples(files[0])
    else:
        records = _read_records(path)
        marked = [(w, r) for w, r in records if isinstance(r, dict) and "split" in r]
        if marked:
            records = [(w, r) for w, r in marked if isinstance(r["split"], str) and SPLIT_ALIASES.get(r["split"]) == "train"]
        examples = [_example(r, f"{path} {w}") for w, r in records]
    if not examples:
        raise DataError(f"{source}: no training examples")
    task = Task(path.name if path.is_dir() else path.stem, "exact", {"train": examples})
    return task.limited({"train": limit}, seed) if limit is not None else task


def _hf_train_rows(path: Path) -> list[Example]:
    """A datasets folder's train split (a DatasetDict's `train`; a single Dataset: every row)."""
    from datasets import DatasetDict

    ds = _load_from_disk(path)
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: no train split (has {', '.join(ds)}); a replay-only source needs its train split")
        ds = ds["train"]
    return [_example(row, f"{path} row {i}") for i, row in enumerate(ds)]


def _existing_path(source: str, expected: str) -> tuple[str, Path, int | None]:
    """(the path as written, the path, limit) of a file or folder source `PATH?limit=N` that exists;
    else a DataError saying what was `expected`."""
    text, limit = path_source(source)
    try:
        path = Path(text).expanduser()
    except RuntimeError as exc:  # `~user` for a user who does not exist
        raise DataError(f"task source not found: {text} ({exc})") from exc
    if not path.exists():
        raise DataError(f"task source not found: {text} (expected {expected})")
    return text, path, limit


def _load_from_disk(path: Path):
    """A `datasets` folder saved with save_to_disk; a damaged one is a DataError naming it."""
    from datasets import load_from_disk

    try:
        return load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for a damaged folder
        raise DataError(f"{path}: cannot load the datasets folder ({exc})") from exc


def path_source(source: str) -> tuple[str, int | None]:
    """(path, limit) of a file or folder source `PATH?limit=N`; a path that exists as written keeps its '?'."""
    path, mark, query = source.rpartition("?")
    if not mark or Path(source).expanduser().exists():
        return source, None
    options = dict(parse_qsl(query, keep_blank_values=True))
    if set(options) != {"limit"}:
        raise DataError(f"{source}: {query!r} after '?' is not an option of a file or folder source, which takes limit=N (or no such file: {path})")
    if not (options["limit"].isascii() and options["limit"].isdigit() and 0 < int(options["limit"]) < 10**12):
        raise DataError(f"{source}: limit must be a whole number of examples, at least 1, got {options['limit']!r}")
    return path, int(options["limit"])


def load_probe(name: str) -> Task:
    """A built-in probe set as a Task (metric `exact`) in two halves: the odd-numbered questions are
    its eval split, which tuning chooses on, the even-numbered ones (the first, third, ...) its test
    split, which scores; interleaving keeps each kind of question in both halves."""
    if name not in PROBES:
        raise DataError(f"unknown probe set {name!r}; available: {', '.join(PROBES)}")
    with resources.as_file(resources.files("cairn.data") / "probes" / PROBES[name]) as path:
        examples = read_examples(path)
    return Task(f"probe:{name}", "exact", {"eval": examples[1::2], "test": examples[::2]})


def _load_pack(source: str) -> Task:
    """`pack:NAME`, optionally `pack:NAME?facts=N&seed=S`."""
    name, _, query = source.split(":", 1)[1].partition("?")
    options = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in ("facts", "seed"):
            raise DataError(f"{source}: unknown pack option {key!r}; allowed: facts, seed")
        digits = value.removeprefix("-")
        if not (digits.isascii() and digits.isdigit() and len(digits) <= 18):
            raise DataError(f"{source}: option {key!r} must be an integer (at most 18 digits), got {value!r}")
        options[key] = int(value)
    task = make_pack(name, options.get("facts", 50), options.get("seed", 0))
    if query:
        task.name = f"{name}-{options['facts']}" if set(options) == {"facts"} else f"{name}?{query}"
    return task


def _load_folder(path: Path, seed: int) -> Task:
    metric = TRACE_METRICS.get(path.name, "exact")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _load_hf_dataset(path, metric, seed)
    files = {split: path / f"{split}{ext}" for split in SPLITS for ext in _EXTS if (path / f"{split}{ext}").is_file()}
    if not files:
        raise DataError(
            f"{path}: expected a TRACE-layout folder (train.json / eval.json / test.json, or .jsonl) "
            "or a Hugging Face datasets folder saved with save_to_disk"
        )
    return Task(path.name, metric, {split: read_examples(file) for split, file in files.items()})


def _load_hf_dataset(path: Path, metric: str, seed: int) -> Task:
    from datasets import Dataset, DatasetDict

    ds = _load_from_disk(path)
    if isinstance(ds, Dataset):
        records = [(f"row {i}", row) for i, row in enumerate(ds)]
        return _from_records(path.name, records, metric, seed, str(path))
    assert isinstance(ds, DatasetDict)
    splits: dict[str, list[Example]] = {}
    for split_name, part in ds.items():
        split = SPLIT_ALIASES.get(split_name)
        if split is None:
            raise DataError(f"{path}: unknown split {split_name!r}; expected one of train, eval (or validation), test")
        missing = {"prompt", "answer"} - set(part.column_names)
        if missing:
            raise DataError(f"{path} split {split_name!r}: missing column(s) {sorted(missing)}; has {part.column_names}")
        splits[split] = [_example(row, f"{path} split {split_name} row {i}") for i, row in enumerate(part)]
    return Task(path.name, metric, splits)


def read_examples(path: Path) -> list[Example]:
    """Every record of a JSON / JSONL file as an Example (any `split` field is ignored)."""
    return [_example(r, f"{path} {where}") for where, r in _read_records(path)]


def _read_records(path: Path) -> list[tuple[str, object]]:
    """(location, record) pairs from a JSON list or a JSONL file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from exc
    if not text.strip():
        raise DataError(f"{path}: empty file; expected JSON records with 'prompt' and 'answer'")
    if path.suffix != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            # A .json file holding one object per line is JSONL in disguise: read it by lines.
            if exc.msg != "Extra data":
                raise DataError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from exc
        except (ValueError, RecursionError) as exc:
            raise DataError(f"{path}: not valid JSON ({_json_problem(exc)})") from exc
        else:
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of {{\"prompt\", \"answer\"}} objects, got {type(data).__name__}")
            if not data:
                raise DataError(f"{path}: empty list; expected records with 'prompt' and 'answer'")
            return [(f"record {i}", r) for i, r in enumerate(data)]
    records = []
    # Split on newlines only: JSON strings may hold other line breaks (U+2028, U+0085) raw.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append((f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
        except (ValueError, RecursionError) as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({_json_problem(exc)})") from exc
    return records


def _json_problem(exc: Exception) -> str:
    """Why `json.loads` failed without a JSONDecodeError: nesting too deep, or a huge integer."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if "Exceeds the limit" in str(exc):
        return f"an integer with more than {sys.get_int_max_str_digits()} digits"
    return str(exc)


def _example(record, where: str) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with 'prompt' and 'answer', got {type(record).__name__}")
    values = {}
    for key in ("prompt", "answer"):
        if key not in record:
            raise DataError(f"{where}: missing field {key!r}")
        value = record[key]
        if not isinstance(value, str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise DataError(f"{where}: field {key!r} is empty")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # a JSON escape like "\ud800" that decodes to half a character
            raise DataError(
                f"{where}: field {key!r} is not valid Unicode (unpaired surrogate {value[exc.start]!r} at character {exc.start})"
            ) from exc
        values[key] = value
    return Example(values["prompt"], values["answer"])


def _from_records(name: str, records: list[tuple[str, object]], metric: str, seed: int, origin: str) -> Task:
    """Records with a `split` field go where they say; without one, a seeded 80/10/10 split."""
    with_split = [(w, r) for w, r in records if isinstance(r, dict) and "split" in r]
    if with_split and len(with_split) != len(records):
        where = next(w for w, r in records if not (isinstance(r, dict) and "split" in r))
        raise DataError(f"{origin} {where}: missing field 'split' (other records have one; give it to all or none)")
    if with_split:
        splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
        for where, r in records:
            raw = r["split"]
            split = SPLIT_ALIASES.get(raw) if isinstance(raw, str) else None
            if split is None:
                raise DataError(f"{origin} {where}: unknown split {raw!r}; expected one of train, eval, test")
            splits[split].append(_example(r, f"{origin} {where}"))
        return Task(name, metric, splits)
    examples = [_example(r, f"{origin} {w}") for w, r in records]
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_test = n_eval = len(examples) // 10
    test = [examples[i] for i in order[:n_test]]
    evals = [examples[i] for i in order[n_test : n_test + n_eval]]
    train = [examples[i] for i in order[n_test + n_eval :]]
    return Task(name, metric, {"train": train, "eval": evals, "test": test})
