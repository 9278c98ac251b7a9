"""Experiment configs: YAML <-> validated objects. Unknown keys and bad values name themselves."""

from __future__ import annotations

import itertools
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import quote, unquote_plus

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from cairn.data import Task, load_task
from cairn.data.loaders import path_source
from cairn.data.chat import as_chat
from cairn.data.task import EXTRACTIONS, METRICS
from cairn.errors import ConfigError, DataError
from cairn.io import read_yaml
from cairn.options import DEFAULT_BASE, STRATEGY_OPTIONS, StrategyOptions, TrainConfig
from cairn.validation import Strict, config_error


# A run's seed seeds Python, NumPy and torch; NumPy takes 0 .. 2**32 - 1.
Seed = Annotated[int, Field(ge=0, lt=2**32)]


def _unique(seeds: list[int]) -> list[int]:
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be unique, got {seeds}")
    return seeds


Seeds = Annotated[list[Seed], Field(min_length=1), AfterValidator(_unique)]  # a sweep's or tuning's seeds


class TaskSpec(Strict):
    """A task source with optional metric and name overrides; a bare string is `source`."""

    source: str
    metric: Literal[METRICS] | None = None  # type: ignore[valid-type]
    name: str | None = None
    extract: Literal[EXTRACTIONS] | None = None  # type: ignore[valid-type]  # what of a generation the metric judges (docs/report.md); default: the task's own (full)
    chat_template: bool | None = None  # wrap prompts in the model's chat template; default: the experiment's
    limit: dict[Literal["train", "eval", "test"], Annotated[int, Field(ge=1)]] | None = None  # at most N examples of a split (a seeded sample)
    # Train on the eval split, for a source that has none to train on (the public TRACE-500 copy's
    # MeetingBank); the eval split is then no longer held out, so it is emptied: tuning has none to read.
    train_on: Literal["eval"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data):
        return {"source": data} if isinstance(data, str) else data


class StrategySpec(BaseModel):
    """One strategy of an experiment: a `kind` (of `STRATEGY_OPTIONS`), training overrides, and the kind's own
    options as further keys (e.g. `continue_adapter` for sequential, `rate` for replay)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    kind: str
    train: dict = Field(default_factory=dict)
    task_train: dict[str, dict] = Field(default_factory=dict, description="per task name: training overrides for that task's stage (what tuning chose per contribution in the semi setting)")
    options: dict = Field(default_factory=dict)
    _typed: StrategyOptions | None = PrivateAttr(None)  # the options as validated: it knows which the user set

    @model_validator(mode="before")
    @classmethod
    def _gather_options(cls, data):
        if isinstance(data, dict) and "options" not in data:
            core = {"name", "kind", "train", "task_train"}
            data = {**{k: v for k, v in data.items() if k in core}, "options": {k: v for k, v in data.items() if k not in core}}
        return data

    @field_validator("kind")
    @classmethod
    def _known(cls, kind: str) -> str:
        if kind not in STRATEGY_OPTIONS:
            raise ValueError(f"unknown strategy kind {kind!r}; allowed: {', '.join(STRATEGY_OPTIONS)}")
        return kind

    @model_validator(mode="after")
    def _typed_options(self):
        try:
            self._typed = STRATEGY_OPTIONS[self.kind].model_validate(self.options)
        except ValidationError as exc:
            message = str(config_error(exc, f"strategy {self.name!r} ({self.kind})"))
            if any("unknown key" in e["msg"] for e in exc.errors()):  # the strategy's own keys are allowed too
                fields = STRATEGY_OPTIONS[self.kind].model_fields
                message += f" (keys allowed: {', '.join(['name', 'kind', 'train', 'task_train', *(f.alias or k for k, f in fields.items())])})"
            raise ValueError(message) from None
        # every option, defaults included (results.json shows what ran), under its YAML name (`lambda`)
        self.options = self._typed.model_dump(by_alias=True)
        return self

    def typed_options(self):
        """The strategy's options object (a copy), which knows which options the user set."""
        if self._typed is None:  # built without validation (model_construct)
            self._typed = STRATEGY_OPTIONS[self.kind].model_validate(self.options)
        return self._typed.model_copy(deep=True)


class SweepSpec(Strict):
    """What `cairn sweep` varies: strategy settings (a grid), seeds and task orders."""

    set: dict[str, list] = Field(default_factory=dict, description="strategies.NAME.KEY -> values; each strategy's keys form a grid")
    seeds: Seeds | None = Field(None, description="default: the experiment's seeds")
    orders: int = Field(1, ge=1, description="the config's task order, then orders - 1 other permutations")
    order_seed: int = Field(0, ge=0, description="seeds the draw of the other task orders")


# Where each training method learns the quickstart's packs (bundled model, 8 epochs, batch 8): LoRA
# learned nothing at 1e-4 and over-wrote the probe by 2e-3, FFT learned at 1e-4 and forgot most of
# the probe at 3e-4 (docs/results.md). A tuning grid that is not given spans this bracket, log-spaced.
LR_BRACKET = {"lora": (1e-4, 3e-3), "fft": (1e-5, 3e-4)}


class TuneSpec(Strict):
    """Equal-budget tuning (`cairn tune`): every strategy tries `budget` grid points x `seeds`,
    chosen on eval splits only (each task's eval split, the probe's eval half) by `metric` among
    the points whose eval old_change is no worse than `-max_forgetting`."""

    grid: dict[str, dict[str, list]] = Field(default_factory=dict, description="strategy name -> {train.FIELD or option: values}; a strategy not named tunes train.lr over LR_BRACKET")
    budget: int | None = Field(None, ge=1, description="grid points per strategy; default: the largest given grid's size (4 without one)")
    seeds: Seeds | None = Field(None, description="tuning seeds; default: the experiment's first")
    metric: Literal["op", "new", "retained", "bwt", "old_change"] = "op"
    max_forgetting: float | None = Field(None, ge=0, description="a point qualifies when its eval old_change >= -max_forgetting (default: every point does)")

    @field_validator("grid")
    @classmethod
    def _values(cls, grid):
        for name, keys in grid.items():
            for key, values in keys.items():
                if not values:
                    raise ValueError(f"grid.{name}.{key}: give at least one value")
        return grid

    def points(self) -> int:
        sizes = [math.prod(len(v) for v in keys.values()) for keys in self.grid.values()]
        return self.budget or max(sizes, default=4)


class ExperimentConfig(Strict):
    """Base model x task stream x strategies x seeds."""

    name: str = "experiment"
    base: str = DEFAULT_BASE
    data_dir: str | None = None  # relative task (and probe) paths are read from here (pack:/probe: sources are not)
    tasks: list[TaskSpec] = Field(min_length=1)
    probe: TaskSpec | None = TaskSpec(source="probe:general")  # the headline old-knowledge score, G
    probes: list[TaskSpec] = Field(default_factory=list)  # further probes, each reported on its own beside G
    setting: Literal["semi", "full"] = "full"
    train: dict = Field(default_factory=dict)
    strategies: list[StrategySpec] = Field(min_length=1)
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    out: str | None = None
    tracker: Literal["tensorboard", "mlflow", "wandb"] | None = None  # also log to this tool, under OUT/tracking
    chat_template: bool = False  # wrap every task's prompts in the model's chat template (a task may say otherwise)
    sweep: SweepSpec | None = None  # what `cairn sweep` varies (`cairn run` runs the config as it is)
    tune: TuneSpec | None = None  # how `cairn tune` gives every strategy the same tuning budget
    _origin: Origin | None = PrivateAttr(None)  # where the config came from, and its paths as written

    @property
    def where(self) -> str:
        """What names the config in messages: its file, else "config" (built in Python)."""
        return self._origin.where if self._origin else "config"

    @property
    def folder(self) -> Path | None:
        """The folder the config file's relative paths were read from (None: built in Python,
        whose relative paths are read from the current directory)."""
        return self._origin.folder if self._origin else None

    @model_validator(mode="after")
    def _consistent(self):
        names = [s.name for s in self.strategies]
        if len(set(names)) != len(names):
            raise ValueError(f"strategy names must be unique, got {names}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be unique, got {self.seeds}")
        for s in self.strategies:
            train = self.train_config(s, self.seeds[0])  # every merged training config must validate
            opts = s.typed_options()
            if self.setting == "semi" and opts.reads_history():
                raise ValueError(
                    f"strategy {s.name!r} (kind {s.kind}) trains on earlier tasks' data, which the semi setting "
                    "does not keep; use setting: full, or a semi-collaborative strategy"
                )
            if self.chat_template and getattr(opts, "general", None) and s.kind == "replay" and not opts.general_chat_template:
                raise ValueError(f"strategy {s.name!r} (kind replay) replays general data whose prompts would not be in the chat template the tasks use "
                                 "(chat_template: true); set general_chat_template: true")  # fmt: skip
            most = opts.most_tasks()
            if most is not None and len(self.tasks) > most:
                raise ValueError(
                    f"strategy {s.name!r} (kind {s.kind}) runs at most {most} stage(s) with these options ({getattr(opts, 'method', s.kind)} "
                    f"merges at most {most} contribution(s), as mergekit's), but the stream has {len(self.tasks)} tasks; "
                    f"give at most {most} task(s), or choose another method"
                )
            try:
                opts.check(train)  # what the kind declares it can run, before any model is loaded
            except ValueError as exc:
                raise ValueError(f"strategy {s.name!r} (kind {s.kind}) {exc}") from None
        for s in self.strategies:  # task names are checked once the tasks are loaded (run_experiment)
            for task in s.task_train:
                self.train_config(s, self.seeds[0], task)
        if self.sweep is not None:  # every grid point and task order must give a valid experiment
            try:
                experiments(self, self.sweep)
            except ConfigError as exc:
                raise ValueError(f"sweep: {exc}") from None
        if self.tune is not None:  # every strategy's grid must give valid strategies, of one size
            try:
                tuning_grid(self, self.tune)
            except ConfigError as exc:
                raise ValueError(f"tune: {exc}") from None
        return self

    def train_config(self, strategy: StrategySpec, seed: int, task: str | None = None) -> TrainConfig:
        """The experiment's training defaults, overridden by the strategy's (and, for `task`, by
        the strategy's `task_train` entry for it), with the run's seed."""
        merged = {**self.train, **strategy.train, **strategy.task_train.get(task, {}), "seed": seed}
        try:
            return TrainConfig.model_validate(merged)
        except ValidationError as exc:
            raise ValueError(str(config_error(exc, f"strategy {strategy.name!r} train"))) from None

    def _load(self, spec: TaskSpec, tokenizer=None, where: str = "source"):
        source = spec.source
        if _is_path(source):
            if self.data_dir:
                source = _under(source, Path(self.data_dir))
            if not _exists(path_source(source)[0]):  # the path without its `?limit=N`
                raise DataError(self._not_found(where, spec.source, source))
        task = load_task(source, metric=spec.metric, name=spec.name)
        if not isinstance(task, Task):  # an lm-eval probe: lm-eval formats its own prompts
            if spec.limit or spec.extract:
                raise ConfigError(f"{spec.source}: an lm-eval probe runs lm-eval's own task; it takes no {'limit' if spec.limit else 'extract'}")
            return task
        if spec.train_on:
            if task.train:
                raise ConfigError(f"{where} {spec.source}: train_on: {spec.train_on} is for a source without a train split, and this one has {len(task.train)} train examples; drop train_on")
            task.splits["train"], task.splits[spec.train_on] = task.splits.get(spec.train_on, []), []
        if spec.limit:
            task = task.limited(spec.limit)
        if spec.extract:
            task.extract = spec.extract
        chat = self.chat_template if spec.chat_template is None else spec.chat_template
        return as_chat(task, tokenizer) if chat and tokenizer is not None else task

    def load_probes(self, tokenizer=None) -> list:
        """The further probes (`probes`), loaded as `load_tasks` loads the headline one."""
        probes = [self._load(p, tokenizer, f"probes[{i}].source") for i, p in enumerate(self.probes)]
        names = [p.name for p in probes]
        if len(set(names)) != len(names):
            raise ConfigError(f"probe names must be unique, got {names}; give duplicates a `name`")
        return probes

    def load_tasks(self, tokenizer=None) -> tuple[list, object]:
        """(stream tasks, probe task or None), loaded from their sources; with `tokenizer`, the
        tasks that use a chat template get their prompts wrapped in it."""
        tasks = [self._load(t, tokenizer, f"tasks[{i}].source") for i, t in enumerate(self.tasks)]
        for i, (spec, task) in enumerate(zip(self.tasks, tasks)):
            if not isinstance(task, Task):
                raise ConfigError(f"tasks: {spec.source} is measured by lm-eval and has no training data; it can be the probe, not a task")
            if not task.train:  # its stage would stop the run with nothing to train on
                raise ConfigError(
                    f"tasks[{i}] {spec.source}: no train examples (a stream task trains on its train split); give a source with one, "
                    "or `train_on: eval` to train on its eval split"
                )
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"task names must be unique, got {names}; give duplicates a `name`")
        return tasks, (self._load(self.probe, tokenizer, "probe.source") if self.probe else None)

    def out_dir(self) -> Path:
        """`out` (a config file's: read from its folder), else runs/NAME under the current directory."""
        return Path(self.out or Path("runs") / self.name)

    def _not_found(self, where: str, source: str, looked: str) -> str:
        """Why a task source that names a path cannot be loaded: the path looked for and, for a
        source written relative, where it was read from."""
        origin = self._origin or Origin("config")
        written = origin.written.get(source, source)
        message = f"{origin.where}: {where} {written!r} not found: looked for {os.path.abspath(looked)}"
        if not _relative(written):
            return message
        notes, relative = [], True
        if self.data_dir:
            data_dir, given = os.path.abspath(self.data_dir), origin.written.get(self.data_dir, self.data_dir)
            relative = _relative(given)
            notes.append(f"task sources are read from data_dir {given!r}{f' = {data_dir}' if relative else ''}"
                         + ("" if os.path.isdir(data_dir) else ", which does not exist"))  # fmt: skip
        if relative:
            notes.append(f"relative paths in a config are read from the config's folder, {origin.folder}" if origin.folder
                         else f"relative paths in a config built in Python are read from the current directory, {Path.cwd()}")  # fmt: skip
        return f"{message} ({'; '.join(notes)})"


def parse_config(data, where: str = "config", *, like: ExperimentConfig | None = None) -> ExperimentConfig:
    """A config from a mapping (its relative paths read from the current directory); `like`: the
    config this one is derived from (a sweep's order, a tuning point), whose origin it keeps."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys (name, base, tasks, strategies, ...), got {type(data).__name__}")
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc, where) from None
    cfg._origin = like._origin if like is not None and like._origin else Origin(where)
    return cfg


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment YAML file; its relative paths are read from its folder."""
    data = read_yaml(path)
    folder = Path(os.path.abspath(path)).parent
    paths = ConfigPaths(folder)
    cfg = parse_config(paths.resolve(data) if isinstance(data, dict) else data, str(path))
    cfg._origin = Origin(str(path), folder, paths.written)
    return cfg


# --- paths: a config file's relative paths are read from its folder -------------------------------


@dataclass(frozen=True)
class Origin:
    """Where a config came from: `where` names it in messages; `folder` is the folder its relative
    paths were read from (None: the current directory); `written` maps each resolved path back to
    the path as written."""

    where: str
    folder: Path | None = None
    written: dict[str, str] = field(default_factory=dict)


# Strategy options that name a folder, by kind, and the values of each that are keywords, not paths.
PATH_OPTIONS: dict[str, dict[str, tuple[str, ...]]] = {"moe": {"general": ("mean",)}, "replay": {"general": ()}}


def _is_path(source) -> bool:
    """A task source that names a file or folder; `pack:`, `probe:`, `lm-eval:` (any `SCHEME:`) do not."""
    return isinstance(source, str) and bool(source) and ":" not in source


def _relative(path: str) -> bool:
    return _is_path(path) and not path.startswith("~") and not Path(path).is_absolute()


def _exists(path: str) -> bool:
    try:
        return Path(path).expanduser().exists()
    except (RuntimeError, ValueError):  # `~user` of no user, a NUL byte: load_task names the problem
        return True


def _under(path: str, folder: Path) -> str:
    """`path` with `~` expanded and, when relative, read from `folder` (.. collapsed)."""
    try:
        expanded = Path(path).expanduser()
    except (RuntimeError, ValueError):  # `~user` of no user: left for the loader to report
        return path
    return str(expanded) if expanded.is_absolute() else os.path.normpath(folder / expanded)


def _names_a_path(spec: str, folder: Path) -> bool:
    """Whether a `base` names a folder or .gguf file as `ModelSpec.parse` tells them apart: not
    `bundled:NAME`, not `tiny-random`, and not a hub id ORG/NAME (unless `folder` holds ORG/NAME)."""
    spec = spec.strip()
    if not spec or spec.startswith("bundled:") or spec == "tiny-random":
        return False
    return spec.endswith(".gguf") or spec.startswith((".", "/", "~")) or spec.count("/") != 1 or _exists(_under(spec, folder))


@dataclass
class ConfigPaths:
    """Resolves the paths of a config file's raw mapping against its folder, before validation:
    `base` (a folder or .gguf file), `data_dir`, `out`, each task's and probe's source (read from
    `data_dir` when it is set; an lm-eval probe's `include=DIR`), and the strategy options of
    PATH_OPTIONS (in `strategies`, `sweep.set` and `tune.grid`). Values of other types are left
    for validation to report."""

    folder: Path
    written: dict[str, str] = field(default_factory=dict)  # resolved path -> as written

    def resolve(self, data: dict) -> dict:
        data = dict(data)
        base = data.get("base")
        if isinstance(base, str) and _names_a_path(base, self.folder):
            data["base"] = self._at(base.strip(), self.folder)
        for key in ("data_dir", "out"):
            if isinstance(data.get(key), str) and data[key]:
                data[key] = self._at(data[key], self.folder)
        sources = Path(data["data_dir"]) if isinstance(data.get("data_dir"), str) and data["data_dir"] else self.folder
        for key in ("tasks", "probes"):
            if isinstance(data.get(key), list):
                data[key] = [self._task(t, sources) for t in data[key]]
        if "probe" in data:
            data["probe"] = self._task(data["probe"], sources)
        kinds = {}
        if isinstance(data.get("strategies"), list):
            data["strategies"] = [self._strategy(s, kinds) for s in data["strategies"]]
        sweep = data.get("sweep")
        if isinstance(sweep, dict) and isinstance(sweep.get("set"), dict):
            data["sweep"] = {**sweep, "set": {k: self._swept(kinds, k, v) for k, v in sweep["set"].items()}}
        tune = data.get("tune")
        if isinstance(tune, dict) and isinstance(tune.get("grid"), dict):
            grid = {n: {k: self._values(kinds, n, k, v) for k, v in keys.items()} if isinstance(keys, dict) else keys for n, keys in tune["grid"].items()}
            data["tune"] = {**tune, "grid": grid}
        return data

    def _task(self, spec, folder: Path):
        """A task spec (a source, or a mapping with `source`) with its source read from `folder`."""
        if isinstance(spec, dict) and "source" in spec:
            return {**spec, "source": self._task(spec["source"], folder)}
        if not isinstance(spec, str):
            return spec
        if spec.startswith("lm-eval:"):  # `?include=DIR`: a folder of lm-eval task files
            return self._include(spec)
        return self._at(spec, folder) if _is_path(spec) else spec

    def _at(self, path: str, folder: Path) -> str:
        """`path` read from `folder`, remembered as written."""
        resolved = _under(path, folder)
        self.written.setdefault(resolved, path)
        return resolved

    def _include(self, source: str) -> str:
        head, sep, query = source.partition("?")
        parts = []
        for part in query.split("&") if sep else ():
            key, eq, value = part.partition("=")
            if key == "include" and eq and _relative(unquote_plus(value)):
                part = f"include={quote(self._at(unquote_plus(value), self.folder), safe='/')}"
            parts.append(part)
        return head + sep + "&".join(parts)

    def _strategy(self, spec, kinds: dict):
        """A strategy's mapping with its path options (flat, or under `options`) read from the folder."""
        if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
            return spec
        if isinstance(spec.get("name"), str):
            kinds[spec["name"]] = spec["kind"]
        if isinstance(spec.get("options"), dict):
            return {**spec, "options": self._options(spec["kind"], spec["options"])}
        return self._options(spec["kind"], spec)

    def _options(self, kind: str, options: dict) -> dict:
        return {k: self._value(kind, k, v) for k, v in options.items()}

    def _value(self, kind: str, key, value):
        keywords = PATH_OPTIONS.get(kind, {}).get(key) if isinstance(key, str) else None
        return self._at(value, self.folder) if keywords is not None and _is_path(value) and value not in keywords else value

    def _swept(self, kinds: dict, key, values):
        """A sweep's values of `strategies.NAME.KEY`."""
        parts = key.split(".", 2) if isinstance(key, str) else []
        return self._values(kinds, parts[1], parts[2], values) if len(parts) == 3 and parts[0] == "strategies" else values

    def _values(self, kinds: dict, name, key, values):
        """A sweep's or tuning grid's values of strategy `name`'s option `key`."""
        kind = kinds.get(name)
        return [self._value(kind, key, v) for v in values] if kind and isinstance(values, list) else values


# --- sweeps: the experiments a `sweep:` section expands to (run by cairn.sweep) -------------------


def parse_set(text: str) -> tuple[str, list]:
    """`strategies.NAME.KEY=V1,V2,...` as (key, values); each value is read as YAML (0.1 -> float,
    true -> bool), and 1e-4, which YAML 1.1 leaves a string, as a number."""
    def value(item: str):
        v = yaml.safe_load(item)
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                pass
        return v

    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise ConfigError(f"--set {text!r}: expected strategies.NAME.KEY=V1,V2,...")
    return key.strip(), [value(v) for v in values.split(",")]


def sweep_spec(cfg: ExperimentConfig, *, grid: dict | None = None, seeds: list[int] | None = None, orders: int | None = None) -> SweepSpec:
    """The config's `sweep:` section with `grid` added to its keys and `seeds` / `orders` replacing its own."""
    spec = (cfg.sweep or SweepSpec()).model_dump()
    spec["set"] = {**spec["set"], **(grid or {})}
    spec.update({k: v for k, v in {"seeds": seeds, "orders": orders}.items() if v is not None})
    return SweepSpec.model_validate(spec)


def variant_name(name: str, point: dict) -> str:
    """`NAME.KEY-VALUE...`, with characters a strategy name cannot hold replaced by `_`."""
    parts = [f"{key.rsplit('.', 1)[-1]}-{value}" for key, value in point.items()]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", ".".join([name, *parts]))


def _set_key(strategy: dict, key: str, value, where: str) -> None:
    """Set `key` (an option, or `train.FIELD`) in a strategy's dict."""
    if key.startswith("train."):
        strategy["train"] = {**strategy.get("train", {}), key.split(".", 1)[1]: value}
    elif "." in key or key in ("name", "kind"):
        raise ConfigError(f"{where}: cannot sweep {key!r}; sweep one of the strategy's options or train.FIELD")
    else:
        strategy[key] = value


def grid(cfg: ExperimentConfig, sweep: SweepSpec) -> list[tuple[str, str, dict, dict]]:
    """(variant name, strategy name, {key: value}, strategy dict) for every strategy and grid point;
    an unswept strategy is its own single point."""
    by_strategy: dict[str, dict[str, list]] = {}
    names = [s.name for s in cfg.strategies]
    for key, values in sweep.set.items():
        parts = key.split(".", 2)
        if len(parts) < 3 or parts[0] != "strategies":
            raise ConfigError(f"sweep key {key!r}: expected strategies.NAME.KEY (e.g. strategies.olora.lambda1)")
        if parts[1] not in names:
            raise ConfigError(f"sweep key {key!r}: no strategy named {parts[1]!r}; the config has {', '.join(names)}")
        if not values:
            raise ConfigError(f"sweep key {key!r}: give at least one value")
        by_strategy.setdefault(parts[1], {})[parts[2]] = values
    points = []
    for spec in cfg.strategies:
        plain = {"name": spec.name, "kind": spec.kind, "train": dict(spec.train), **spec.options}
        keys = by_strategy.get(spec.name, {})
        for combo in itertools.product(*keys.values()):
            point = dict(zip(keys, combo))
            strategy = {**plain, "train": dict(plain["train"])}
            for key, value in point.items():
                _set_key(strategy, key, value, f"sweep key strategies.{spec.name}.{key}")
            strategy["name"] = variant_name(spec.name, point) if point else spec.name
            points.append((strategy["name"], spec.name, point, strategy))
    return points


def default_grid(cfg: ExperimentConfig, spec: StrategySpec, points: int) -> dict[str, list]:
    """`points` learning rates log-spaced over the strategy's training method's LR_BRACKET."""
    low, high = LR_BRACKET[cfg.train_config(spec, cfg.seeds[0]).method]
    if points == 1:
        return {"train.lr": [float(f"{math.sqrt(low * high):.2g}")]}
    return {"train.lr": [float(f"{low * (high / low) ** (i / (points - 1)):.2g}") for i in range(points)]}


def tuning_grid(cfg: ExperimentConfig, tune: TuneSpec) -> list[tuple[str, str, dict, dict]]:
    """`grid()` of every strategy's tuning grid (given, else `default_grid`); each strategy must
    have `tune.points()` points, so every strategy gets the same budget."""
    names = [s.name for s in cfg.strategies]
    unknown = sorted(set(tune.grid) - set(names))
    if unknown:
        raise ConfigError(f"grid names {', '.join(unknown)}, which {'is not a strategy' if len(unknown) == 1 else 'are not strategies'}; the config has {', '.join(names)}")
    budget = tune.points()
    keys, sizes = {}, {}
    for spec in cfg.strategies:
        grid_of = tune.grid.get(spec.name) or default_grid(cfg, spec, budget)
        sizes[spec.name] = math.prod(len(v) for v in grid_of.values())
        keys.update({f"strategies.{spec.name}.{k}": v for k, v in grid_of.items()})
    unequal = {name: n for name, n in sizes.items() if n != budget}
    if unequal:
        raise ConfigError(
            f"every strategy must try the same number of grid points (budget {budget}); "
            + ", ".join(f"{name} has {n}" for name, n in unequal.items())
            + ": give each the same number of values, or set budget"
        )
    return grid(cfg, SweepSpec(set=keys))


def task_orders(n: int, k: int, seed: int) -> list[list[int]]:
    """The config's order, then k - 1 other distinct permutations of n tasks drawn with `seed`."""
    if k > math.factorial(n):
        raise ConfigError(f"orders: {k} asked for, but {n} tasks have only {math.factorial(n)} orders")
    rng = random.Random(seed)
    orders = [list(range(n))]
    while len(orders) < k:
        order = rng.sample(range(n), n)
        if order not in orders:
            orders.append(order)
    return orders


def experiments(cfg: ExperimentConfig, sweep: SweepSpec) -> tuple[list[ExperimentConfig], list[tuple[str, str, dict]]]:
    """The experiment of every task order, and (variant, strategy, {key: value}) of every grid point."""
    points = grid(cfg, sweep)
    base = cfg.model_dump(mode="json", exclude={"sweep"})
    base["strategies"] = [strategy for *_, strategy in points]
    base["seeds"] = sweep.seeds or cfg.seeds
    configs = []
    for k, order in enumerate(task_orders(len(cfg.tasks), sweep.orders, sweep.order_seed)):
        data = {**base, "tasks": [base["tasks"][i] for i in order], "name": f"{cfg.name} order {k}"}
        configs.append(parse_config(data, f"{cfg.name} sweep, order {k}", like=cfg))
    return configs, [(name, strategy, point) for name, strategy, point, _ in points]


QUICKSTART = {
    "name": "quickstart",
    "base": DEFAULT_BASE,
    "tasks": ["pack:people?facts=10", "pack:compounds?facts=10", "pack:companies?facts=10"],
    "probe": {"source": "probe:general", "limit": {"test": 60}},
    "setting": "full",
    "train": {"method": "lora", "epochs": 8, "lr": 1.0e-3, "lora_r": 16, "batch_size": 8},
    "strategies": [
        {"name": "seq-fft", "kind": "sequential", "train": {"method": "fft", "lr": 1.0e-4}},
        {"name": "seq-lora", "kind": "sequential"},
        {"name": "replay-lora", "kind": "replay", "rate": 0.1},
        {"name": "joint-lora", "kind": "joint"},
        {"name": "olora", "kind": "olora", "raw": True},
        {"name": "merge-ties", "kind": "merge", "method": "ties", "density": 0.5},
        {"name": "merge-average", "kind": "merge", "method": "average"},
        {"name": "moe-centroid", "kind": "moe", "router": "centroid"},
        {"name": "moe-arrow", "kind": "moe", "router": "arrow"},
    ],
    "seeds": [0],
}


def quickstart() -> ExperimentConfig:
    """The built-in quickstart (the same experiment as configs/quickstart.yaml)."""
    return parse_config(QUICKSTART, "built-in quickstart")
