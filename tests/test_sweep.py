import json
import statistics

import pytest

import cairn.workspace as workspace
from cairn.cli import main
from cairn.config import SweepSpec, parse_config
from cairn.errors import ConfigError
from cairn.config import experiments, grid, parse_set, task_orders
from cairn.sweep import aggregate, run_sweep
from tests.conftest import code_tasks


@pytest.fixture
def config(tmp_path):
    return {
        "name": "tiny-sweep",
        "base": "tiny-random",
        "tasks": code_tasks(tmp_path, ("alpha", "beta", "gamma")),
        "probe": None,
        "train": {"method": "lora", "epochs": 1, "batch_size": 4, "lr": 1e-2},
        "strategies": [
            {"name": "seq", "kind": "sequential"},
            {"name": "replay", "kind": "replay", "rate": 0.1},
            {"name": "olora", "kind": "olora", "lambda1": 0.1},
        ],
    }


def test_each_swept_strategy_becomes_its_grid_of_variants(config):
    sweep = SweepSpec(set={"strategies.olora.lambda1": [0, 0.5], "strategies.olora.train.lr": [1e-3, 1e-2], "strategies.replay.rate": [0.25]})
    points = grid(parse_config(config), sweep)
    assert [name for name, *_ in points] == [
        "seq", "replay.rate-0.25",
        "olora.lambda1-0.lr-0.001", "olora.lambda1-0.lr-0.01", "olora.lambda1-0.5.lr-0.001", "olora.lambda1-0.5.lr-0.01",
    ]  # fmt: skip
    by_name = {name: strategy for name, _, _, strategy in points}
    assert by_name["olora.lambda1-0.5.lr-0.001"]["lambda1"] == 0.5 and by_name["olora.lambda1-0.5.lr-0.001"]["train"] == {"lr": 1e-3}
    assert by_name["replay.rate-0.25"]["rate"] == 0.25 and by_name["seq"] == {"name": "seq", "kind": "sequential", "train": {}, "continue_adapter": False}


@pytest.mark.parametrize(
    "key, values, message",
    [
        ("strategies.nope.rate", [0.1], "no strategy named 'nope'; the config has seq, replay, olora"),
        ("olora.lambda1", [0.1], "expected strategies.NAME.KEY"),
        ("strategies.replay.rat", [0.1], "rat"),  # the kind's option check names the key and the allowed ones
        ("strategies.replay.rate", [-0.5], "rate"),
        ("strategies.seq.kind", ["merge"], "cannot sweep 'kind'"),
    ],
)
def test_a_bad_sweep_key_or_value_is_refused_before_anything_runs(config, key, values, message):
    with pytest.raises(ConfigError, match=message):
        experiments(parse_config(config), SweepSpec(set={key: values}))
    with pytest.raises(ConfigError, match=message):  # in the YAML's sweep section too
        parse_config({**config, "sweep": {"set": {key: values}}})


def test_task_orders_start_with_the_configs_and_are_distinct_and_seeded():
    orders = task_orders(4, 5, seed=3)
    assert orders[0] == [0, 1, 2, 3] and len({tuple(o) for o in orders}) == 5
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    assert task_orders(4, 5, seed=3) == orders and task_orders(4, 5, seed=4) != orders
    with pytest.raises(ConfigError, match="3 tasks have only 6 orders"):
        task_orders(3, 7, seed=0)


def test_set_values_are_read_as_yaml():
    assert parse_set("strategies.olora.lambda1=0,0.01,1e-1") == ("strategies.olora.lambda1", [0, 0.01, 0.1])
    with pytest.raises(ConfigError, match="expected strategies.NAME.KEY=V1,V2"):
        parse_set("strategies.olora.lambda1")


def _results(values: dict[str, list[list[float]]]) -> list[dict]:
    """Results dicts of one order per list, one seed per value, where every metric equals the value."""
    out = []
    for k in range(len(next(iter(values.values())))):
        strategies = {}
        for name, orders in values.items():
            seeds = {str(i): {"summary": dict.fromkeys(["new", "recent", "retained", "old", "old_change", "op", "bwt", "fwt"], v),
                              "final": dict.fromkeys(["new", "recent", "retained", "old", "old_change", "op", "bwt", "fwt"], v),
                              "cost": {"train_wall_s": 10.0}} for i, v in enumerate(orders[k])}  # fmt: skip
            strategies[name] = {"seeds": seeds} if len(seeds) > 1 else next(iter(seeds.values()))
        out.append({"strategies": strategies})
    return out


def test_aggregate_gives_the_mean_and_t_interval_over_seeds_and_orders():
    results = _results({"a": [[0.2, 0.4], [0.6, 0.8]], "b": [[0.5], [0.5]]})
    rows = aggregate(results, [("a", "a", {}), ("b", "b", {})])
    xs = [0.2, 0.4, 0.6, 0.8]
    op = rows[0]["final"]["op"]
    assert op["n"] == 4 and op["mean"] == pytest.approx(0.5)
    assert op["ci95"] == pytest.approx(3.182 * statistics.stdev(xs) / 2)  # t(0.975, 3 dof) * s / sqrt(4)
    assert [o["op"] for o in rows[0]["by_order"]] == pytest.approx([0.3, 0.7])
    assert rows[1]["final"]["op"] == {"mean": 0.5, "ci95": 0.0, "n": 2} and rows[1]["runs"] == 2


def test_a_sweep_runs_grid_seeds_and_orders_sharing_work_and_resumes(tmp_path, config, monkeypatch):
    calls = []
    real = workspace.train

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(workspace, "train", counted)
    config["strategies"] = config["strategies"][:2]
    config["tasks"] = config["tasks"][:2]
    sweep = SweepSpec(set={"strategies.replay.rate": [0.0, 0.5]}, seeds=[0, 1], orders=2)
    summary = run_sweep(parse_config(config), sweep, tmp_path / "sw", progress=False, log=lambda *_: None)
    assert [row["variant"] for row in summary["rows"]] == ["seq", "replay.rate-0.0", "replay.rate-0.5"]
    assert all(row["runs"] == 4 for row in summary["rows"])  # 2 seeds x 2 orders
    assert summary["orders"] == [["alpha", "beta"], ["beta", "alpha"]]
    # The aggregate is over the per-seed values each order's run wrote.
    per_run = [run["final"]["op"] for k in (0, 1) for run in json.loads((tmp_path / "sw" / f"order-{k}" / "results.json").read_text())["strategies"]["replay.rate-0.5"]["seeds"].values()]
    assert summary["rows"][2]["final"]["op"]["mean"] == pytest.approx(statistics.mean(per_run))
    # 3 variants x 2 seeds x 2 orders x 2 stages = 24 stage trainings; but rate 0 replays nothing, so
    # it is seq again, and rate 0.5 replays nothing at stage 1 either: 2 x 2 x (2 + 1).
    assert len(calls) == 12
    for name in ("sweep.json", "sweep.md", "sweep_replay_rate.png", "order-0/report.html", "order-1/summary.md"):
        assert (tmp_path / "sw" / name).is_file(), name
    assert "| replay.rate-0.5 | 4 |" in (tmp_path / "sw" / "sweep.md").read_text()

    calls.clear()
    again = run_sweep(parse_config(config), sweep, tmp_path / "sw", progress=False, log=lambda *_: None)
    assert calls == [] and again["rows"] == summary["rows"]  # a finished sweep is entirely reused


def test_cli_sweep_reads_set_seeds_and_orders_and_refuses_bad_ones(tmp_path, config, capsys):
    import yaml

    config["strategies"] = config["strategies"][:1]
    config["tasks"] = config["tasks"][:2]
    config["sweep"] = {"seeds": [0]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["sweep", str(path), "--set", "strategies.seq.train.lr=0.01,0.001", "--orders", "1", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "seq.lr-0.01" in out and "seq.lr-0.001" in out and "sweep.md" in out
    assert json.loads((tmp_path / "o" / "sweep.json").read_text())["sweep"]["set"] == {"strategies.seq.train.lr": [0.01, 0.001]}
    assert main(["sweep", str(path), "--set", "strategies.nope.rate=1"]) == 4
    assert "no strategy named 'nope'" in capsys.readouterr().err
    assert main(["sweep", str(path), "--seeds", "0,x"]) == 4
    assert main(["sweep", str(path), "--orders", "3"]) == 4  # 2 tasks have 2 orders
