"""Run strategies x seeds over a task stream: R[s][j] and G[s] per stage, cached and resumable.

Shared work is done once: a contribution is keyed by the content hash of (start model, task data,
training config), an evaluation by (model, task data, metric, split). Both are kept under
`OUT/cache/`, so rerunning after an interruption redoes only what had not finished; a stage
interrupted mid-training resumes from its checkpoint under `OUT/cache/checkpoints/`. A strategy
whose training diverges is recorded as such (with the stages it finished) and the others go on.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from cairn import run_folder
from cairn.config import ExperimentConfig
from cairn.data.batching import encode
from cairn.data.loaders import load_train_split
from cairn.data.task import Task
from cairn.distributed import fsdp2_launch, is_main
from cairn.errors import ConfigError, DataError, ModelError, TrainingDiverged
from cairn.evaluation import EvalResult
from cairn.evaluation.scores import summarize
from cairn.io import atomic_write_json
from cairn.manifest import MANIFEST, read_manifest
from cairn.methods.moe.diagnostics import routing_accuracy
from cairn.models import check_base, fingerprint, load_model, recorded_base
from cairn.options import TrainConfig
from cairn.progress import bar as progress_bar
from cairn.report import build_results
from cairn.strategies import STRATEGIES
from cairn.tracking import log_stage, log_summary, open_tracker
from cairn.workspace import Workspace


def _per_task(result: EvalResult) -> dict[str, float]:
    """An lm-eval probe's own tasks' scores, as `PROBE/TASK` (other probes have none)."""
    return {f"{result.task}/{r['task']}": r["score"] for r in result.predictions} if result.metric == "lm-eval" else {}


def _score_stage(work: Workspace, model, fp: str, tasks: list[Task], probe: Task | None, probes: list = ()) -> tuple[list[float], float | None, dict]:
    """(R row, G, {further probe, or lm-eval probe/task: score}) of one stage's model (fingerprint `fp`), on the test splits."""
    row = [work.evaluate(model, fp, t).score for t in tasks]
    headline = work.evaluate(model, fp, probe) if probe else None
    extra = _per_task(headline) if headline else {}
    if isinstance(probe, Task):  # the probe read by likelihood too: the correct answer's log-probability, and whether it outranks others
        read = work.likelihood(model, fp, probe)
        extra = {**extra, f"{probe.name} logprob": read["logprob"], f"{probe.name} ranked first": read["ranked_first"]}
    for p in probes:
        result = work.evaluate(model, fp, p)
        extra = {**extra, p.name: result.score, **_per_task(result)}
    return row, headline.score if headline else None, extra


def _score_eval(work: Workspace, model, fp: str, tasks: list[Task], probe: Task | None) -> tuple[list[float], float | None]:
    """(R row, G) of one stage's model on the eval splits, which tuning chooses on: each task's eval
    split and the probe's eval half (an lm-eval probe, whose split is lm-eval's, gives no G here)."""
    row = [work.evaluate(model, fp, t, "eval").score for t in tasks]
    return row, work.evaluate(model, fp, probe, "eval").score if isinstance(probe, Task) else None


def check_eval_splits(tasks: list[Task], probe) -> None:
    """Tuning chooses on eval splits only: each task and the probe must have one."""
    missing = [t.name for t in [*tasks, *([probe] if isinstance(probe, Task) else [])] if not t.eval]
    if missing:
        raise ConfigError(f"{', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no eval split; tuning chooses on eval splits only (never on test): give each task an eval split")


def _until_diverged(stages: Iterator, failure: dict) -> Iterator:
    """The models `stages` yields, ending quietly when training diverges; `failure["message"]` says why."""
    try:
        yield from stages
    except TrainingDiverged as exc:
        failure["message"] = str(exc)


def _plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {words or word + 's'}"


def _human(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.1f}{prefix}{unit}"
    return f"{x:.0f}{unit}"


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h"


@dataclass
class _Plan:
    """What a run will train, logged once before it starts; once its first training has finished,
    the time the rest should take at that training's speed. Token counts are a rough estimate: each
    stage's task, its examples' tokens (from a sample of up to 200) times the epochs; joint and
    replay train on more, shared and cached work is trained once or not at all."""

    tasks: list[Task]
    tokenizer: object
    since: float = field(default_factory=time.time)  # manifests written after this are this run's trainings
    left: float = 0.0  # estimated tokens still to train
    measured: bool = False
    _lengths: dict = field(default_factory=dict)

    def stage_tokens(self, task: Task, cfg: TrainConfig) -> float:
        """Estimated tokens one training of `task` under `cfg` trains."""
        key = (task.name, cfg.max_length)
        if key not in self._lengths:
            sample = list(task.train)[:200]
            self._lengths[key] = sum(len(encode(ex, self.tokenizer, cfg.max_length)["input_ids"]) for ex in sample) / max(len(sample), 1)
        return self._lengths[key] * len(task.train) * cfg.epochs

    def start(self, cfg: ExperimentConfig, log) -> None:
        n, runs = len(self.tasks), len(cfg.strategies) * len(cfg.seeds)
        self.left = sum(self.stage_tokens(t, cfg.train_config(spec, seed)) for seed in cfg.seeds for spec in cfg.strategies for t in self.tasks)
        log(
            f"plan: {_plural(len(cfg.strategies), 'strategy', 'strategies')} × {_plural(n, 'stage')} × {_plural(len(cfg.seeds), 'seed')}"
            f" = at most {_plural(runs * n, 'training')} (shared and cached work is reused); train examples per task: "
            + ", ".join(f"{t.name} {len(t.train)}" for t in self.tasks)
        )
        log(f"about {_human(self.left)} tokens to train where nothing is cached (a rough estimate: each stage's examples' tokens × epochs; joint and replay train more)")

    def stage_done(self, task: Task, cfg: TrainConfig, used: list[Path], log) -> None:
        """Count a finished stage; after the first one that trained here, log how long the rest should take."""
        self.left = max(self.left - self.stage_tokens(task, cfg), 0.0)
        if self.measured:
            return
        for folder in used:
            m = read_manifest(folder)
            speed = m.get("train", {}).get("tokens_per_s") if m else None
            if speed and (folder / MANIFEST).stat().st_mtime >= self.since:
                self.measured = True
                log(f"first training: {_human(speed, ' tokens/s')}; training the rest (up to ~{_human(self.left)} tokens) should take about {_duration(self.left / speed)}, evaluation aside")
                return


def _check_task_train(cfg: ExperimentConfig, names: list[str]) -> None:
    unknown = sorted({t for spec in cfg.strategies for t in spec.task_train} - set(names))
    if unknown:
        raise ConfigError(f"task_train names {', '.join(unknown)}; the tasks are {', '.join(names)}")


def _config_base(cfg: ExperimentConfig, load):
    """`load(cfg.base)`, a failure saying the name came from the config's `base`."""
    try:
        return load(cfg.base)
    except ModelError as exc:
        raise ModelError(f"{cfg.where}: base {cfg.base!r} cannot be loaded: {exc}; change its `base:`") from exc


def _described(task) -> dict:
    if not isinstance(task, Task):  # an lm-eval probe: lm-eval holds its data
        return {"name": task.name, "metric": task.metric, "examples": "lm-eval's own"}
    return {"name": task.name, "metric": task.metric, "examples": {s: len(xs) for s, xs in task.splits.items()}}


def _check_general_data(cfg: ExperimentConfig) -> None:
    """Every `replay` strategy's `general` source reads as training material (its train split), before any model is loaded."""
    for spec in cfg.strategies:
        general = spec.typed_options().general if spec.kind == "replay" else None
        if general is not None:
            try:
                load_train_split(general)
            except DataError as exc:
                raise ConfigError(f"strategy {spec.name!r}: general {general!r}, the source replayed as general data: {exc}") from None


def _check_sharding(cfg: ExperimentConfig) -> None:
    """Under an FSDP2 launch, refuse before any work the strategies whose training reads whole
    weight matrices (a loss term over the whole adapter or model, OSF's gradient projection), which
    FSDP2 splits between the processes."""
    whole = [s.name for s in cfg.strategies if type(s.typed_options()).whole_weights]
    if whole and fsdp2_launch():
        raise ConfigError(
            f"strategies {', '.join(whole)} train with a loss term or a gradient projection over whole weight matrices, which "
            "FSDP2 shards between the processes; run them in a launch with data parallelism (configs/accelerate/ddp.yaml), where "
            "a cached run resumes, or leave them out of this one (docs/distributed.md)"
        )


def check_experiment(cfg: ExperimentConfig, out: Path | None = None, *, overwrite: bool = False) -> dict:
    """Everything a run of `cfg` reads before it trains, checked without loading a model: the base's
    spec (`check_base`), every task and probe source, task_train's task names, the strategies'
    adapter folders, and what the run folder `out` would do (start, resume, replace; refused as
    `cairn run` would refuse it). Returns the plan: those, and what would be trained."""
    base = _config_base(cfg, check_base)
    tasks, probe = cfg.load_tasks()
    probes = cfg.load_probes()
    _check_task_train(cfg, [t.name for t in tasks])
    _check_general_data(cfg)
    strategies = []
    for spec in cfg.strategies:
        opts, train = spec.typed_options(), cfg.train_config(spec, cfg.seeds[0])
        general = getattr(opts, "general", None)
        if spec.kind == "moe" and general not in (None, "mean") and not (Path(general) / "adapter_config.json").is_file():
            raise ConfigError(f"strategy {spec.name!r}: general {general!r} is not a LoRA adapter folder (no adapter_config.json there); give one, or 'mean'")
        options = opts.model_dump(mode="json", exclude_defaults=True)
        strategies.append({"name": spec.name, "kind": spec.kind, "method": train.method, "lr": train.learning_rate, "epochs": train.epochs, "options": options})
    out = Path(out or cfg.out_dir())
    return {
        "name": cfg.name, "base": cfg.base, "base_checked": base, "setting": cfg.setting,
        "tasks": [_described(t) for t in tasks], "probe": _described(probe) if probe else None, "probes": [_described(p) for p in probes],
        "strategies": strategies, "seeds": list(cfg.seeds), "trainings": len(cfg.strategies) * len(tasks) * len(cfg.seeds),
        "out": str(out), "out_state": run_folder.check(out, cfg.model_dump(mode="json"), overwrite=overwrite),
    }  # fmt: skip


def run_experiment(cfg: ExperimentConfig, out: Path | None = None, *, cache: Path | None = None, eval_splits: bool = False, progress: bool = True, log=print) -> dict | None:
    """Run every strategy for every seed; write per-stage rows and return the results dict. With
    `eval_splits`, every stage is also scored on the eval splits (each run's `eval` entry), for tuning.

    Under `accelerate launch` every process runs the strategies (their training is split between
    the processes); only the main one evaluates, writes and returns the results (the others None).
    Shared work is cached under `cache` (default `OUT/cache`).
    """
    out = Path(out or cfg.out_dir())
    main = is_main()
    _check_sharding(cfg)
    tasks, probe = cfg.load_tasks()
    _check_general_data(cfg)
    names = [t.name for t in tasks]
    tracker = None
    if cfg.tracker and main:
        tracker = open_tracker(cfg.tracker, cfg.name, out / "tracking", cfg.model_dump(mode="json"))
    base, tokenizer = _config_base(cfg, load_model)
    if cfg.chat_template or any(t.chat_template for t in [*cfg.tasks, cfg.probe, *cfg.probes] if t):
        tasks, probe = cfg.load_tasks(tokenizer)  # again, with the prompts in the model's chat template
    probes = cfg.load_probes(tokenizer)
    _check_task_train(cfg, names)
    if eval_splits:
        check_eval_splits(tasks, probe)
    plan = _Plan(tasks, tokenizer) if main else None
    if plan:
        plan.start(cfg, log)
    work = Workspace(Path(cache) if cache else out / "cache", recorded_base(cfg.base), tokenizer, progress)
    base_fp = fingerprint(base) if main else None
    r0, g0, p0 = _score_stage(work, base, base_fp, tasks, probe, probes) if main else ([], None, {})
    e0 = _score_eval(work, base, base_fp, tasks, probe) if main and eval_splits else None
    if main:
        log(f"base: R[0] = {[round(x, 3) for x in r0]}" + (f", G[0] = {g0:.3f}" if probe else ""))

    runs: dict[str, dict[int, dict]] = {}
    for seed in cfg.seeds:
        for spec in cfg.strategies:
            train_cfg = cfg.train_config(spec, seed)
            work.used = []
            work.task_train = {t.name: cfg.train_config(spec, seed, t.name) for t in tasks if t.name in spec.task_train}
            start = time.perf_counter()
            R, G, notes, P = [r0], [g0], [], {name: [v] for name, v in p0.items()}
            E = ([e0[0]], [e0[1]]) if e0 else None
            views = [Task(t.name, t.metric, {"train": list(t.train)}) for t in tasks]  # train splits only
            opts = spec.typed_options()
            history = opts.reads_history()
            stream = ((v, views[:i]) for i, v in enumerate(views)) if history else iter(views)
            stages = STRATEGIES[spec.kind](copy.deepcopy(base), stream, opts, train_cfg, work)
            model, failure, seen = None, {}, 0
            for s, model in enumerate(progress_bar(_until_diverged(stages, failure), total=len(tasks), desc=f"{spec.name} seed {seed}", disable=not progress or not main, leave=True), 1):
                if not history:
                    views[s - 1].train.clear()  # a semi strategy cannot come back to this task's data
                if not main:  # it trained its share; the main process evaluates and writes
                    work.notes.clear()
                    continue
                fp = fingerprint(model)
                row, g, extra = _score_stage(work, model, fp, tasks, probe, probes)
                R.append(row)
                G.append(g)
                for name, v in extra.items():
                    P[name].append(v)
                if E:
                    row_e, g_e = _score_eval(work, model, fp, tasks, probe)
                    E[0].append(row_e)
                    E[1].append(g_e)
                if "contributions" in work.notes:  # a merge or mixture: its newest contribution alone, the upper bound it is read against
                    work.note(alone=work.alone(base, work.notes["contributions"][-1], tasks[s - 1]))
                if spec.kind == "moe" and train_cfg.method == "lora" and s > 1:  # does each task's prompts reach its own expert?
                    work.note(routing_accuracy=[round(x, 3) for x in routing_accuracy(model, tokenizer, [[ex.prompt for ex in t.test] for t in tasks[:s]])])
                notes.append(dict(work.notes))
                work.notes.clear()
                atomic_write_json(out / "seeds" / str(seed) / spec.name / f"stage-{s}.json", {"R": row, "G": g, **({"probes": extra} if extra else {}), **notes[-1]})
                log(f"{spec.name} seed {seed} stage {s}: R = {[round(x, 3) for x in row]}" + (f", G = {g:.3f}" if g is not None else ""))
                plan.stage_done(tasks[s - 1], train_cfg, work.used, log)
                if tracker:
                    trained = [m["train"]["losses"] for m in map(read_manifest, work.used[seen:]) if m and "train" in m]
                    log_stage(tracker, f"{spec.name}/seed-{seed}", s, row, names, g, trained, extra)
                    seen = len(work.used)
                work.drop_checkpoints()
            del model, stages
            if not main:
                continue
            run = {"R": R, "G": G if probe else None, "cost": {**work.cost(), "run_wall_s": round(time.perf_counter() - start, 1)}}
            if P:
                run["probes"] = P
            if E:
                run["eval"] = {"R": E[0], "G": E[1] if E[1][0] is not None else None}
            if failure:  # no summary: the stages after the divergence were never trained
                run.update(summary=None, final=None, diverged={"stage": len(R), "message": failure["message"]})
                work.notes.clear()
                log(f"{spec.name} seed {seed} diverged at stage {len(R)}: {failure['message']}")
            else:
                run["summary"], run["final"] = summarize(R, G if probe else [])
                if E:
                    run["eval"]["summary"], run["eval"]["final"] = summarize(E[0], run["eval"]["G"] or [])
                if tracker:
                    log_summary(tracker, f"{spec.name}/seed-{seed}", run["summary"], run["final"])
            runs.setdefault(spec.name, {})[seed] = run
            if any(notes):
                runs[spec.name][seed]["stages"] = notes
    if tracker:
        tracker.finish()
    if not main:
        return None
    return build_results(cfg, names, runs)
