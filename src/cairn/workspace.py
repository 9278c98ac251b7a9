"""What a strategy may use: a Workspace trains contributions or reuses identical ones, names cache
folders for other work, caches evaluations, and records what each run used and what it cost."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cairn.contributions import train_or_reuse
from cairn.data.task import Task
from cairn.evaluation import EvalResult, evaluate_task
from cairn.evaluation.likelihood import likelihood_scores
from cairn.io import atomic_write_json
from cairn.manifest import read_manifest
from cairn.models import fingerprint
from cairn.options import TrainConfig
from cairn.speedups import uses_bf16
from cairn.training import TrainResult, train


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
    task_train: dict[str, TrainConfig] = field(default_factory=dict)  # per task name: the training config of its stage, where it differs

    def config_for(self, task: Task, cfg: TrainConfig) -> TrainConfig:
        """The training config of `task`'s stage: the strategy's, unless `task_train` names the task
        (tuning's per-contribution choice in the semi setting)."""
        return self.task_train.get(task.name, cfg)

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

    def _contribution_folder(self, start: str, task: Task, cfg: TrainConfig, key: tuple = ()) -> Path:
        return self.folder("contributions", start, task.data_hash(), cfg.model_dump(), uses_bf16(cfg), *key)

    def trained(self, folder: Path, task: Task, cfg: TrainConfig, run: Callable[[], TrainResult], base_fingerprint: str) -> TrainResult | None:
        """`run()`'s result once saved as the contribution `folder` (see `train_or_reuse`), or None
        when identical work saved it before: load it from `folder`. Either way this run used it."""
        self.used.append(folder)
        return train_or_reuse(folder, run, self.tokenizer, task, cfg, base=self.base, base_fingerprint=base_fingerprint)

    def contribution(self, model, task: Task, cfg: TrainConfig) -> Path:
        """The saved contribution of `model` trained on `task` (trained on a copy unless cached), for
        methods that combine contributions rather than continue a model."""
        cfg = self.config_for(task, cfg)
        folder = self._contribution_folder(fingerprint(model), task, cfg)
        if read_manifest(folder) is None:
            self.train(copy.deepcopy(model), task, cfg)
        else:
            self.used.append(folder)
        return folder

    def train(self, model, task: Task, cfg: TrainConfig, *, extra_loss: Callable | None = None, key: tuple = ()):
        """`model` trained on `task` (a PeftModel for LoRA), from cache when this exact work was done.
        A regularised training passes its `extra_loss` (see `cairn.training.train`) and `key`: what
        the term depends on (its kind, options, anchors), which names its own cache folder."""
        cfg = self.config_for(task, cfg)
        start = fingerprint(model)
        folder = self._contribution_folder(start, task, cfg, key)

        def run() -> TrainResult:
            return train(model, self.tokenizer, task.train, cfg, extra_loss=extra_loss, progress=self.progress, desc=f"{key[0] if key else cfg.method} on {task.name}",
                         checkpoint_dir=self.checkpoints(folder))  # fmt: skip

        result = self.trained(folder, task, cfg, run, start)
        if result is not None:
            return result.model
        if cfg.method == "fft":
            return AutoModelForCausalLM.from_pretrained(folder).eval()
        if hasattr(model, "peft_config"):  # continuing an adapter: load its trained state
            set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
            return model.eval()
        return PeftModel.from_pretrained(model, str(folder)).eval()

    def _cached(self, model_fp: str, task: Task, kind: str, split: str, compute: Callable[[], dict]) -> dict:
        """`compute()`'s JSON for (model, task data, what is measured, split), from `eval/` once it is there."""
        path = self.root / "eval" / f"{_key(model_fp, task.data_hash(), kind, split)}.json"
        if path.is_file():
            return json.loads(path.read_text())
        result = compute()
        atomic_write_json(path, result)
        return result

    def _scored(self, build: Callable[[], object], model_fp: str, task: Task, split: str) -> EvalResult:
        extract = getattr(task, "extract", "full")  # an lm-eval probe extracts as its own task says
        kind = task.metric if extract == "full" else f"{task.metric}/{extract}"  # "full" keeps the keys of earlier caches
        return EvalResult(**self._cached(model_fp, task, kind, split, lambda: evaluate_task(build(), self.tokenizer, task, split=split, progress=self.progress).to_dict()))

    def evaluate(self, model, model_fp: str, task: Task, split: str = "test") -> EvalResult:
        """`model` scored on `task`'s split, cached by the model's fingerprint, the task's data, metric and extraction."""
        return self._scored(lambda: model, model_fp, task, split)

    def likelihood(self, model, model_fp: str, task: Task, split: str = "test") -> dict:
        """`task`'s split read by likelihood (evaluation/likelihood.py), cached like `evaluate`."""

        def compute() -> dict:
            result = likelihood_scores(model, self.tokenizer, task, split=split)
            return {"logprob": round(result.mean_logprob, 4), "ranked_first": round(result.ranked_first, 4), "n": result.n}

        # A mixture routing by the whole prompt is read under the prompt's routing (as it generates);
        # readings cached before that routed on prompt + answer and are not reused.
        kind = "likelihood/prompt-routed" if getattr(model, "reads_whole_prompt", False) else "likelihood"
        return self._cached(model_fp, task, kind, split, compute)

    def alone(self, base, name: str, task: Task) -> float:
        """The test score on `task` of the contribution `name` (a folder under contributions/)
        alone on `base`: the upper bound a merge or mixture of it is read against. The model is
        built only when the score is not cached."""
        folder = self.root / "contributions" / name

        def build():
            if (folder / "adapter_config.json").is_file():
                return PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
            return AutoModelForCausalLM.from_pretrained(folder).eval()

        return self._scored(build, f"contribution {name}", task, "test").score

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
