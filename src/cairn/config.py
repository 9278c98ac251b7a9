"""Experiment configs: YAML <-> validated objects. Unknown keys and bad values name themselves."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from cairn.data.task import METRICS
from cairn.errors import ConfigError
from cairn.models import DEFAULT_BASE
from cairn.training import TrainConfig
from cairn.validation import Strict, config_error


# A run's seed seeds Python, NumPy and torch; NumPy takes 0 .. 2**32 - 1.
Seed = Annotated[int, Field(ge=0, lt=2**32)]


class TaskSpec(Strict):
    """A task source with optional metric and name overrides; a bare string is `source`."""

    source: str
    metric: Literal[METRICS] | None = None  # type: ignore[valid-type]
    name: str | None = None
    chat_template: bool | None = None  # wrap prompts in the model's chat template; default: the experiment's
    limit: dict[Literal["train", "eval", "test"], Annotated[int, Field(ge=1)]] | None = None  # at most N examples of a split (a seeded sample)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data):
        return {"source": data} if isinstance(data, str) else data


class StrategySpec(BaseModel):
    """One strategy of an experiment: a registered `kind`, training overrides, and the kind's own
    options as further keys (e.g. `continue_adapter` for sequential, `rate` for replay)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    kind: str
    train: dict = Field(default_factory=dict)
    options: dict = Field(default_factory=dict)
    _typed: Strict | None = PrivateAttr(None)  # the options as validated: it knows which the user set

    @model_validator(mode="before")
    @classmethod
    def _gather_options(cls, data):
        if isinstance(data, dict) and "options" not in data:
            core = {"name", "kind", "train"}
            data = {**{k: v for k, v in data.items() if k in core}, "options": {k: v for k, v in data.items() if k not in core}}
        return data

    @field_validator("kind")
    @classmethod
    def _registered(cls, kind: str) -> str:
        from cairn.strategies import STRATEGIES

        if kind not in STRATEGIES:
            raise ValueError(f"unknown strategy kind {kind!r}; allowed: {', '.join(STRATEGIES)}")
        return kind

    @model_validator(mode="after")
    def _typed_options(self):
        from cairn.strategies import STRATEGIES

        try:
            self._typed = STRATEGIES[self.kind].options.model_validate(self.options)
        except ValidationError as exc:
            message = str(config_error(exc, f"strategy {self.name!r} ({self.kind})"))
            if any("unknown key" in e["msg"] for e in exc.errors()):  # the strategy's own keys are allowed too
                fields = STRATEGIES[self.kind].options.model_fields
                message += f" (keys allowed: {', '.join(['name', 'kind', 'train', *(f.alias or k for k, f in fields.items())])})"
            raise ValueError(message) from None
        # every option, defaults included (results.json shows what ran), under its YAML name (`lambda`)
        self.options = self._typed.model_dump(by_alias=True)
        return self

    def typed_options(self):
        """The strategy's options object (a copy), which knows which options the user set."""
        if self._typed is None:  # built without validation (model_construct)
            from cairn.strategies import STRATEGIES

            self._typed = STRATEGIES[self.kind].options.model_validate(self.options)
        return self._typed.model_copy(deep=True)


class SweepSpec(Strict):
    """What `cairn sweep` varies: strategy settings (a grid), seeds and task orders."""

    set: dict[str, list] = Field(default_factory=dict, description="strategies.NAME.KEY -> values; each strategy's keys form a grid")
    seeds: list[Seed] | None = Field(None, min_length=1, description="default: the experiment's seeds")
    orders: int = Field(1, ge=1, description="the config's task order, then orders - 1 other permutations")
    order_seed: int = Field(0, ge=0, description="seeds the draw of the other task orders")

    @field_validator("seeds")
    @classmethod
    def _unique(cls, seeds):
        if seeds is not None and len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be unique, got {seeds}")
        return seeds


class ExperimentConfig(Strict):
    """Base model x task stream x strategies x seeds."""

    name: str = "experiment"
    base: str = DEFAULT_BASE
    data_dir: str | None = None  # relative task paths are read from here (pack:/probe: sources are not)
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

    @model_validator(mode="after")
    def _consistent(self):
        names = [s.name for s in self.strategies]
        if len(set(names)) != len(names):
            raise ValueError(f"strategy names must be unique, got {names}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be unique, got {self.seeds}")
        from cairn.strategies import STRATEGIES

        for s in self.strategies:
            train = self.train_config(s, self.seeds[0])  # every merged training config must validate
            strategy, opts = STRATEGIES[s.kind], s.typed_options()
            if self.setting == "semi" and strategy.reads_history(opts):
                raise ValueError(
                    f"strategy {s.name!r} (kind {s.kind}) trains on earlier tasks' data, which the semi setting "
                    "does not keep; use setting: full, or a semi-collaborative strategy"
                )
            try:
                strategy.check(opts, train)  # what the strategy declares it can run, before any model is loaded
            except ValueError as exc:
                raise ValueError(f"strategy {s.name!r} (kind {s.kind}) {exc}") from None
        if self.sweep is not None:  # every grid point and task order must give a valid experiment
            from cairn.sweep import experiments

            try:
                experiments(self, self.sweep)
            except ConfigError as exc:
                raise ValueError(f"sweep: {exc}") from None
        return self

    def train_config(self, strategy: StrategySpec, seed: int) -> TrainConfig:
        """The experiment's training defaults, overridden by the strategy's, with the run's seed."""
        merged = {**self.train, **strategy.train, "seed": seed}
        try:
            return TrainConfig.model_validate(merged)
        except ValidationError as exc:
            raise ValueError(str(config_error(exc, f"strategy {strategy.name!r} train"))) from None

    def _load(self, spec: TaskSpec, tokenizer=None):
        from cairn.data import Task, load_task
        from cairn.data.chat import as_chat

        source = spec.source
        if self.data_dir and ":" not in source and not Path(source).is_absolute():
            source = str(Path(self.data_dir) / source)
        task = load_task(source, metric=spec.metric, name=spec.name)
        if not isinstance(task, Task):  # an lm-eval probe: lm-eval formats its own prompts
            if spec.limit:
                raise ConfigError(f"{spec.source}: an lm-eval probe runs lm-eval's own task; it takes no limit")
            return task
        if spec.limit:
            task = task.limited(spec.limit)
        chat = self.chat_template if spec.chat_template is None else spec.chat_template
        return as_chat(task, tokenizer) if chat and tokenizer is not None else task

    def load_probes(self, tokenizer=None) -> list:
        """The further probes (`probes`), loaded as `load_tasks` loads the headline one."""
        probes = [self._load(p, tokenizer) for p in self.probes]
        names = [p.name for p in probes]
        if len(set(names)) != len(names):
            raise ConfigError(f"probe names must be unique, got {names}; give duplicates a `name`")
        return probes

    def load_tasks(self, tokenizer=None) -> tuple[list, object]:
        """(stream tasks, probe task or None), loaded from their sources; with `tokenizer`, the
        tasks that use a chat template get their prompts wrapped in it."""
        from cairn.data import Task

        load = lambda spec: self._load(spec, tokenizer)  # noqa: E731
        tasks = [load(t) for t in self.tasks]
        for spec, task in zip(self.tasks, tasks):
            if not isinstance(task, Task):
                raise ConfigError(f"tasks: {spec.source} is measured by lm-eval and has no training data; it can be the probe, not a task")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"task names must be unique, got {names}; give duplicates a `name`")
        return tasks, (load(self.probe) if self.probe else None)

    def out_dir(self) -> Path:
        return Path(self.out or Path("runs") / self.name)


def parse_config(data, where: str = "config") -> ExperimentConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys (name, base, tasks, strategies, ...), got {type(data).__name__}")
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc, where) from None


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment YAML file."""
    return parse_config(read_yaml(path), str(path))


def read_yaml(path: str | Path):
    """A YAML file's data; every way it can fail is a ConfigError naming the file (and line)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from exc
    except RecursionError as exc:
        raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from exc
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        # PyYAML's constructors raise these for a value it cannot build as the date, number or
        # !!type it looks like or is tagged with: 2001-13-01, `!!int ''`, `!!bool maybe`, `!!timestamp x`
        raise ConfigError(
            f"{path}: not valid YAML (a value cannot be read as the date, number or !!type it looks like or is tagged with: "
            f"{type(exc).__name__}: {exc}); quote it to keep it a string"
        ) from exc
    return data


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
        {"name": "olora", "kind": "olora"},
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
