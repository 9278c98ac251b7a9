"""Property-based tests (hypothesis): bad input never gives a raw traceback.

Three surfaces, 1000 generated inputs each (mostly malformed):

- data loaders: `load_task` on generated JSONL / JSON files and TRACE-layout folders. Either the
  task loads and is well-formed, or a `CairnError` names the file (and the line or record);
- config files: `load_config` on generated YAML text and on mutations of `QUICKSTART`. Either an
  `ExperimentConfig`, or a `ConfigError` that names the file and the offending key;
- CLI arguments: `cairn.cli.main(argv)` on generated argument lists. It returns one of the
  documented exit codes (0, 2, 3, 4, 5) and, when non-zero, stderr's last line starts with `cairn`
  or `usage:`. Training, evaluation, generation, merging and experiments are replaced by stubs
  that run after the checks of the `cairn.api` function each command calls (and assert what it
  must have checked); nothing loads a model.

Any other exception is a failure. The three tests take well under 90 s on 2 cores.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cairn.cli import main
from cairn.config import QUICKSTART, ExperimentConfig, load_config
from cairn.data import Example, load_task
from cairn.data.loaders import TRACE_METRICS
from cairn.errors import CairnError, ConfigError, ModelError
from cairn.manifest import file_hashes, write_manifest

FUZZ = settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# ---------------------------------------------------------------------------------------------
# Building blocks

# Text without lone surrogates (which cannot be written as UTF-8) and without NUL.
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
# Every character JSON strings may hold once decoded, unpaired surrogates included.
ANY_TEXT = st.text(max_size=12)
JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANY_TEXT, inner, max_size=3), max_leaves=8
)
# Line and paragraph separators, which JSON strings may hold raw, and a few other odd characters.
ODD_CHARS = st.sampled_from(["\u2028", "\u2029", "\x85", "\x1c", "\x1d", "\x1e", "\x0b", "\x0c", "\r", "\ufeff", "é", "字"])
# Non-blank text: a visible core with anything around it.
GOOD_TEXT = st.builds(
    lambda before, core, after: "".join(before) + core + "".join(after),
    st.lists(TEXT | ODD_CHARS, max_size=2),
    st.text(st.characters(whitelist_categories=("L", "N", "P", "S")), min_size=1, max_size=6),
    st.lists(TEXT | ODD_CHARS, max_size=2),
)


def _serialise(record, ascii_only: bool) -> str:
    return json.dumps(record, ensure_ascii=ascii_only)


def scratch() -> tempfile.TemporaryDirectory:
    """A fresh temporary folder, in memory where the system has /dev/shm (thousands are made)."""
    return tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)


# ---------------------------------------------------------------------------------------------
# Surface 1: data loaders

GOOD_RECORD = st.fixed_dictionaries({"prompt": GOOD_TEXT, "answer": GOOD_TEXT})
FIELD_VALUE = st.one_of(GOOD_TEXT, st.just(""), st.just(" \t"), st.just("\ud800"), JSON_VALUES)
SPLIT_VALUE = st.sampled_from(["train", "eval", "test", "validation", "dev", "training", "TEST", ""]) | JSON_VALUES
BAD_RECORD = st.one_of(
    st.fixed_dictionaries({}, optional={"prompt": FIELD_VALUE, "answer": FIELD_VALUE, "split": SPLIT_VALUE, "x": JSON_VALUES}),
    JSON_VALUES,
)
GARBAGE_LINE = st.one_of(
    ANY_TEXT,
    st.sampled_from(['{"prompt": "p", "answer": ', "{", "[", "]", "}", '"', "NaN", "-", "1e999", "\ufeff{}", "{}{}"]),
    st.integers(1, 6000).map(lambda n: "9" * n),  # past Python's 4300-digit integer limit
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),  # past the JSON parser's nesting limit
    st.integers(1, 3000).map(lambda n: '{"a":' * n + "1" + "}" * n),
)


@st.composite
def jsonl_text(draw) -> tuple[str, int | None]:
    """(text, number of records if all are valid): lines of records, sometimes with garbage."""
    good = draw(st.booleans())
    if good:
        records = draw(st.lists(GOOD_RECORD, min_size=1, max_size=6))
        if draw(st.booleans()):
            for r in records:
                r["split"] = draw(st.sampled_from(["train", "eval", "test", "validation", "dev"]))
        lines = [_serialise(r, draw(st.booleans())) for r in records]
    else:
        lines = draw(st.lists(st.one_of(GOOD_RECORD.map(json.dumps), BAD_RECORD.map(json.dumps), GARBAGE_LINE), min_size=1, max_size=6))
    blanks = draw(st.lists(st.sampled_from(["", " ", "\t"]), max_size=2))
    for b in blanks:
        lines.insert(draw(st.integers(0, len(lines))), b)
    sep = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    return sep.join(lines) + draw(st.sampled_from(["", sep])), len(records) if good else None


@st.composite
def json_text(draw) -> tuple[str, int | None]:
    """(text, number of records if all are valid): a JSON list of records, or some other JSON."""
    if draw(st.booleans()):
        records = draw(st.lists(GOOD_RECORD, min_size=1, max_size=6))
        return _serialise(records, draw(st.booleans())), len(records)
    data = draw(st.one_of(st.lists(st.one_of(GOOD_RECORD, BAD_RECORD), max_size=6), JSON_VALUES))
    return json.dumps(data, indent=draw(st.sampled_from([None, 1]))), None


@st.composite
def file_content(draw) -> tuple[bytes, tuple[str, int] | None]:
    """(bytes, (format, number of records) when the content is valid)."""
    kind = draw(st.sampled_from(["jsonl", "json", "bytes", "corrupt", "deep", "blank"]))
    if kind in ("jsonl", "json"):
        text, n = draw(jsonl_text() if kind == "jsonl" else json_text())
        return text.encode("utf-8", "surrogatepass"), (kind, n) if n else None
    if kind == "bytes":
        return draw(st.binary(max_size=200)), None
    if kind == "corrupt":
        text, _ = draw(jsonl_text() | json_text())
        data = bytearray(text.encode("utf-8", "surrogatepass"))
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(data)))
            op = draw(st.sampled_from(["insert", "delete", "truncate"]))
            if op == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=3))
            elif op == "delete":
                del data[at : at + 1]
            else:
                del data[at:]
        return bytes(data), None
    if kind == "deep":
        n = draw(st.integers(500, 100_000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"prompt":', "}")]))
        return (opener * n + "1" + closer * n).encode(), None
    return draw(st.text(" \t\r\n\x0b\x0c", max_size=5)).encode(), None


def assert_well_formed(task) -> None:
    assert set(task.splits) >= {"train", "eval", "test"}
    assert any(task.splits.values())
    for examples in task.splits.values():
        for ex in examples:
            assert isinstance(ex, Example)
            for value in (ex.prompt, ex.answer):
                assert isinstance(value, str) and value.strip()
                value.encode("utf-8")  # tokenizers and hashes need real Unicode
    task.data_hash()


_PER_RECORD = re.compile(r"missing field|field '\w+' (must|is)|expected an object|unknown split|not valid Unicode")


def assert_names_the_place(exc: CairnError, path: Path) -> None:
    msg = str(exc)
    assert str(path) in msg, f"message does not name {path}: {msg}"
    if _PER_RECORD.search(msg):
        assert re.search(r"\b(line|record|row) \d+", msg), f"message does not name the line or record: {msg}"
    if "not valid JSON" in msg and not re.search(r"nested too deeply|digits\)", msg):
        assert re.search(r":\d+: not valid JSON", msg), f"message does not give the line: {msg}"


@st.composite
def trace_folder(draw) -> dict[str, object]:
    """{file name: bytes, or None for a sub-folder} of a TRACE-layout (or broken) task folder."""
    names = draw(st.lists(st.sampled_from(["train.json", "eval.json", "test.json", "train.jsonl", "test.jsonl", "dev.json", "notes.txt"]), max_size=4, unique=True))
    files: dict[str, object] = {}
    for name in names:
        if draw(st.integers(0, 9)) == 0:
            files[name] = None  # a folder where a file is expected
        else:
            files[name] = draw(file_content())[0]
    if draw(st.integers(0, 19)) == 0:
        files[draw(st.sampled_from(["dataset_dict.json", "state.json"]))] = draw(st.binary(max_size=40) | st.just(b"{}"))
    return files


TASK_SOURCES = st.one_of(
    st.tuples(st.just("file"), st.sampled_from([".jsonl", ".json", ".txt"]), file_content()),
    st.tuples(st.just("folder"), st.sampled_from(["task", *TRACE_METRICS]), trace_folder()),
)


@FUZZ
@given(source=TASK_SOURCES)
def test_fuzz_data_loaders(source):
    """A task file (JSONL, JSON, bytes, corrupted, too deep) or a TRACE-layout folder of such files."""
    kind, name, content = source
    with scratch() as tmp:
        if kind == "file":
            path = Path(tmp) / f"task{name}"
            data, valid = content
            path.write_bytes(data)
            # Valid records must load whole: JSONL from a .jsonl file, a JSON list from any other.
            must_load = valid is not None and (valid[0] == "jsonl") == (name == ".jsonl")
        else:
            path = Path(tmp) / name
            path.mkdir()
            for fname, data in content.items():
                if data is None:
                    (path / fname).mkdir()
                else:
                    (path / fname).write_bytes(data)
            must_load = False
        try:
            task = load_task(str(path))
        except CairnError as exc:
            event(f"{kind}: {type(exc).__name__}")
            assert not must_load, f"valid records were refused: {exc}"
            assert_names_the_place(exc, path)
        else:
            event(f"{kind}: loaded")
            assert_well_formed(task)
            if must_load:
                assert sum(map(len, task.splits.values())) == valid[1]
            if kind == "folder":
                assert task.metric == TRACE_METRICS.get(name, "exact")


# ---------------------------------------------------------------------------------------------
# Surface 2: config files

YAML_BITS = [
    "name: x\n", "tasks: [pack:people]\n", "strategies: [{name: s, kind: sequential}]\n", "probe: null\n",
    "train: {epochs: 1}\n", "seeds: [0, 1]\n", "setting: semi\n", "- ", ": ", "[", "]", "{", "}", ", ", "\n", "  ",
    "&a ", "*a ", "*b ", "!!binary x", "!!int abc", "!!float x", "!!str ", "!!map ", "!!set {a}", "!!omap [a]",
    "!!timestamp 2001-13-01", "!!timestamp x", "!!bool x", "!!int ''", "2001-13-01", "2001-02-30", "0000-01-01", "2001-01-01 25:00:00",
    "!!python/object:os.system ", "<<: 5\n", "<<: *a\n", "? [a]\n: b\n", "? {a: b}\n: c\n", "\t", "'", '"',
    '"\\ud800"', '"\\x00"', "%YAML 1.1\n---\n", "%TAG ! x\n", "--- \n", "...\n", "|\n  x\n", ">-\n y\n",
    "1e999", ".nan", "-.inf", "~", "null", "yes", "0x1F", "0o17", "1_000", "0b102", "9" * 5000, "é", "\x85", "\u2028",
]
YAML_TEXT = st.one_of(
    st.lists(st.sampled_from(YAML_BITS) | TEXT, max_size=30).map("".join),
    st.integers(1, 600).map(lambda n: "a: " + "[" * n + "]" * n),  # PyYAML gives up near 400 levels
    st.integers(1, 600).map(lambda n: "{a: " * n + "1" + "}" * n),
    st.integers(1, 300).map(lambda n: "".join(f"{' ' * i}k{i}:\n" for i in range(n)) + " " * n + "x"),
)

STRATEGY_OPTIONS = ["continue_adapter", "rate", "mix", "lambda1", "lambda2", "method", "density", "lambda", "normalize", "seed", "options"]
TRAIN_FIELDS = [
    "method", "epochs", "lr", "batch_size", "grad_accum", "warmup_ratio", "scheduler", "weight_decay", "max_grad_norm",
    "lora_r", "lora_alpha", "lora_dropout", "target_modules", "max_length", "seed", "bf16",
]
PLAIN_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)
BAD_VALUES = st.one_of(
    PLAIN_VALUES,
    st.sampled_from([-1, 0, -0.5, 1e300, float("nan"), float("inf"), "", "lora", "fft", "semi", "full", "ties", "x", [], {}, True, 10**30]),
    st.dictionaries(st.integers() | TEXT, PLAIN_VALUES, min_size=1, max_size=2),  # keys that are not strings
)


def _paths(node, prefix=()):
    """Every path into a nested dict/list structure."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _get(node, path):
    for p in path:
        node = node[p]
    return node


@st.composite
def mutated_config(draw) -> tuple[dict, list[str]]:
    """(a QUICKSTART mutated once, words one of which a refusal must name)."""
    cfg = copy.deepcopy(QUICKSTART)
    op = draw(st.sampled_from(["set", "delete", "unknown", "kind", "option", "train", "duplicate", "semi", "seeds", "tasks"]))
    strategies = cfg["strategies"]
    i = draw(st.integers(0, len(strategies) - 1))
    strategy = strategies[i]
    touched = op in ("kind", "option")  # whether the mutation is inside strategies[i]
    if op in ("set", "delete"):
        paths = [p for p in _paths(cfg) if p and (op == "set" or isinstance(p[-1], str))]
        path = draw(st.sampled_from(paths))
        if op == "set":
            _get(cfg, path[:-1])[path[-1]] = draw(BAD_VALUES)
        else:
            del _get(cfg, path[:-1])[path[-1]]
        words = [p for p in path if isinstance(p, str)]
        touched = path[:2] == ("strategies", i) and len(path) > 2
    elif op == "unknown":
        where = draw(st.sampled_from([(), ("train",), ("strategies", i), ("strategies", i, "train")]))
        target = _get(cfg, where[:-1]).setdefault("train", {}) if where[-1:] == ("train",) else _get(cfg, where)
        key = draw(st.integers() | TEXT.filter(lambda k: k not in (*QUICKSTART, *STRATEGY_OPTIONS, *TRAIN_FIELDS, "name", "kind", "train")))
        target[key] = draw(PLAIN_VALUES)
        words = [repr(key), str(key)]
        touched = bool(where[:1])
    elif op == "kind":
        strategy["kind"] = draw(st.sampled_from(["sequential", "replay", "joint", "olora", "merge", "Sequential", ""]) | TEXT)
        words = ["kind", strategy["kind"]]
    elif op == "option":
        key = draw(st.sampled_from(STRATEGY_OPTIONS) | TEXT)
        strategy[key] = draw(BAD_VALUES)
        words = [key, "options", *(k for k in strategy if k not in ("name", "kind", "train"))]
    elif op == "train":
        key = draw(st.sampled_from(TRAIN_FIELDS))
        touched = draw(st.booleans())
        section = strategy.setdefault("train", {}) if touched else cfg["train"]
        section[key] = draw(BAD_VALUES)
        words = [key]
    elif op == "duplicate":
        strategies.append({**strategy, "name": strategies[draw(st.integers(0, len(strategies) - 1))]["name"]})
        words = ["unique"]
    elif op == "semi":
        cfg["setting"] = "semi"
        words = ["semi"]
    elif op == "seeds":
        cfg["seeds"] = draw(st.lists(st.integers(-3, 3) | BAD_VALUES, max_size=4) | BAD_VALUES)
        words = ["seeds"]
    else:
        task = st.one_of(TEXT, st.sampled_from(["pack:people", "probe:general", "pack:nope"]),
                         st.fixed_dictionaries({}, optional={"source": TEXT | BAD_VALUES, "metric": TEXT | BAD_VALUES, "name": BAD_VALUES, "x": BAD_VALUES}))
        cfg["tasks"] = draw(st.lists(task, max_size=3) | BAD_VALUES)
        words = ["tasks"]
    if touched and isinstance(strategy.get("name"), str):
        words.append(f"strategy {strategy['name']!r}")  # naming the strategy names where the problem is
    return cfg, [w for w in words if isinstance(w, str) and w]


MUTATED_FILES = mutated_config().map(lambda case: (yaml.safe_dump(case[0], sort_keys=False, allow_unicode=True).encode(), case[1]))
CONFIG_FILES = st.sampled_from(["mutation", "mutation", "text", "bytes"]).flatmap(
    lambda kind: {
        "mutation": MUTATED_FILES,
        "text": YAML_TEXT.map(lambda text: (text.encode("utf-8", "surrogatepass"), None)),
        "bytes": st.binary(max_size=60).map(lambda data: (data, None)),
    }[kind]
)


@FUZZ
@given(case=CONFIG_FILES)
def test_fuzz_config_files(case):
    """YAML text (often not YAML, not UTF-8, or too deep), and QUICKSTART with one thing wrong."""
    data, words = case
    with scratch() as tmp:
        path = Path(tmp) / "exp.yaml"
        path.write_bytes(data)
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            event(f"{'text' if words is None else 'mutation'}: ConfigError")
            assert str(path) in str(exc), f"the message does not name the file: {exc}"
            if words is not None:
                msg = str(exc).removeprefix(str(path))
                assert any(w in msg for w in words), f"the message names none of {words}: {exc}"
        else:
            event(f"{'text' if words is None else 'mutation'}: valid")
            assert isinstance(cfg, ExperimentConfig)


# ---------------------------------------------------------------------------------------------
# Surface 3: CLI arguments

COMMANDS = {
    "train": ["--base", "--task", "--metric", "--method", "--out", "--epochs", "--lr", "--lora-r", "--batch-size", "--seed", "--no-eval",
              "--lora-alpha", "--max-length", "--grad-accum", "--warmup-ratio", "--bf16", "--target-modules"],
    "eval": ["--model", "--task", "--metric", "--split", "--batch-size", "--json", "--allow-pickle", "--limit", "--base"],
    "generate": ["--model", "--max-new-tokens", "--allow-pickle", "--chat-template", "--base"],
    "merge": ["--method", "--base", "--inputs", "--weights", "--density", "--gamma", "--t", "--filter-wise", "--epsilon", "--select-topk", "--max-iter",
              "--tol", "--nuslerp-flatten", "--no-nuslerp-flatten", "--nuslerp-row-wise", "--lambda", "--normalize", "--no-normalize", "--seed", "--out", "--as-adapter", "--rank", "--store", "--config"],
    "mix": ["--base", "--inputs", "--router", "--top-k", "--temperature", "--threshold", "--granularity", "--tasks", "--shared",
            "--out", "--store"],
    "run": ["--out", "--check"],
    "report": [],
    "store": ["--store", "add", "list", "show", "verify", "--name", "--base", "--task"],
    "data": ["packs", "inspect", "--metric", "-n"],
}
REQUIRED = {"train": ["--task", "--out"], "eval": ["--model", "--task"], "generate": ["--model"],
            "merge": ["--method", "--base", "--inputs", "--out"], "mix": ["--base", "--inputs", "--router", "--out"]}
NUMBERS = ["0", "-1", "1", "2", "3", "64", "0.5", "1.5", "1e-4", "1e999", "nan", "inf", "-inf", "abc", "",
           "99999999999999999999", "1_000", "٣", "²", "0x10", " 1", "-0"]
TASKS = ["good.jsonl", "bad.jsonl", "latin1.jsonl", "empty.jsonl", "deep.json", "big.jsonl", "trace", "emptydir", "nope.jsonl",
         "pack:people", "pack:people?facts=2", "pack:nope", "pack:people?facts=0", "pack:people?facts=²", "pack:people?size=3",
         "pack:", "probe:general", "probe:nope", "~nouser-cairn/x.jsonl", "~", "/", ".", "exp.yaml"]
MODELS = ["tiny-random", "bundled:smollm2-135m", "bundled:nope", "org/name", "a/b/c", "x.gguf", "adapter", "emptydir",
          "good.jsonl", "", " ", "/", "contrib"]
STORE_IDS = ["c1", "../x", ".", "..", "a/b", "x" * 81, "-x", "", "nope", "c1/..", "broken"]
STORES = ["store", "badstore", "liststore", "good.jsonl", "nostore", "/proc/cairn-no"]
CONFIGS = ["exp.yaml", "seeds.yaml", "bad.yaml", "dates.yaml", "intkeys.yaml", "deep.yaml", "emptydir", "good.jsonl", "nope.yaml", "latin1.jsonl"]
RESULTS = ["results-list", "results-bad", "results-schema", "emptydir", "nope", "good.jsonl"]
VALUES = {
    "--base": MODELS, "--model": MODELS, "--task": TASKS, "--metric": ["exact", "choice", "bleu", ""],
    ("train", "--method"): ["lora", "fft", "ties"],
    ("merge", "--method"): ["ties", "average", "task_arithmetic", "dare_linear", "dare_ties", "slerp", "lora"],
    "--router": ["uniform", "arrow", "centroid", "trained", "random", "sparse"], "--granularity": ["sequence", "token", "layer"],
    "--shared": ["base", "average", "mean"], "--tasks": TASKS, "--config": ["mk.yaml", "mk-slices.yaml", *CONFIGS],
    "--split": ["train", "eval", "test", "dev"], "--out": ["out", "out/x", "good.jsonl", "emptydir", ""],
    "--json": ["r.json", "emptydir", "nodir/r.json"], "--store": STORES, "--name": STORE_IDS, "--inputs": ["contrib", *STORE_IDS],
}
ANY_TOKEN = st.one_of(
    TEXT,
    st.sampled_from([*COMMANDS, *sorted({f for fs in COMMANDS.values() for f in fs}), "-h", "--help", "--", "-", "--x"]),
    st.sampled_from(NUMBERS + TASKS + MODELS + STORE_IDS + STORES + CONFIGS + RESULTS),
)


@st.composite
def argv_for(draw) -> list[str]:
    """A command with (often wrong) flags and values, then a few tokens dropped or inserted."""
    command = draw(st.sampled_from(list(COMMANDS)))
    argv = [command]
    if command == "store":
        if draw(st.booleans()):
            argv += ["--store", draw(st.sampled_from(STORES))]
        sub = draw(st.sampled_from(["add", "add", "list", "show", "show", "verify", "verify", "nope"]))
        argv.append(sub)
        if sub == "add":
            argv.append(draw(st.sampled_from(["contrib", "contrib-badfiles", "contrib-list", "contrib-nokeys", "adapter", "nope", "good.jsonl"])))
            if draw(st.booleans()):
                argv += ["--name", draw(st.sampled_from(STORE_IDS) | TEXT)]
        elif sub in ("show", "verify"):
            argv.append(draw(st.sampled_from(STORE_IDS) | TEXT))
    elif command == "data":
        sub = draw(st.sampled_from(["packs", "inspect", "inspect", "inspect", "nope"]))
        argv.append(sub)
        if sub == "inspect":
            argv.append(draw(st.sampled_from(TASKS) | TEXT))
    elif command == "run":
        if draw(st.booleans()):
            argv.append(draw(st.sampled_from(CONFIGS) | TEXT))
    elif command == "report":
        argv.append(draw(st.sampled_from(RESULTS) | TEXT))
    elif command == "generate":
        argv.append(draw(TEXT))
    options = [f for f in COMMANDS[command] if f.startswith("-")]
    # The required options usually come (each with a plausible value), then some others.
    flags = [f for f in REQUIRED.get(command, ()) if draw(st.integers(0, 9))]
    flags += draw(st.lists(st.sampled_from(options), max_size=4)) if options else []
    for flag in draw(st.permutations(flags)):
        argv.append(flag)
        if flag in ("--no-eval", "--allow-pickle", "--as-adapter", "--normalize", "--no-normalize"):
            continue
        values = st.sampled_from(VALUES.get((command, flag)) or VALUES.get(flag) or NUMBERS)
        pool = st.one_of(values, values, values, TEXT)  # mostly values the option could take
        n = draw(st.integers(0, 3)) if flag in ("--inputs", "--weights") else draw(st.sampled_from([1, 1, 1, 1, 1, 0]))
        argv += draw(st.lists(pool, min_size=n, max_size=n))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        if draw(st.booleans()) and len(argv) > 1:
            del argv[draw(st.integers(1, len(argv) - 1))]  # the command stays: random lists replace it
        else:
            argv.insert(draw(st.integers(1, len(argv))), draw(ANY_TOKEN))
    return argv


def _contribution(folder: Path, **change) -> None:
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "adapter_config.json").write_text('{"base_model_name_or_path": "tiny-random"}')
    manifest = {"schema": 1, "kind": "adapter", "base": "tiny-random", "base_fingerprint": "0" * 64,
                "task": "people", "method": "lora", "files": file_hashes(folder)}
    write_manifest(folder, {**manifest, **change})


def _sandbox(root: Path) -> None:
    """The files and folders the generated arguments refer to, in the current folder."""
    good = [{"prompt": f"q{i}?", "answer": f"a{i}"} for i in range(10)]
    (root / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
    (root / "bad.jsonl").write_text('{"prompt": "p"}\n')
    (root / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "answer": "a"}\n')
    (root / "empty.jsonl").write_text("")
    (root / "deep.json").write_text("[" * 50_000 + "]" * 50_000)
    (root / "big.jsonl").write_text('{"prompt": "p", "answer": ' + "7" * 5000 + "}\n")
    (root / "trace").mkdir()
    (root / "trace" / "train.json").write_text('[{"prompt": 1, "answer": "a"}]')
    (root / "emptydir").mkdir()
    (root / "exp.yaml").write_text(yaml.safe_dump({"name": "fz", "tasks": ["pack:people?facts=2"], "probe": None,
                                                   "strategies": [{"name": "s", "kind": "sequential"}]}))
    (root / "bad.yaml").write_text("tasks: [pack:people\n")
    mergekit = {"merge_method": "ties", "base_model": "tiny-random", "models": [{"model": "contrib", "parameters": {"density": 0.5}}]}
    (root / "mk.yaml").write_text(yaml.safe_dump(mergekit))
    (root / "mk-slices.yaml").write_text(yaml.safe_dump({**mergekit, "slices": [{"sources": []}]}))
    (root / "dates.yaml").write_text("name: 2001-13-01\n")
    (root / "seeds.yaml").write_text("tasks: [pack:people]\nprobe: null\nstrategies: [{name: s, kind: sequential}]\nseeds: [-1]\n")
    (root / "intkeys.yaml").write_text("tasks: [pack:people]\nstrategies: [{name: s, kind: sequential, 1: 2}]\n")
    (root / "deep.yaml").write_text("a: " + "[" * 10_000 + "]" * 10_000)
    for name, text in (("results-list", "[]"), ("results-bad", "{"), ("results-schema", '{"schema": 99}')):
        (root / name).mkdir()
        (root / name / "results.json").write_text(text)
    _contribution(root / "contrib")
    _contribution(root / "contrib-badfiles", files=["x"])
    _contribution(root / "contrib-nokeys", files={})
    (root / "contrib-nokeys" / "cairn.json").write_text('{"files": {}}')
    (root / "contrib-list").mkdir()
    (root / "contrib-list" / "cairn.json").write_text("[1, 2]")
    (root / "adapter").mkdir()
    (root / "adapter" / "adapter_config.json").write_text("{}")
    from cairn.store import Store

    Store(root / "store").add(root / "contrib", name="c1")
    _contribution(root / "store" / "items" / "broken", files=[])
    index = json.loads((root / "store" / "index.json").read_text())
    index["entries"]["broken"] = {**index["entries"]["c1"], "id": "broken"}
    (root / "store" / "index.json").write_text(json.dumps(index))
    (root / "badstore").mkdir()
    (root / "badstore" / "index.json").write_text("{not json")
    (root / "liststore").mkdir()
    (root / "liststore" / "index.json").write_text('{"entries": [1]}')


class _Scores:
    task, metric, score, n, split, predictions = "task", "exact", 0.5, 1, "test", []

    def to_dict(self):
        return {"score": self.score, "n": self.n}


def _fake_load_model(spec, *, allow_pickle=False, base=None):
    from cairn.models import ModelSpec

    ModelSpec.parse(spec)  # the spec is checked as the real loader checks it
    return SimpleNamespace(cairn_fingerprint="0" * 64), object()


def _fake_train_contribution(base, task, cfg, out, **_):
    from cairn.options import TrainConfig

    assert isinstance(cfg, TrainConfig) and task.train, "the API must refuse a task without training examples"
    assert 0 <= cfg.seed < 2**32, "the API must refuse a seed that NumPy (seeded by training) cannot take"
    _fake_load_model(base)
    return {"method": cfg.method, "task": task.name, "train": {"steps": 1, "losses": [0.5], "tokens": 1, "wall_s": 0.0, "tokens_per_s": 0.0}}


def _fake_evaluate_task(model, tokenizer, task, *, split="test", batch_size=32, progress=False):
    assert isinstance(batch_size, int) and batch_size >= 1, "the API must refuse a batch size below 1"
    assert task.split(split)
    return _Scores()


def _fake_generate(model, tokenizer, prompts, *, max_new_tokens=32, **_):
    assert max_new_tokens >= 1, "the API must refuse --max-new-tokens below 1"
    return ["" for _ in prompts]


def _fake_merge_models(base, inputs, out, opts, *, weights=None, adapter_rank=None, **_):
    assert inputs and all(Path(p).exists() for p in inputs)
    assert adapter_rank is None or adapter_rank >= 1, "the API must refuse --rank below 1"
    if weights is not None and len(weights) != len(inputs):  # as merge_models checks before any I/O
        raise ModelError(f"{len(weights)} weights for {len(inputs)} inputs: give one weight per input")
    return {"wall_s": 0.0, "method": opts.method, "inputs": [str(p) for p in inputs]}


def _fake_attach_experts(model, experts, opts, statistics=None):
    from cairn.options import MoeOptions

    assert isinstance(opts, MoeOptions) and experts and all(Path(p).exists() for p in experts)
    return model


def _fake_train_router(model, tokenizer, tasks, opts, **_):
    assert tasks and all(t.train for t in tasks), "the API must refuse a --tasks source without training examples"
    return [1.0, 0.5]


def _fake_export_mixtral(base, inputs, out, *, router, top_k, **_):
    assert router in ("uniform", "centroid", "random") and top_k >= 1
    return {}


def _fake_run_experiment(cfg, out, log=print, **_):
    assert all(0 <= seed < 2**32 for seed in cfg.seeds), "the config must refuse seeds NumPy cannot take"
    cfg.load_tasks()  # the task sources are checked as the real runner checks them first
    return {"strategies": {}}


def _stubs():
    return [
        mock.patch("cairn.contributions.train_contribution", _fake_train_contribution),
        mock.patch("cairn.models.load_model", _fake_load_model),
        mock.patch("cairn.contributions.load_model", _fake_load_model),
        mock.patch("cairn.contributions.load", _fake_load_model),  # any spec, adapters and mixtures included (eval, generate)
        mock.patch("cairn.models.resolve_folder", lambda spec: str(spec)),
        mock.patch("cairn.evaluation.evaluate_task", _fake_evaluate_task),
        mock.patch("cairn.evaluation.generate", _fake_generate),
        mock.patch("cairn.methods.merge.streaming.merge_models", _fake_merge_models),
        mock.patch("cairn.methods.moe.lora_moe.attach_experts", _fake_attach_experts),
        mock.patch("cairn.methods.moe.router_training.train_router", _fake_train_router),
        mock.patch("cairn.methods.moe.lora_moe.save_moe", lambda *a, **k: None),
        mock.patch("cairn.methods.moe.mixtral.export_mixtral", _fake_export_mixtral),
        mock.patch("cairn.experiment.run_experiment", _fake_run_experiment),
        mock.patch("cairn.report.write_report", lambda results, out: None),
        mock.patch("cairn.cli._print_summary", lambda results: None),
    ]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """A template of the sandbox, made once (its store writes fsync); each example gets a copy."""
    root = tmp_path_factory.mktemp("sandbox")
    _sandbox(root)
    return root


@FUZZ
@given(argv=st.sampled_from(["command"] * 3 + ["tokens"]).flatmap(lambda kind: argv_for() if kind == "command" else st.lists(ANY_TOKEN, max_size=8)))
def test_fuzz_cli_arguments(sandbox, argv):
    """Random tokens, or a command with (often wrong) options and values, in a sandbox folder."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(scratch())) / "sandbox"
        shutil.copytree(sandbox, tmp, symlinks=True)
        stack.enter_context(contextlib.chdir(tmp))
        stack.enter_context(mock.patch.dict(os.environ, {"HOME": str(tmp), "CAIRN_CACHE": str(tmp / "cache"), "CAIRN_STORE": "store"}))
        for stub in _stubs():
            stack.enter_context(stub)
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        code = main(argv)
    event(f"exit {code}")
    assert isinstance(code, int) and code in (0, 2, 3, 4, 5), (code, err.getvalue())
    if code:
        lines = err.getvalue().strip().splitlines()
        assert lines and lines[-1].startswith(("cairn", "usage:")), err.getvalue()
        assert "Traceback" not in err.getvalue()
