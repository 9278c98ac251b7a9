import json

import pytest

import cairn.workspace as workspace
from cairn.config import parse_config
from cairn.experiment import run_experiment
from cairn.report import load_results, write_report


@pytest.fixture
def exp_config(tmp_path):
    def task(name, n):
        path = tmp_path / f"{name}.jsonl"
        rows = [{"prompt": f"Question: {name} code {i}?\nAnswer:", "answer": f"{name[:2]}{i}", "split": s}
                for i in range(n) for s in ("train", "test")]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    return {
        "name": "tiny",
        "base": "tiny-random",
        "tasks": [task("alpha", 6), task("beta", 6)],
        "probe": task("probe", 3),
        "train": {"method": "lora", "epochs": 1, "batch_size": 4, "lr": 1e-2},
        "strategies": [
            {"name": "seq-fft", "kind": "sequential", "train": {"method": "fft", "lr": 1e-3}},
            {"name": "seq-lora", "kind": "sequential"},
            {"name": "seq-lora-one", "kind": "sequential", "continue_adapter": True},
        ],
        "seeds": [0],
    }


class Crash(Exception):
    """Stands in for a kill in the middle of training."""


def count_training(monkeypatch, fail_at: int | None = None):
    calls = []
    real = workspace.train

    def counted(*args, **kwargs):
        calls.append(1)
        if fail_at is not None and len(calls) == fail_at:
            raise Crash()
        return real(*args, **kwargs)

    monkeypatch.setattr(workspace, "train", counted)
    return calls


def test_run_gives_a_score_matrix_per_strategy_and_reuses_shared_work(tmp_path, exp_config, monkeypatch):
    calls = count_training(monkeypatch)
    results = run_experiment(parse_config(exp_config), tmp_path / "run", progress=False, log=lambda *_: None)
    assert results["schema"] == 1 and results["tasks"] == ["alpha", "beta"]
    for name in ("seq-fft", "seq-lora", "seq-lora-one"):
        s = results["strategies"][name]
        assert len(s["R"]) == 3 and all(len(row) == 2 for row in s["R"]) and len(s["G"]) == 3
        assert set(s["summary"]) >= {"new", "recent", "retained", "old_change", "op", "bwt", "fwt"}
        assert s["cost"]["tokens"] > 0 and s["cost"]["disk_mb"] > 0
    # Stage 1 of both LoRA strategies is the same contribution: trained once.
    assert len(calls) == 5
    # The base row is shared by every strategy.
    assert len({json.dumps(s["R"][0]) for s in results["strategies"].values()}) == 1


def test_rerun_after_an_interruption_finishes_and_matches(tmp_path, exp_config, monkeypatch):
    cfg = parse_config(exp_config)
    calls = count_training(monkeypatch, fail_at=4)
    with pytest.raises(Crash):
        run_experiment(cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    assert len(calls) == 4
    monkeypatch.undo()
    calls = count_training(monkeypatch)
    resumed = run_experiment(cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    assert len(calls) == 2  # only the interrupted and the remaining stage train again

    calls.clear()
    again = run_experiment(cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    assert calls == []  # a finished run is entirely reused
    fresh = run_experiment(cfg, tmp_path / "fresh", progress=False, log=lambda *_: None)
    for name in fresh["strategies"]:
        assert resumed["strategies"][name]["R"] == fresh["strategies"][name]["R"] == again["strategies"][name]["R"]


def test_seeds_give_per_seed_values_and_a_confidence_interval(tmp_path, exp_config):
    exp_config["seeds"] = [0, 1]
    exp_config["strategies"] = exp_config["strategies"][1:2]
    results = run_experiment(parse_config(exp_config), tmp_path / "run", progress=False, log=lambda *_: None)
    s = results["strategies"]["seq-lora"]
    assert set(s["seeds"]) == {"0", "1"}
    agg = s["aggregate"]["final"]["op"]
    assert agg["n"] == 2 and agg["ci95"] is not None
    assert agg["mean"] == pytest.approx((s["seeds"]["0"]["final"]["op"] + s["seeds"]["1"]["final"]["op"]) / 2)


def test_report_renders_from_a_saved_results_json(tmp_path, exp_config):
    out = tmp_path / "run"
    results = run_experiment(parse_config(exp_config), out, progress=False, log=lambda *_: None)
    write_report(results, out)
    for f in ("results.json", "R_seq-fft.csv", "summary.md", "report.html", "heatmaps.png", "knowledge_per_stage.png", "summary_final.png"):
        assert (out / f).stat().st_size > 0
        if f != "results.json":
            (out / f).unlink()
    write_report(load_results(out), out)  # what `cairn report DIR` does
    html = (out / "report.html").read_text()
    assert "seq-lora-one" in html and 'src="heatmaps.png"' in html
    csv = (out / "R_seq-lora.csv").read_text().splitlines()
    assert csv[0] == "stage,alpha,beta,G" and len(csv) == 4
    assert (out / "summary_final.png").read_bytes()[:4] == b"\x89PNG"


def fingerprint_scores(monkeypatch):
    """Replace evaluation by a score standing for the model's exact weights (a slice of its
    fingerprint): equal scores mean bit-identical models, and nothing is generated."""
    from cairn.evaluation import EvalResult
    from cairn.models import fingerprint

    def score(model, tokenizer, task, **_):
        return EvalResult(task.name, task.metric, "test", len(task.test), int(fingerprint(model)[:8], 16) / 16**8)

    monkeypatch.setattr(workspace, "evaluate_task", score)


def checkpointing_every_step(monkeypatch, extra_losses: dict) -> None:
    """The runner's trainings checkpoint after every step; the n-th one started (from 1) adds
    `extra_losses[n]` to its loss."""
    from cairn.training import train

    started = []

    def patched(*args, **kwargs):
        started.append(1)
        extra = extra_losses.get(len(started))
        return train(*args, **{**kwargs, "checkpoint_every": 1, **({"extra_loss": extra} if extra else {})})

    monkeypatch.setattr(workspace, "train", patched)


def extra_loss(calls: list, fault_at: int | None = None, fault=Crash):
    """An extra loss of 0 that records each call (one per step here) and, from call `fault_at`
    on, raises `fault` or (for a float) adds it."""
    import torch

    def extra(_model):
        calls.append(1)
        if fault_at is None or len(calls) < fault_at:
            return torch.zeros(())
        if isinstance(fault, float):
            return torch.tensor(fault)
        raise fault()

    return extra


def test_a_stage_interrupted_mid_training_resumes_from_its_checkpoint(tmp_path, exp_config, monkeypatch):
    exp_config["strategies"] = exp_config["strategies"][1:2]  # seq-lora
    exp_config["train"]["epochs"] = 2  # 6 examples in batches of 4: 4 steps per stage
    cfg = parse_config(exp_config)
    fingerprint_scores(monkeypatch)
    checkpointing_every_step(monkeypatch, {2: extra_loss([], fault_at=4)})  # stage 2 dies in its 4th step
    with pytest.raises(Crash):
        run_experiment(cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    checkpoints = tmp_path / "run" / "cache" / "checkpoints"
    assert [p.name for p in checkpoints.glob("*/*")] == ["step-00000003"]  # stage 1's was removed when done

    steps = []
    checkpointing_every_step(monkeypatch, {1: extra_loss(steps)})
    resumed = run_experiment(cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    assert len(steps) == 1  # only the step that was lost
    assert list(checkpoints.iterdir()) == []
    monkeypatch.undo()
    fingerprint_scores(monkeypatch)  # an uninterrupted run with the runner's own training
    fresh = run_experiment(cfg, tmp_path / "fresh", progress=False, log=lambda *_: None)
    assert resumed["strategies"]["seq-lora"]["R"] == fresh["strategies"]["seq-lora"]["R"]


def test_a_diverging_strategy_is_reported_and_the_others_go_on(tmp_path, exp_config, monkeypatch):
    exp_config["strategies"] = exp_config["strategies"][:2]  # seq-fft, then seq-lora
    fingerprint_scores(monkeypatch)
    # Trainings in order: seq-fft stages 1 and 2 (a NaN loss from its 2nd and last step), seq-lora 1 and 2.
    checkpointing_every_step(monkeypatch, {2: extra_loss([], fault_at=2, fault=float("nan"))})
    out = tmp_path / "run"
    results = run_experiment(parse_config(exp_config), out, progress=False, log=lambda *_: None)
    fft, lora = results["strategies"]["seq-fft"], results["strategies"]["seq-lora"]
    assert list(fft["diverged"]) == ["0"] and fft["diverged"]["0"]["stage"] == 2
    assert "loss nan at step 2 of 2 (epoch 1 of 1); the last good checkpoint (step 1)" in fft["diverged"]["0"]["message"]
    assert len(fft["R"]) == 2 and set(fft["summary"].values()) == set(fft["final"].values()) == {None}
    assert "diverged" not in lora and len(lora["R"]) == 3 and lora["final"]["op"] is not None
    assert [p.name for p in (out / "cache" / "checkpoints").glob("*/*")] == ["step-00000001"]  # kept
    assert not (out / "seeds" / "0" / "seq-fft" / "stage-2.json").exists()
    write_report(results, out)
    summary = (out / "summary.md").read_text()
    assert "| seq-fft | diverged at stage 2 |" in summary and "## Diverged" in summary
    assert len((out / "R_seq-fft.csv").read_text().splitlines()) == 3  # header, base, stage 1


def test_a_diverged_seed_is_named_and_left_out_of_the_means(exp_config):
    from cairn.evaluation.scores import summarize
    from cairn.report import build_results, summary_rows

    cost = {"train_wall_s": 1.0, "tokens": 10, "trainable_params": 5, "peak_mem_mb": 1.0, "disk_mb": 1.0, "run_wall_s": 1.0}
    done = {"R": [[0.0, 0.0], [0.5, 0.0], [0.25, 0.75]], "G": [0.5, 0.5, 0.4], "cost": cost}
    done["summary"], done["final"] = summarize(done["R"], done["G"])
    failed = {"R": [[0.0, 0.0], [0.1, 0.0]], "G": [0.5, 0.3], "cost": cost, "summary": None, "final": None,
              "diverged": {"stage": 2, "message": "loss nan"}}
    results = build_results(parse_config({**exp_config, "seeds": [0, 1]}), ["alpha", "beta"], {"seq-lora": {0: done, 1: failed}})
    s = results["strategies"]["seq-lora"]
    assert s["R"] == done["R"] and s["final"] == done["final"] and s["aggregate"]["final"]["op"]["n"] == 1
    assert s["diverged"] == {"1": failed["diverged"]} and s["seeds"]["1"] == failed
    assert summary_rows(results)[0][0] == "seq-lora (seed 1 diverged at stage 2; mean of the other seeds)"


def test_a_run_logs_its_plan_first_and_a_time_estimate_once_its_first_training_is_done(tmp_path, exp_config):
    lines = []
    out = tmp_path / "run"
    results = run_experiment(parse_config(exp_config), out, progress=False, log=lines.append)
    # 3 strategies x 2 tasks x 1 seed; 6 train examples per task.
    assert lines[0] == "plan: 3 strategies × 2 stages × 1 seed = at most 6 trainings (shared and cached work is reused); train examples per task: alpha 6, beta 6"
    # Each sequential stage trains its task's examples once (1 epoch): the estimate is what the costs count.
    total = sum(s["cost"]["tokens"] for s in results["strategies"].values())
    assert lines[1].startswith(f"about {total} tokens to train where nothing is cached (a rough estimate")
    estimates = [i for i, line in enumerate(lines) if line.startswith("first training: ")]
    assert len(estimates) == 1 and lines[estimates[0] - 1].startswith("seq-fft seed 0 stage 1: ")
    manifests = [json.loads(p.read_text()) for p in (out / "cache" / "contributions").glob("*/cairn.json")]
    first = next(m["train"] for m in manifests if m["method"] == "fft" and m["task"] == "alpha")
    speed = f"{first['tokens_per_s']:.0f}" if first["tokens_per_s"] < 1000 else f"{first['tokens_per_s'] / 1000:.1f}k"
    assert lines[estimates[0]].startswith(f"first training: {speed} tokens/s; training the rest (up to ~{total - first['tokens']} tokens) should take about ")

    again = []
    run_experiment(parse_config(exp_config), out, progress=False, log=again.append)
    assert again[0] == lines[0] and not any(line.startswith("first training: ") for line in again)  # nothing was trained


def test_the_cost_sums_time_and_tokens_over_the_trainings_and_takes_the_largest_peak(tmp_path):
    from cairn.workspace import Workspace

    def contribution(name, wall_s, tokens, peak, params):
        folder = tmp_path / name
        folder.mkdir()
        train = {"wall_s": wall_s, "tokens": tokens, "peak_mem_mb": peak, "trainable_params": params}
        (folder / "cairn.json").write_text(json.dumps({"train": train}))
        (folder / "weights").write_bytes(b"\0" * 2**20)
        return folder

    a, b = contribution("a", 1.5, 100, 30.0, 10), contribution("b", 2.5, 200, 50.0, 20)
    work = Workspace(tmp_path, "tiny-random", tokenizer=None, used=[a, b, a])  # `a` used twice, trained once
    assert work.cost() == {"train_wall_s": 4.0, "tokens": 300, "trainable_params": 20, "peak_mem_mb": 50.0, "disk_mb": 2.0}


def test_a_base_that_cannot_be_loaded_is_named_with_the_config_it_came_from(tmp_path):
    import pytest

    from cairn import api
    from cairn.errors import ModelError

    path = tmp_path / "exp.yaml"
    path.write_text("base: bundled:nope\ntasks: ['pack:people?facts=3']\nstrategies: [{name: s, kind: sequential}]\n")
    with pytest.raises(ModelError, match=r"exp.yaml: base 'bundled:nope' cannot be loaded: unknown bundled model 'nope'.*change its `base:`"):
        api.check(path, tmp_path / "out")
    with pytest.raises(ModelError, match=r"exp.yaml: base 'bundled:nope' cannot be loaded"):
        api.run(path, tmp_path / "out")
