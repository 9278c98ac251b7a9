"""Experiment trackers: a run logged to TensorBoard is read back and matches the results."""

import json

import pytest

from cairn.config import parse_config
from cairn.errors import ConfigError
from cairn.experiment import run_experiment
from cairn.manifest import read_manifest
from cairn.tracking import _flat


def config(tmp_path, tracker):
    path = tmp_path / "alpha.jsonl"
    rows = [{"prompt": f"Question: alpha code {i}?\nAnswer:", "answer": f"al{i}", "split": s} for i in range(6) for s in ("train", "test")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    beta = tmp_path / "beta.jsonl"
    beta.write_text(path.read_text().replace("alpha", "beta").replace('"al', '"be'))
    return parse_config({
        "name": "tracked", "base": "tiny-random", "tasks": [str(path), str(beta)], "probe": None, "tracker": tracker,
        "train": {"method": "lora", "epochs": 2, "batch_size": 4, "lr": 1e-2},
        "strategies": [{"name": "seq", "kind": "sequential"}],
    })  # fmt: skip


def test_a_tensorboard_run_is_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results = run_experiment(config(tmp_path, "tensorboard"), tmp_path / "run", progress=False, log=lambda *_: None)
    logs = tmp_path / "run" / "tracking" / "tracked"
    events = EventAccumulator(str(logs)).Reload()
    tags = set(events.Tags()["scalars"])
    R = results["strategies"]["seq"]["R"]
    for s in (1, 2):
        for j, task in enumerate(results["tasks"]):
            (point,) = [e for e in events.Scalars(f"seq/seed-0/R/{task}") if e.step == s]
            assert point.value == pytest.approx(R[s][j], abs=1e-6)
    losses = [read_manifest(c)["train"]["losses"] for c in sorted((tmp_path / "run" / "cache" / "contributions").iterdir(), key=lambda c: c.stat().st_mtime)]
    logged = [[e.value for e in events.Scalars(f"seq/seed-0/loss/stage-{s}")] for s in (1, 2)]
    assert [len(c) for c in logged] == [len(c) for c in losses] and logged[0] == pytest.approx(losses[0], rel=1e-6)
    summary = results["strategies"]["seq"]["summary"]
    assert events.Scalars("seq/seed-0/summary/op")[0].value == pytest.approx(summary["op"], abs=1e-6)
    assert "seq/seed-0/final/bwt" in tags


def test_a_tracker_whose_package_is_missing_is_a_clear_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match="tracker: mlflow needs the mlflow package"):
        run_experiment(config(tmp_path, "mlflow"), tmp_path / "run", progress=False, log=lambda *_: None)
    with pytest.raises(ConfigError, match="tracker"):
        config(tmp_path, "neptune")


def test_configs_are_flattened_to_scalars_for_hyperparameter_panels():
    assert _flat({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": "x"}) == {"a.b": 1, "a.c": "[1, 2]", "d": "null", "e": "x"}
