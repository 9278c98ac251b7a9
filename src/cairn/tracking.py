"""Experiment trackers: an experiment's training losses, per-stage scores and summary, logged to
TensorBoard, MLflow or Weights & Biases through accelerate's tracker classes (the ones
`Accelerator(log_with=...)` uses), so each tool's own setup and environment variables apply.

Tags: `STRATEGY/seed-S/R/TASK` and `STRATEGY/seed-S/G` at step = stage; `STRATEGY/seed-S/loss/stage-K`
at step = optimizer step of that stage's training; `STRATEGY/seed-S/summary/METRIC` and
`STRATEGY/seed-S/final/METRIC` at step 0.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from cairn.errors import ConfigError

KINDS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # tracker -> the package it needs


def _flat(config: dict, prefix: str = "") -> dict:
    """Nested config -> {"a.b": scalar}; lists and other values as JSON text (hyper-parameter
    panels take scalars only)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = "null" if value is None else value
        else:
            out[name] = json.dumps(value, default=str)
    return out


def open_tracker(kind: str, name: str, folder: Path, config: dict):
    """A started accelerate tracker of `kind` for run `name`, writing under `folder`, with `config`
    stored as the run's hyper-parameters."""
    package = KINDS[kind]
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"tracker: {kind} needs the {package} package, which is not installed (pip install {package})")
    from accelerate import tracking

    folder.mkdir(parents=True, exist_ok=True)
    if kind == "tensorboard":
        tracker = tracking.TensorBoardTracker(name, folder)
    elif kind == "mlflow":
        os.environ.setdefault("MLFLOW_TRACKING_URI", (folder / "mlruns").resolve().as_uri())  # a local file store unless told otherwise
        tracker = tracking.MLflowTracker(experiment_name=name, logging_dir=str(folder))
    else:
        tracker = tracking.WandBTracker(name, dir=str(folder))
    tracker.start()
    tracker.store_init_configuration(_flat(config))
    return tracker


def log_stage(tracker, run: str, stage: int, row: list[float], tasks: list[str], g: float | None, losses: list[list[float]], probes: dict | None = None) -> None:
    """One stage: its scores at step = stage (further probes as `RUN/probe/NAME`), and the loss
    curve of each training it ran."""
    scores = {f"{run}/R/{t}": r for t, r in zip(tasks, row)}
    if g is not None:
        scores[f"{run}/G"] = g
    scores.update({f"{run}/probe/{name}": v for name, v in (probes or {}).items()})
    tracker.log(scores, step=stage)
    for k, curve in enumerate(losses):
        tag = f"{run}/loss/stage-{stage}" + (f"-{k + 1}" if len(losses) > 1 else "")
        for step, loss in enumerate(curve, 1):
            tracker.log({tag: loss}, step=step)


def log_summary(tracker, run: str, summary: dict | None, final: dict | None) -> None:
    values = {f"{run}/{part}/{k}": v for part, d in (("summary", summary), ("final", final)) for k, v in (d or {}).items() if v is not None}
    if values:
        tracker.log(values, step=0)
