"""Kill `cairn run` (SIGKILL) at random moments, rerun it, and check nothing was lost or changed.

Each trial starts a fresh run of a small tiny-random experiment, kills it after a random delay
drawn over the length of an uninterrupted run, then reruns the same command to completion. The
final results must equal the uninterrupted run's (same scores, same per-stage rows); temporary
folders a kill leaves behind (`.NAME.*.tmp`) are never read.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

TRIALS = 10


def experiment(tmp_path: Path) -> Path:
    def task(name: str) -> dict:
        path = tmp_path / f"{name}.jsonl"
        rows = [{"prompt": f"Question: {name} code {i}?\nAnswer:", "answer": f"{name[:2]}{i}", "split": s} for i in range(8) for s in ("train", "test")]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return {"source": str(path), "metric": "edit_sim"}  # graded: any change of weights shows in the scores

    config = {
        "name": "kill", "base": "tiny-random", "tasks": [task("alpha"), task("beta")], "probe": task("probe"),
        "train": {"method": "lora", "epochs": 2, "batch_size": 4, "lr": 1e-2},
        "strategies": [
            {"name": "seq-lora", "kind": "sequential"},
            {"name": "seq-fft", "kind": "sequential", "train": {"method": "fft", "lr": 1e-3}},
            {"name": "olora", "kind": "olora"},
            {"name": "merge-ties", "kind": "merge", "method": "ties", "density": 0.5},
        ],
    }  # fmt: skip
    path = tmp_path / "kill.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def command(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "cairn.cli", "run", str(config), "--out", str(out)]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def scores(out: Path) -> dict:
    """What must not change: every strategy's R, G and summaries, and every stage row on disk."""
    results = json.loads((out / "results.json").read_text())
    kept = {name: {k: s[k] for k in ("R", "G", "summary", "final")} for name, s in results["strategies"].items()}
    rows = {str(p.relative_to(out)): json.loads(p.read_text()) for p in sorted((out / "seeds").rglob("stage-*.json"))}
    return {"strategies": kept, "rows": rows}


def test_runs_killed_at_random_moments_resume_to_the_same_results(tmp_path):
    config = experiment(tmp_path)
    start = time.perf_counter()
    subprocess.run(command(config, tmp_path / "reference"), env=ENV, check=True, capture_output=True)
    length = time.perf_counter() - start
    reference = scores(tmp_path / "reference")
    assert any(x > 0 for s in reference["strategies"].values() for row in s["R"] for x in row)
    rng = random.Random(0)
    killed = 0
    for trial in range(TRIALS):
        out = tmp_path / f"trial-{trial}"
        began = time.perf_counter()
        proc = subprocess.Popen(command(config, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(0.2, 0.95) * length)
            length = min(length, time.perf_counter() - began)  # faster than the reference (a busier machine then): aim by this run
        except subprocess.TimeoutExpired:
            proc.kill()  # SIGKILL: no cleanup handlers run
            proc.wait()
            killed += 1
        rerun = subprocess.run(command(config, out), env=ENV, capture_output=True, text=True)
        assert rerun.returncode == 0, f"trial {trial}: rerun failed\n{rerun.stderr[-2000:]}"
        assert scores(out) == reference, f"trial {trial}: results differ from the uninterrupted run"
    print(f"{TRIALS} trials, {killed} killed mid-run, 0 failures")
    assert killed >= TRIALS // 2  # most trials really were interrupted
