import json

import pytest

import cairn.experiment as experiment
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
    real = experiment.train

    def counted(*args, **kwargs):
        calls.append(1)
        if fail_at is not None and len(calls) == fail_at:
            raise Crash()
        return real(*args, **kwargs)

    monkeypatch.setattr(experiment, "train", counted)
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
