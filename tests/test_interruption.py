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

import pytest
import yaml

# 6 in the suite (each trial is two runs in fresh processes: 27 s; 10 took 4.5 of the suite's 21 min);
# CAIRN_RUN_KILL_TRIALS=10 for the figure of issue 21's closing note.
TRIALS = int(os.environ.get("CAIRN_RUN_KILL_TRIALS", "6"))


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


# --- commands killed while they write -------------------------------------------------------------

KILL_TRIALS = int(os.environ.get("CAIRN_KILL_TRIALS", "3"))  # 10 for the figures in the closing note of issue 21


def _killed_while_writing(argv: list[str], parent: Path, rng: random.Random, cwd: Path, within: float) -> str:
    """Start `cairn ARGV`; once its temporary output appears in `parent`, SIGKILL it after a random
    delay of up to `within` seconds. Returns 'killed writing', 'killed before writing' or 'finished'."""
    proc = subprocess.Popen([sys.executable, "-m", "cairn.cli", *argv], env=ENV, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.perf_counter() + 120
    while proc.poll() is None and time.perf_counter() < deadline:
        if any(p.name.endswith(".tmp") for p in parent.glob(".*")):
            time.sleep(rng.uniform(0, within))
            if proc.poll() is not None:
                return "finished"
            proc.kill()
            proc.wait()
            return "killed writing"
        time.sleep(0.001)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
        return "killed before writing"
    return "finished"


def _complete(folder: Path) -> bool:
    from cairn.manifest import read_manifest, verify_files

    manifest = read_manifest(folder)
    return manifest is not None and not verify_files(folder, manifest["files"])


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    from cairn.data import load_task
    from cairn.options import TrainConfig
    from cairn.contributions import train_contribution

    root = tmp_path_factory.mktemp("kill")
    rows = [{"prompt": f"Question: code {i}?\nAnswer:", "answer": f"c{i}", "split": s} for i in range(16) for s in ("train", "test")]
    (root / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("a", "b"):
        train_contribution("tiny-random", load_task(str(root / "t.jsonl")), TrainConfig(epochs=1, batch_size=4, seed=len(name)), root / name, progress=False)
    return root


# Each command, and about how long it writes its output for (the kill comes at a random moment of it).
COMMANDS = {
    "train": ["train", "--base", "tiny-random", "--task", "t.jsonl", "--epochs", "2", "--batch-size", "4", "--no-eval", "--out"],
    "merge": ["merge", "--method", "ties", "--base", "tiny-random", "--inputs", "./a", "./b", "--out"],
    "mix": ["mix", "--router", "centroid", "--base", "tiny-random", "--inputs", "./a", "./b", "--out"],
}
WRITING = {"train": 0.1, "merge": 0.1, "mix": 0.05}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_command_killed_while_writing_leaves_no_output_a_later_command_takes_for_complete(adapters, command):
    rng = random.Random(command)
    outcomes = []
    for trial in range(KILL_TRIALS):
        out = adapters / "outputs" / command / f"trial-{trial}"
        out.parent.mkdir(parents=True, exist_ok=True)
        outcomes.append(_killed_while_writing([*COMMANDS[command], str(out)], out.parent, rng, adapters, WRITING[command]))
        assert not out.exists() or _complete(out), f"trial {trial} ({outcomes[-1]}): {out} exists but is incomplete"
    print(command, outcomes)
    assert outcomes.count("killed writing") >= KILL_TRIALS // 2 + 1, outcomes
    finished = subprocess.run([sys.executable, "-m", "cairn.cli", *COMMANDS[command], str(out)], env=ENV, cwd=adapters, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert _complete(out)
    assert not [p.name for p in out.parent.glob(".*")], "the temporaries of the killed commands were left behind"


def test_a_store_add_killed_while_copying_leaves_the_store_whole(adapters):
    from cairn.store import Store

    rng = random.Random(0)
    store = adapters / "kill-store"
    outcomes = []
    for trial in range(KILL_TRIALS):
        (store / "items").mkdir(parents=True, exist_ok=True)
        outcomes.append(_killed_while_writing(["store", "--store", str(store), "add", "a", "--name", f"a{trial}"], store / "items", rng, adapters, 0.01))
        assert all(not problems for problems in Store(store).verify().values()), f"trial {trial}: an indexed contribution is incomplete"
    print("store add", outcomes)
    assert outcomes.count("killed writing") >= KILL_TRIALS // 2 + 1, outcomes
    added = subprocess.run([sys.executable, "-m", "cairn.cli", "store", "--store", str(store), "add", "a", "--name", "last"], env=ENV, cwd=adapters, capture_output=True, text=True)
    assert added.returncode == 0, added.stderr[-2000:]
    assert not [p.name for p in (store / "items").glob(".*")], "the temporaries of the killed adds were left behind"
    assert all(not problems for problems in Store(store).verify().values())
