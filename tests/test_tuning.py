import json

import pytest

from cairn.config import LR_BRACKET, TuneSpec, parse_config, tuning_grid
from cairn.errors import ConfigError
from cairn.tuning import _keeps_most, _point_label, choose, frontier, pareto, run_tuning


def split_tasks(folder, names=("alpha", "beta")) -> list[str]:
    """JSONL tasks of 6 train, 3 eval and 3 test `NAME code i?` examples each."""
    paths = []
    for name in names:
        rows = [{"prompt": f"Question: {name} code {i}?\nAnswer:", "answer": f"{name[:2]}{i}", "split": "train"} for i in range(6)]
        rows += [{"prompt": f"Q: the {name} code of {i}?\nA:", "answer": f"{name[:2]}{i}", "split": "eval" if i < 3 else "test"} for i in range(6)]
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(str(path))
    return paths


@pytest.fixture
def config(tmp_path):
    return {
        "name": "tiny-tune",
        "base": "tiny-random",
        "tasks": split_tasks(tmp_path),
        "probe": None,
        "train": {"method": "lora", "epochs": 1, "batch_size": 4, "lora_r": 4},
        "strategies": [{"name": "seq", "kind": "sequential"}, {"name": "avg", "kind": "merge", "method": "average"}],
        "tune": {"grid": {"seq": {"train.lr": [1e-3, 1e-2]}, "avg": {"train.lr": [1e-3, 1e-2]}}},
    }


def test_every_strategy_gets_the_same_number_of_grid_points(config):
    cfg = parse_config(config)
    names = [name for name, *_ in tuning_grid(cfg, cfg.tune)]
    assert names == ["seq.lr-0.001", "seq.lr-0.01", "avg.lr-0.001", "avg.lr-0.01"]
    config["tune"]["grid"]["avg"] = {"train.lr": [1e-3]}
    with pytest.raises(ConfigError, match=r"same number of grid points \(budget 2\); avg has 1"):
        parse_config(config)


def test_a_strategy_without_a_grid_tunes_its_methods_learning_rate_over_its_bracket(config):
    config["strategies"].append({"name": "fft", "kind": "sequential", "train": {"method": "fft"}})
    config["tune"] = {"grid": {"seq": {"train.lr": [1e-3, 1e-2]}}, "budget": 2}
    cfg = parse_config(config)
    by_strategy = {}
    for _, strategy, point, _ in tuning_grid(cfg, cfg.tune):
        by_strategy.setdefault(strategy, []).append(point["train.lr"])
    assert by_strategy["fft"] == list(LR_BRACKET["fft"]) and by_strategy["avg"] == list(LR_BRACKET["lora"])


def test_a_grid_for_a_strategy_the_config_lacks_is_refused(config):
    config["tune"]["grid"]["nope"] = {"train.lr": [1e-3, 1e-2]}
    with pytest.raises(ConfigError, match="grid names nope, which is not a strategy; the config has seq, avg"):
        parse_config(config)


def row(strategy, variant, eval_op, eval_change, test_op, test_change=0.0):
    stat = lambda m: {"mean": m, "ci95": None}  # noqa: E731
    return {"strategy": strategy, "variant": variant, "values": {}, "eval": {"op": eval_op, "new": eval_op, "old_change": eval_change},
            "test": {"op": stat(test_op), "new": stat(test_op), "old_change": stat(test_change)}, "train_wall_s": 1.0}


def test_the_choice_reads_eval_scores_only_and_respects_the_forgetting_bound():
    rows = [row("a", "a.1", 0.9, -0.5, 0.1), row("a", "a.2", 0.6, -0.05, 0.2), row("a", "a.3", 0.5, -0.01, 0.99)]
    assert choose(rows, TuneSpec())["a"]["variant"] == "a.1"  # the best eval op; test's 0.99 plays no part
    bounded = choose(rows, TuneSpec(max_forgetting=0.1))["a"]
    assert bounded["variant"] == "a.2" and bounded["bound_met"]
    none_met = choose(rows, TuneSpec(max_forgetting=0.001))["a"]
    assert none_met["variant"] == "a.3" and not none_met["bound_met"]  # none qualifies: the one that forgets least


def test_the_pareto_front_keeps_the_points_nothing_beats_on_both_axes():
    assert pareto([(0.1, -0.1), (0.5, -0.2), (0.4, -0.3), (0.9, -0.6), (0.9, -0.7)]) == [0, 1, 3]


def test_the_matched_comparison_picks_on_eval_and_reports_test():
    rows = [row("lora", "l1", 0.3, -0.1, 0.3, -0.1), row("lora", "l2", 0.8, -0.6, 0.8, -0.6),
            row("fft", "f1", 0.6, -0.2, 0.6, -0.25), row("fft", "f2", 0.9, -0.3, 0.9, -0.35)]  # fmt: skip
    at_half = frontier(rows, "op", at=(0.5,))["matched"][0]
    assert at_half["strategies"]["lora"]["variant"] == "l2" and at_half["strategies"]["fft"]["variant"] == "f1"
    assert at_half["keeps_most"] == "fft" and at_half["strategies"]["fft"]["old_change"]["mean"] == -0.25


def test_the_matched_comparison_tests_the_winner_against_each_other_strategy_over_seeds():
    rows = [row("lora", "l1", 0.8, -0.6, 0.8, -0.6), row("fft", "f1", 0.8, -0.2, 0.8, -0.2)]
    rows[0]["test_old_change"], rows[1]["test_old_change"] = [-0.62, -0.6, -0.58], [-0.21, -0.2, -0.19]
    clear = frontier(rows, "op", at=(0.5,))["matched"][0]
    assert clear["keeps_most"] == "fft" and clear["p"]["lora"] < 0.001
    rows[0]["test_old_change"] = [-0.9, -0.1, -0.8]  # as far apart on average, but noisy
    noisy = frontier(rows, "op", at=(0.5,))["matched"][0]
    assert noisy["p"]["lora"] > 0.05
    rows[0]["test_old_change"] = [-0.6]
    one_seed = frontier(rows, "op", at=(0.5,))["matched"][0]
    assert one_seed["p"]["lora"] is None and _keeps_most(one_seed) == "fft (one seed: no test)"  # nothing to test
    assert _keeps_most(clear).startswith("fft (p = ") and _keeps_most(clear).endswith(" vs lora)")


def test_a_frontier_point_is_labelled_by_its_grid_values_short():
    assert _point_label({"train.lr": 5e-4, "train.lora_r": 16}) == "lr 5e-4, r 16"
    assert _point_label({"train.lr": 2e-05, "density": 0.5}) == "lr 2e-5, density 0.5"


def test_tuning_chooses_per_strategy_then_runs_the_verdict_at_the_chosen_setting(config, tmp_path):
    summary = run_tuning(parse_config(config), tmp_path / "out", progress=False, log=lambda *_: None)
    assert set(summary["chosen"]) == {"seq", "avg"} and summary["budget"] == 2
    assert {r["variant"] for r in summary["rows"]} == {"seq.lr-0.001", "seq.lr-0.01", "avg.lr-0.001", "avg.lr-0.01"}
    for r in summary["rows"]:  # every point was scored on both split kinds
        assert r["eval"]["op"] is not None and r["test"]["op"]["mean"] is not None
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["strategies"]) == {"seq", "avg"}
    for name, entry in results["strategies"].items():
        chosen = summary["chosen"][name]
        assert entry["tuning"]["chosen"] == chosen["values"] and entry["tuning"]["points"] == 2
        strategy = next(s for s in results["config"]["strategies"] if s["name"] == name)
        assert strategy["train"]["lr"] == chosen["values"]["train.lr"]
    assert (tmp_path / "out" / "tune.md").is_file() and (tmp_path / "out" / "frontier.png").stat().st_size > 0


def test_in_the_semi_setting_each_contributor_chooses_its_own_training_settings(config, tmp_path):
    config = {**config, "setting": "semi", "strategies": [config["strategies"][1]], "tune": {"grid": {"avg": {"train.lr": [1e-3, 1e-2]}}}}
    summary = run_tuning(parse_config(config), tmp_path / "out", progress=False, log=lambda *_: None)
    per_task = summary["task_train"]["avg"]
    assert set(per_task) == {"alpha", "beta"} and all(set(v) == {"lr"} for v in per_task.values())
    assert {t["task"] for t in summary["contributor_tries"]} == {"alpha", "beta"} and len(summary["contributor_tries"]) == 4
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["config"]["strategies"][0]["task_train"] == per_task
    # the tries share OUT/cache with the grid and the verdict, which reuse the chosen ones: 4 trainings in all
    assert not (tmp_path / "out" / "tuning" / "cache").exists() and len(list((tmp_path / "out" / "cache" / "contributions").iterdir())) == 4


def test_cairn_frontier_writes_the_frontier_without_a_verdict_and_refuses_bad_options(config, tmp_path, capsys):
    import yaml

    from cairn.cli import main

    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump({**config, "out": str(tmp_path / "out")}))
    assert main(["frontier", str(path), "--max-forgetting", "0.5"]) in (0, None)
    summary = json.loads((tmp_path / "out" / "tune.json").read_text())
    assert summary["tune"]["max_forgetting"] == 0.5 and summary["frontier"]["strategies"].keys() == {"seq", "avg"}
    assert not (tmp_path / "out" / "results.json").exists()  # the frontier alone runs no verdict
    assert main(["tune", str(path), "--budget", "3"]) == 4  # a config error; grids of 2 points cannot fill a budget of 3
    assert "budget 3" in capsys.readouterr().err


def test_a_merge_stage_records_its_newest_contribution_alone(config, tmp_path):
    from cairn.experiment import run_experiment

    cfg = parse_config({**config, "tune": None, "strategies": [config["strategies"][1]], "train": {**config["train"], "lr": 1e-2}})
    results = run_experiment(cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    stages = results["strategies"]["avg"]["stages"]
    assert [len(s["contributions"]) for s in stages] == [1, 2]
    assert stages[0]["alone"] == results["strategies"]["avg"]["R"][1][0]  # stage 1 is its contribution alone
    assert 0.0 <= stages[1]["alone"] <= 1.0


def test_a_mixture_stage_records_its_routing_accuracy_and_prototype_similarity(config, tmp_path):
    from cairn.experiment import run_experiment

    strategy = {"name": "mix", "kind": "moe", "router": "centroid"}
    cfg = parse_config({**config, "tune": None, "strategies": [strategy], "train": {**config["train"], "lr": 1e-2}})
    stages = run_experiment(cfg, tmp_path / "run", progress=False, log=lambda *_: None)["strategies"]["mix"]["stages"]
    assert "routing_accuracy" not in stages[0]  # one expert: nothing to route between
    assert len(stages[1]["routing_accuracy"]) == 2 and all(0.0 <= a <= 1.0 for a in stages[1]["routing_accuracy"])
    assert 0.0 <= stages[1]["prototypes"]["mean_abs_cos"] <= 1.0 and "alone" in stages[1]
