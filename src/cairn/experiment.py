"""Run strategies x seeds over a task stream: R[s][j] and G[s] per stage, cached and resumable.

Shared work is done once: a contribution is keyed by the content hash of (start model, task data,
training config), an evaluation by (model, task data, metric, split). Both are kept under
`OUT/cache/`, so rerunning after an interruption redoes only what had not finished; a stage
interrupted mid-training resumes from its checkpoint under `OUT/cache/checkpoints/`. A strategy
whose training diverges is recorded as such (with the stages it finished) and the others go on.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tqdm.auto import tqdm

from cairn.config import ExperimentConfig
from cairn.data.task import Task
from cairn.distributed import barrier, is_main
from cairn.errors import TrainingDiverged
from cairn.evaluation import EvalResult, evaluate_task
from cairn.evaluation.scores import summarize
from cairn.models import fingerprint, load_model
from cairn.io import atomic_write_json
from cairn.store import read_manifest
from cairn.strategies import STRATEGIES
from cairn.training import TrainConfig, bf16_supported, save_contribution, train


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass
class Workspace:
    """Trains or reuses contributions and evaluations under `root`; records what each run used."""

    root: Path
    base: str
    tokenizer: object
    progress: bool = True
    used: list[Path] = field(default_factory=list)
    notes: dict = field(default_factory=dict)

    def note(self, **info) -> None:
        """Let a strategy record what a stage did (e.g. the replayed examples) in its stage row."""
        self.notes.update(info)

    def folder(self, kind: str, *parts) -> Path:
        """The cache folder for a piece of work of `kind` identified by `parts` (hashed)."""
        return self.root / kind / _key(*parts)

    def checkpoints(self, folder: Path) -> Path:
        """Where the training of the contribution (or other work) at `folder` checkpoints itself."""
        return self.root / "checkpoints" / folder.name

    def drop_checkpoints(self) -> None:
        """Delete the checkpoints of the work this run has finished; a stage that diverged keeps its
        last good checkpoint (it has no manifest)."""
        for folder in self.used:
            if read_manifest(folder) is not None:
                shutil.rmtree(self.checkpoints(folder), ignore_errors=True)

    def _contribution_folder(self, start: str, task: Task, cfg: TrainConfig) -> Path:
        bf16 = bf16_supported() if cfg.bf16 == "auto" else cfg.bf16
        return self.folder("contributions", start, task.data_hash(), cfg.model_dump(), bf16)

    def contribution(self, model, task: Task, cfg: TrainConfig) -> Path:
        """The saved contribution of `model` trained on `task` (trained on a copy unless cached), for
        methods that combine contributions rather than continue a model."""
        folder = self._contribution_folder(fingerprint(model), task, cfg)
        if read_manifest(folder) is None:
            self.train(copy.deepcopy(model), task, cfg)
        else:
            self.used.append(folder)
        return folder

    def train(self, model, task: Task, cfg: TrainConfig):
        """`model` trained on `task` (a PeftModel for LoRA), from cache when this exact work was done."""
        from peft import PeftModel, set_peft_model_state_dict
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        start = fingerprint(model)
        folder = self._contribution_folder(start, task, cfg)
        self.used.append(folder)
        barrier()  # every process sees the same cache: all train, or none
        if read_manifest(folder) is None:
            result = train(
                model, self.tokenizer, task.train, cfg, progress=self.progress, desc=f"{cfg.method} on {task.name}", checkpoint_dir=self.checkpoints(folder)
            )
            if is_main():
                save_contribution(result, self.tokenizer, task, cfg, folder, base=self.base, base_fingerprint=start)
            barrier()  # what is saved can be read by every process
            return result.model
        if cfg.method == "fft":
            return AutoModelForCausalLM.from_pretrained(folder).eval()
        if hasattr(model, "peft_config"):  # continuing an adapter: load its trained state
            set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
            return model.eval()
        return PeftModel.from_pretrained(model, str(folder)).eval()

    def evaluate(self, model, model_fp: str, task: Task) -> EvalResult:
        path = self.root / "eval" / f"{_key(model_fp, task.data_hash(), task.metric, 'test')}.json"
        if path.is_file():
            return EvalResult(**json.loads(path.read_text()))
        result = evaluate_task(model, self.tokenizer, task, progress=self.progress)
        atomic_write_json(path, result.to_dict())
        return result

    def cost(self) -> dict:
        """Training cost of the contributions this run used (reused ones count what they cost, a
        contribution used twice counts once): wall time and tokens summed over its trainings, every
        stage's; trainable parameters and peak memory (each training's own rise over where it
        started, `TrainResult.peak_mem_mb`) the largest of them."""
        manifests = [read_manifest(f) for f in dict.fromkeys(self.used)]
        trains = [m["train"] for m in manifests if m]
        return {
            "train_wall_s": round(sum(t["wall_s"] for t in trains), 1),
            "tokens": sum(t["tokens"] for t in trains),
            "trainable_params": max((t["trainable_params"] for t in trains), default=0),
            "peak_mem_mb": max((t["peak_mem_mb"] for t in trains), default=0.0),
            "disk_mb": round(sum(_dir_bytes(f) for f in set(self.used)) / 2**20, 1),
        }


def _per_task(result: EvalResult) -> dict[str, float]:
    """An lm-eval probe's own tasks' scores, as `PROBE/TASK` (other probes have none)."""
    return {f"{result.task}/{r['task']}": r["score"] for r in result.predictions} if result.metric == "lm-eval" else {}


def _score_stage(work: Workspace, model, tasks: list[Task], probe: Task | None, probes: list = ()) -> tuple[list[float], float | None, dict]:
    """(R row, G, {further probe, or lm-eval probe/task: score}) of one stage's model."""
    fp = fingerprint(model)
    row = [work.evaluate(model, fp, t).score for t in tasks]
    headline = work.evaluate(model, fp, probe) if probe else None
    extra = _per_task(headline) if headline else {}
    for p in probes:
        result = work.evaluate(model, fp, p)
        extra = {**extra, p.name: result.score, **_per_task(result)}
    return row, headline.score if headline else None, extra


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
        from cairn.data.batching import encode

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
        from cairn.store import MANIFEST

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


def run_experiment(cfg: ExperimentConfig, out: Path | None = None, *, cache: Path | None = None, progress: bool = True, log=print) -> dict | None:
    """Run every strategy for every seed; write per-stage rows and return the results dict.

    Under `accelerate launch` every process runs the strategies (their training is split between
    the processes); only the main one evaluates, writes and returns the results (the others None).
    Shared work is cached under `cache` (default `OUT/cache`).
    """
    out = Path(out or cfg.out_dir())
    main = is_main()
    tasks, probe = cfg.load_tasks()
    names = [t.name for t in tasks]
    tracker = None
    if cfg.tracker and main:
        from cairn.tracking import open_tracker

        tracker = open_tracker(cfg.tracker, cfg.name, out / "tracking", cfg.model_dump(mode="json"))
    base, tokenizer = load_model(cfg.base)
    if cfg.chat_template or any(t.chat_template for t in [*cfg.tasks, cfg.probe, *cfg.probes] if t):
        tasks, probe = cfg.load_tasks(tokenizer)  # again, with the prompts in the model's chat template
    probes = cfg.load_probes(tokenizer)
    plan = _Plan(tasks, tokenizer) if main else None
    if plan:
        plan.start(cfg, log)
    work = Workspace(Path(cache) if cache else out / "cache", cfg.base, tokenizer, progress)
    r0, g0, p0 = _score_stage(work, base, tasks, probe, probes) if main else ([], None, {})
    if main:
        log(f"base: R[0] = {[round(x, 3) for x in r0]}" + (f", G[0] = {g0:.3f}" if probe else ""))

    runs: dict[str, dict[int, dict]] = {}
    for seed in cfg.seeds:
        for spec in cfg.strategies:
            strategy = STRATEGIES[spec.kind]
            train_cfg = cfg.train_config(spec, seed)
            work.used = []
            start = time.perf_counter()
            R, G, notes, P = [r0], [g0], [], {name: [v] for name, v in p0.items()}
            views = [Task(t.name, t.metric, {"train": list(t.train)}) for t in tasks]  # train splits only
            opts = spec.typed_options()
            history = strategy.reads_history(opts)
            stream = ((v, views[:i]) for i, v in enumerate(views)) if history else iter(views)
            stages = strategy.fn(copy.deepcopy(base), stream, opts, train_cfg, work)
            model, failure, seen = None, {}, 0
            for s, model in enumerate(tqdm(_until_diverged(stages, failure), total=len(tasks), desc=f"{spec.name} seed {seed}", disable=not progress or not main), 1):
                if not history:
                    views[s - 1].train.clear()  # a semi strategy cannot come back to this task's data
                if not main:  # it trained its share; the main process evaluates and writes
                    work.notes.clear()
                    continue
                row, g, extra = _score_stage(work, model, tasks, probe, probes)
                R.append(row)
                G.append(g)
                for name, v in extra.items():
                    P[name].append(v)
                notes.append(dict(work.notes))
                work.notes.clear()
                atomic_write_json(out / "seeds" / str(seed) / spec.name / f"stage-{s}.json", {"R": row, "G": g, **({"probes": extra} if extra else {}), **notes[-1]})
                log(f"{spec.name} seed {seed} stage {s}: R = {[round(x, 3) for x in row]}" + (f", G = {g:.3f}" if g is not None else ""))
                plan.stage_done(tasks[s - 1], train_cfg, work.used, log)
                if tracker:
                    from cairn.tracking import log_stage

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
            if failure:  # no summary: the stages after the divergence were never trained
                run.update(summary=None, final=None, diverged={"stage": len(R), "message": failure["message"]})
                work.notes.clear()
                log(f"{spec.name} seed {seed} diverged at stage {len(R)}: {failure['message']}")
            else:
                run["summary"], run["final"] = summarize(R, G if probe else [])
                if tracker:
                    from cairn.tracking import log_summary

                    log_summary(tracker, f"{spec.name}/seed-{seed}", run["summary"], run["final"])
            runs.setdefault(spec.name, {})[seed] = run
            if any(notes):
                runs[spec.name][seed]["stages"] = notes
    if tracker:
        tracker.finish()
    if not main:
        return None
    from cairn.report import build_results

    return build_results(cfg, names, runs)
