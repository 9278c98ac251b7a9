import random
from collections import Counter

import pytest

from cairn.config import QUICKSTART, parse_config
from cairn.data import Example, Task
from cairn.errors import ConfigError
from cairn.methods.replay import joint_mixture, replay_sample
from cairn.options import STRATEGY_OPTIONS, JointOptions, OLoRAOptions, ReplayOptions, StrategyOptions, TrainConfig
from cairn.strategies import STRATEGIES


def task(name: str, n: int) -> Task:
    return Task(name, "exact", {"train": [Example(f"{name} q{i}", f"{name}{i}") for i in range(n)]})


class FakeModel:
    def merge_and_unload(self):
        return self


class FakeWork:
    """Records what a strategy asks to train on, without training."""

    def __init__(self):
        self.trained, self.notes = [], []

    def train(self, model, task, cfg):
        self.trained.append(task)
        return FakeModel()

    def note(self, **info):
        self.notes.append(info)


def run(kind, tasks, opts, seed=0):
    work = FakeWork()
    stream = ((t, tasks[:i]) for i, t in enumerate(tasks))
    models = list(STRATEGIES[kind](FakeModel(), stream, opts, TrainConfig(seed=seed), work))
    assert len(models) == len(tasks)
    return work


def test_replay_sample_repeats_only_when_the_task_is_too_small():
    rng = random.Random(0)
    assert len(set(replay_sample(100, 10, rng))) == 10
    counts = Counter(replay_sample(4, 10, rng))
    assert set(counts) == {0, 1, 2, 3} and sorted(counts.values()) == [2, 2, 3, 3]
    assert replay_sample(50, 7, random.Random(3)) == replay_sample(50, 7, random.Random(3))


def test_replay_mixes_rate_times_the_current_task_from_each_earlier_task():
    tasks = [task("a", 40), task("b", 30), task("c", 50)]
    work = run("replay", tasks, ReplayOptions(rate=0.1))
    sizes = [len(t.train) for t in work.trained]
    assert sizes == [40, 30 + 3, 50 + 5 + 5]
    last = Counter(ex.answer[0] for ex in work.trained[2].train)
    assert last == {"c": 50, "a": 5, "b": 5}
    assert [sorted(n["replayed"]) for n in work.notes] == [[], ["a"], ["a", "b"]]
    assert work.notes[2]["replayed"]["a"] == run("replay", tasks, ReplayOptions(rate=0.1)).notes[2]["replayed"]["a"]
    assert work.notes[2]["replayed"]["a"] != run("replay", tasks, ReplayOptions(rate=0.1), seed=1).notes[2]["replayed"]["a"]


def test_replay_from_a_smaller_task_repeats_examples():
    work = run("replay", [task("a", 3), task("b", 100)], ReplayOptions(rate=0.1))
    assert Counter(ex.answer[0] for ex in work.trained[1].train)["a"] == 10


def test_joint_mixtures():
    tasks = [task("a", 10), task("b", 4)]
    natural = joint_mixture(tasks, "natural", 0)
    balanced = joint_mixture(tasks, "balanced", 0)
    assert Counter(ex.answer[0] for ex in natural) == {"a": 10, "b": 4}
    assert Counter(ex.answer[0] for ex in balanced) == {"a": 10, "b": 10}
    assert {ex.answer for ex in balanced if ex.answer[0] == "a"} == {f"a{i}" for i in range(10)}
    work = run("joint", tasks, JointOptions(mix="natural"))
    assert [len(t.train) for t in work.trained] == [10, 14] and work.trained[1].name == "a+b"
    assert work.trained[0] is tasks[0]  # stage 1 trains on the task itself, so its contribution is shared


def test_semi_setting_refuses_strategies_that_read_earlier_data():
    for kind in ("replay", "joint"):
        with pytest.raises(ConfigError, match=f"strategy 'x' \\(kind {kind}\\) trains on earlier tasks' data, which the semi setting"):
            parse_config({**QUICKSTART, "setting": "semi", "strategies": [{"name": "x", "kind": kind}]})
    sequential_only = [s for s in QUICKSTART["strategies"] if s["kind"] == "sequential"]
    assert parse_config({**QUICKSTART, "setting": "semi", "strategies": sequential_only}).setting == "semi"


def test_strategy_options_are_typed_and_checked():
    cfg = parse_config({**QUICKSTART, "strategies": [{"name": "r", "kind": "replay", "rate": 0.25}, {"name": "j", "kind": "joint", "mix": "natural"}]})
    assert cfg.strategies[0].typed_options().rate == 0.25 and cfg.strategies[1].typed_options().mix == "natural"
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'ratio'.*keys allowed: name, kind, train, task_train, rate"):
        parse_config({**QUICKSTART, "strategies": [{"name": "r", "kind": "replay", "ratio": 0.2}]})
    with pytest.raises(ConfigError, match="mix: Input should be 'balanced' or 'natural'"):
        parse_config({**QUICKSTART, "strategies": [{"name": "j", "kind": "joint", "mix": "all"}]})


def add_kind(monkeypatch, kind: str, run, options: type[StrategyOptions] = StrategyOptions) -> None:
    """A throw-away strategy kind: its row in both tables, for this test only."""
    monkeypatch.setitem(STRATEGIES, kind, run)
    monkeypatch.setitem(STRATEGY_OPTIONS, kind, options)


def test_a_semi_strategy_cannot_read_an_earlier_task_later(tmp_path, monkeypatch):
    """The runner empties each stage's train split once the stage is done."""
    import json

    from cairn.experiment import run_experiment

    seen = []

    def peek(model, stream, opts, cfg, work):
        for t in stream:
            assert t.train and not t.test  # the current task's train split, nothing else
            seen.append(t)
            yield model

    add_kind(monkeypatch, "peek", peek)
    paths = []
    for name in ("a", "b"):
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"prompt": f"{name} {i}?", "answer": "x", "split": s}) + "\n" for i in range(3) for s in ("train", "test")))
        paths.append(str(p))
    cfg = parse_config({"base": "tiny-random", "tasks": paths, "probe": None, "setting": "semi", "strategies": [{"name": "p", "kind": "peek"}]})
    run_experiment(cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    assert [t.name for t in seen] == ["a", "b"] and all(not t.train for t in seen)


def test_olora_with_full_fine_tuning_is_refused_when_the_config_is_read_naming_the_strategy():
    for train in ({"train": {"method": "fft"}}, {}):
        config = {**QUICKSTART, "strategies": [{"name": "ortho", "kind": "olora", **train}]}
        if not train:  # the experiment's own training method counts too
            config["train"] = {**QUICKSTART["train"], "method": "fft"}
        with pytest.raises(ConfigError, match=r"strategy 'ortho' \(kind olora\) trains with method lora only, got train method 'fft'; set train: \{method: lora\}"):
            parse_config(config)
    assert parse_config({**QUICKSTART, "strategies": [{"name": "ortho", "kind": "olora", "lambda1": 0.5}]}).strategies[0].typed_options().lambda1 == 0.5


def test_each_strategy_declares_the_training_methods_it_trains_with():
    assert STRATEGY_OPTIONS["olora"].methods == ("lora",) and STRATEGY_OPTIONS["osf"].methods == ("fft",)
    assert all(STRATEGY_OPTIONS[k].methods == ("lora", "fft") for k in ("sequential", "replay", "joint", "merge", "moe", "l2", "ewc", "magmax", "lwf", "opcm"))
    OLoRAOptions().check(TrainConfig(method="lora"))  # what it declares it runs
    with pytest.raises(ValueError, match="trains with method lora only"):
        OLoRAOptions().check(TrainConfig(method="fft"))


def test_the_strategy_table_and_the_options_table_name_the_same_kinds():
    assert list(STRATEGIES) == list(STRATEGY_OPTIONS) == ["sequential", "replay", "joint", "olora", "merge", "moe", "l2", "ewc", "magmax", "lwf", "opcm", "osf"]
    assert all(callable(run) for run in STRATEGIES.values())


def test_a_new_kind_checks_its_options_against_the_training_config_when_the_config_is_read(monkeypatch):
    class OnceOptions(StrategyOptions):
        def fits(self, cfg):
            if cfg.epochs > 1:
                raise ConfigError("one epoch or none")

    add_kind(monkeypatch, "once", lambda model, stream, opts, cfg, work: iter(()), OnceOptions)
    with pytest.raises(ConfigError, match=r"strategy 'o' \(kind once\) with train method lora: one epoch or none"):
        parse_config({**QUICKSTART, "strategies": [{"name": "o", "kind": "once"}]})
    assert parse_config({**QUICKSTART, "strategies": [{"name": "o", "kind": "once", "train": {"epochs": 1}}]}).strategies[0].kind == "once"


def test_a_strategys_options_remember_which_keys_the_config_set():
    cfg = parse_config({**QUICKSTART, "strategies": [{"name": "m", "kind": "merge", "method": "ties", "lambda": 0.5}]})
    spec = cfg.strategies[0]
    assert spec.typed_options().model_fields_set == {"method", "lambda_"}
    assert spec.options == {"method": "ties", "density": 1.0, "gamma": 0.01, "lambda": 0.5, "normalize": None, "seed": 0, "t": None, "filter_wise": False,
                            "epsilon": 0.15, "select_topk": 1.0, "max_iter": 10, "tol": 1e-5, "nuslerp_row_wise": False, "nuslerp_flatten": True,
                            "combine": "delta"}  # what runs, under its YAML names
    assert spec.typed_options() is not spec.typed_options()  # a copy each time: a strategy cannot change the config's


def test_the_continual_learning_baselines_are_semi_collaborative_and_read_their_weight_as_lambda():
    strategies = [{"name": "e", "kind": "ewc", "lambda": 5, "fisher_batch_size": 2}, {"name": "l", "kind": "l2", "lambda": 0.01},
                  {"name": "m", "kind": "magmax", "lambda": 0.5}, {"name": "w", "kind": "lwf", "lambda": 3, "temperature": 1},
                  {"name": "o", "kind": "opcm", "alpha": 0.3}]  # fmt: skip
    cfg = parse_config({**QUICKSTART, "setting": "semi", "strategies": strategies})
    ewc, l2, magmax, lwf, opcm = (s.typed_options() for s in cfg.strategies)
    assert (ewc.lambda_, ewc.fisher_batch_size, l2.lambda_, magmax.lambda_, lwf.lambda_, lwf.temperature, opcm.alpha) == (5, 2, 0.01, 0.5, 3, 1, 0.3)
    assert not any(opts.reads_history() for opts in (ewc, l2, magmax, lwf, opcm))
    with pytest.raises(ConfigError, match="lambda: Input should be greater than or equal to 0"):
        parse_config({**QUICKSTART, "strategies": [{"name": "e", "kind": "ewc", "lambda": -1}]})


def test_replay_with_general_data_mixes_general_rate_times_the_task_at_every_stage(tmp_path):
    import json

    general = tmp_path / "Lima"
    general.mkdir()
    (general / "train.json").write_text(json.dumps([{"prompt": f"g{i}", "answer": f"g{i}"} for i in range(50)]))
    (general / "test.json").write_text(json.dumps([{"prompt": "q", "answer": ""}]))  # empty, as trace-500/Lima's: never read
    tasks = [task("a", 20), task("b", 30)]
    work = run("replay", tasks, ReplayOptions(rate=0.1, general=str(general), general_rate=0.5))
    assert [Counter(ex.answer[0] for ex in t.train) for t in work.trained] == [{"a": 20, "g": 10}, {"b": 30, "a": 3, "g": 15}]
    notes = [n for n in work.notes if "replayed_general" in n]
    assert [len(n["replayed_general"]["Lima"]) for n in notes] == [10, 15]
    assert notes[0]["replayed_general"] == [n for n in run("replay", tasks, ReplayOptions(rate=0.1, general=str(general), general_rate=0.5)).notes if "replayed_general" in n][0]["replayed_general"]


def test_general_rate_without_general_and_a_general_source_that_cannot_be_read_are_refused(tmp_path):
    from cairn.experiment import check_experiment

    with pytest.raises(ConfigError, match="general_rate applies only with general: SOURCE"):
        parse_config({**QUICKSTART, "strategies": [{"name": "r", "kind": "replay", "general_rate": 0.2}]})
    with pytest.raises(ConfigError, match="general_chat_template applies only with general: SOURCE"):
        parse_config({**QUICKSTART, "strategies": [{"name": "r", "kind": "replay", "general_chat_template": True}]})
    cfg = parse_config({**QUICKSTART, "probe": None, "strategies": [{"name": "r", "kind": "replay", "general": str(tmp_path / "nowhere")}]})
    with pytest.raises(ConfigError, match=r"strategy 'r': general '.*nowhere', the source replayed as general data: task source not found"):
        check_experiment(cfg)


def test_a_config_files_general_source_is_read_from_its_folder(tmp_path):
    from cairn.config import load_config

    (tmp_path / "exp.yaml").write_text("base: tiny-random\ntasks: [pack:people]\nstrategies: [{name: r, kind: replay, general: data/Lima}]\n")
    assert load_config(tmp_path / "exp.yaml").strategies[0].typed_options().general == str(tmp_path / "data" / "Lima")


def test_replay_with_general_data_runs_end_to_end(tmp_path):
    import json

    import cairn
    from conftest import code_tasks

    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"prompt": f"Say {i}.", "answer": f"{i}"}) + "\n" for i in range(8)))
    config = parse_config({
        "name": "g", "base": "tiny-random", "tasks": code_tasks(tmp_path), "probe": None,
        "train": {"method": "lora", "epochs": 1, "batch_size": 4, "lr": 1e-2},
        "strategies": [{"name": "rg", "kind": "replay", "rate": 0.5, "general": str(general), "general_rate": 0.5}],
    })  # fmt: skip
    results = cairn.run(config, tmp_path / "run", progress=False, log=lambda *_: None)
    stages = results["strategies"]["rg"]["stages"]
    assert [len(s["replayed_general"]["general"]) for s in stages] == [3, 3] and len(results["strategies"]["rg"]["R"]) == 3


def test_the_continual_baselines_config_tunes_every_new_kind_and_merge_at_equal_budget_on_the_quickstart_stream():
    from pathlib import Path

    from cairn.config import load_config, tuning_grid
    from cairn.options import MERGE_METHODS

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "continual-baselines.yaml")
    assert cfg.setting == "semi" and [t.source for t in cfg.tasks] == QUICKSTART["tasks"] and len(cfg.seeds) == 3
    assert {s.kind for s in cfg.strategies} == {"sequential", "l2", "ewc", "lwf", "magmax", "opcm", "osf", "merge"}
    merged = {s.typed_options().method for s in cfg.strategies if s.kind == "merge"}
    assert merged == {m for m, p in MERGE_METHODS.items() if p.inputs is None} - {"average", "task_arithmetic", "dare_linear", "dare_ties"}
    points = tuning_grid(cfg, cfg.tune)
    assert len(points) == 2 * len(cfg.strategies) and cfg.tune.seeds == [0]  # the same budget for each


@pytest.mark.parametrize("kind", ["l2", "ewc", "lwf", "magmax", "opcm", "osf"])
def test_each_new_kind_trains_two_stages_under_bf16_autocast_as_real_runs_do(kind, tiny, tmp_path):
    """Real runs train in bf16 where the machine has it (frozen weights cast, fused LoRA layer on);
    the regularisers and merges must go through that path too."""
    import copy

    from cairn.workspace import Workspace

    model, tokenizer = tiny
    cfg = TrainConfig(method="fft" if kind == "osf" else "lora", epochs=1, lr=1e-3, batch_size=4, lora_r=4, bf16=True)
    work = Workspace(tmp_path, "tiny-random", tokenizer, progress=False)
    stages = [task(f"t{i}", 8) for i in range(2)]
    notes = []
    for _ in STRATEGIES[kind](copy.deepcopy(model), iter(stages), STRATEGY_OPTIONS[kind](), cfg, work):
        notes.append(dict(work.notes))
        work.notes.clear()
    assert len(notes) == 2
    if kind in ("l2", "ewc", "lwf"):
        assert notes[1]["penalty_ratio"]["last"] > 0


def test_general_data_takes_the_chat_template_the_tasks_use(tmp_path, tiny):
    import json

    from cairn.data.chat import chat_prompt

    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"prompt": f"g{i}", "answer": f"g{i}"}) + "\n" for i in range(4)))
    replay = {"name": "r", "kind": "replay", "general": str(general), "general_rate": 1.0}
    with pytest.raises(ConfigError, match=r"strategy 'r' \(kind replay\) replays general data whose prompts would not be in the chat template the tasks use"):
        parse_config({**QUICKSTART, "chat_template": True, "strategies": [replay]})
    cfg = parse_config({**QUICKSTART, "chat_template": True, "strategies": [{**replay, "general_chat_template": True}]})
    work = FakeWork()
    work.tokenizer = tiny[1]
    list(STRATEGIES["replay"](FakeModel(), iter([(task("a", 4), [])]), cfg.strategies[0].typed_options(), TrainConfig(), work))
    prompts = {ex.prompt for ex in work.trained[0].train if ex.answer.startswith("g")}
    assert prompts and prompts <= {chat_prompt(tiny[1], f"g{i}") for i in range(4)}
