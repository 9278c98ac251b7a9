from pathlib import Path

import pytest
import yaml

from cairn.config import QUICKSTART, load_config, parse_config, quickstart
from cairn.errors import ConfigError
from conftest import TRACE


def write(tmp_path, data, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_quickstart_yaml_equals_the_built_in_quickstart():
    from pathlib import Path

    on_disk = load_config(Path(__file__).parents[1] / "configs" / "quickstart.yaml")
    assert on_disk.model_dump(exclude={"out"}) == quickstart().model_dump(exclude={"out"})


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_every_shipped_config_loads_and_its_tuning_grid_gives_each_strategy_the_same_budget(name):
    from cairn.config import tuning_grid

    cfg = load_config(Path(__file__).parents[1] / "configs" / name)
    if cfg.tune is not None:
        points = tuning_grid(cfg, cfg.tune)
        per_strategy = {}
        for _, strategy, *_ in points:
            per_strategy[strategy] = per_strategy.get(strategy, 0) + 1
        assert set(per_strategy) == {s.name for s in cfg.strategies}
        assert set(per_strategy.values()) == {cfg.tune.points()}


def test_strategy_training_merges_defaults_overrides_and_seed():
    cfg = quickstart()
    fft = cfg.train_config(cfg.strategies[0], seed=3)
    lora = cfg.train_config(cfg.strategies[1], seed=3)
    assert (fft.method, fft.lr, fft.epochs, fft.seed) == ("fft", 1e-4, 8, 3)
    assert (lora.method, lora.lr, lora.lora_r) == ("lora", 1e-3, 16)


@pytest.mark.parametrize("change, message", [
    ({"colour": "blue"}, "unknown key(s) 'colour'; allowed: name, base"),
    ({"setting": "partial"}, "setting: Input should be 'semi' or 'full'"),
    ({"strategies": [{"name": "x", "kind": "teleport"}]}, "unknown strategy kind 'teleport'; allowed: sequential"),
    ({"strategies": [{"name": "x", "kind": "sequential", "train": {"epochs": 0}}]}, "strategy 'x' train: epochs: Input should be greater than or equal to 1"),
    ({"strategies": [{"name": "x", "kind": "sequential", "train": {"lora_rank": 4}}]}, "unknown key(s) 'lora_rank'; allowed: method, epochs"),
    ({"strategies": [{"name": "a", "kind": "sequential"}, {"name": "a", "kind": "sequential"}]}, "strategy names must be unique"),
    ({"strategies": [{"name": "../x", "kind": "sequential"}]}, "strategies.0.name: String should match pattern"),
    ({"tasks": []}, "tasks: List should have at least 1 item"),
    ({"tasks": [{"source": "pack:people", "metric": "bleu"}]}, "tasks.0.metric: Input should be 'exact'"),
])
def test_bad_configs_name_the_key_and_the_allowed_values(tmp_path, change, message):
    path = write(tmp_path, {**QUICKSTART, **change})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_yaml_syntax_error_gives_the_line(tmp_path):
    path = write(tmp_path, "name: x\ntasks: [pack:people\nstrategies: []\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml:\d+:\d+: not valid YAML"):
        load_config(path)


def test_not_a_mapping_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "none.yaml")


def test_duplicate_task_names_are_refused():
    cfg = parse_config({**QUICKSTART, "tasks": ["pack:people", "pack:people"]})
    with pytest.raises(ConfigError, match="task names must be unique"):
        cfg.load_tasks()


@pytest.mark.skipif(not TRACE.is_dir(), reason="../shared/data/trace-500 absent")
def test_trace_config_reads_its_stream_from_data_dir(monkeypatch):
    from pathlib import Path

    root = Path(__file__).parents[1]
    monkeypatch.chdir(root)
    assert Path(load_config("configs/trace.yaml").data_dir).resolve() == TRACE.resolve()  # read from configs/, as documented (../shared may be a link)
    monkeypatch.chdir(root / "src")  # anywhere else: the config's paths are read from its folder
    cfg = load_config(root / "configs" / "trace.yaml")
    tasks, probe = cfg.load_tasks()
    assert [t.name for t in tasks] == ["NumGLUE-cm", "NumGLUE-ds", "FOMC", "ScienceQA"]
    assert [t.metric for t in tasks] == ["exact", "exact", "choice", "choice"]
    assert probe.name == "probe:general"
    assert [(len(t.train), len(t.test)) for t in tasks] == [(100, 50)] * 4  # its limits
    assert len({s.kind for s in cfg.strategies}) == 6  # every strategy kind


def test_a_stream_task_without_train_examples_is_refused_unless_it_trains_on_its_eval_split(tmp_path):
    import json

    rows = [{"prompt": f"q{i}", "answer": f"a{i}", "split": split} for i in range(4) for split in ("eval", "test")]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = parse_config({**QUICKSTART, "tasks": ["pack:people", str(tmp_path / "t.jsonl")]})
    with pytest.raises(ConfigError, match=r"tasks\[1\] .*t.jsonl: no train examples .* or `train_on: eval`"):
        cfg.load_tasks()
    cfg = parse_config({**QUICKSTART, "tasks": ["pack:people", {"source": str(tmp_path / "t.jsonl"), "train_on": "eval"}]})
    (_, task), _ = cfg.load_tasks()
    assert [ex.prompt for ex in task.train] == ["q0", "q1", "q2", "q3"] and task.eval == [] and len(task.test) == 4  # no longer held out
    with pytest.raises(ConfigError, match="train_on: eval is for a source without a train split, and this one has"):
        parse_config({**QUICKSTART, "tasks": [{"source": "pack:people", "train_on": "eval"}]}).load_tasks()
    with pytest.raises(ConfigError, match="train_on"):
        parse_config({**QUICKSTART, "tasks": [{"source": "pack:people", "train_on": "test"}]})


@pytest.mark.skipif(not TRACE.is_dir(), reason="../shared/data/trace-500 absent")
def test_the_reference_studys_config_passes_run_check_offline(capsys):
    """configs/reference-study.yaml: the study's stream in its order, its settings, every method of
    both settings, a placeholder base that the check names as unread."""
    from cairn.cli import main

    config = Path(__file__).parents[1] / "configs" / "reference-study.yaml"
    assert main(["run", str(config), "--check"]) == 0
    out = capsys.readouterr().out
    assert "nothing was trained" in out and "10 strategies x 6 stages" in out and "not checked" in out
    cfg = load_config(config)
    tasks, _ = cfg.load_tasks()
    assert [t.name for t in tasks] == ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "20Minuten"]
    train = cfg.train_config(cfg.strategies[0], 0)
    assert (train.lr, train.scheduler, train.batch_size, train.warmup_ratio) == (2e-5, "constant", 16, 0.0)
    options = {s.name: s.options for s in cfg.strategies}
    assert options["replay-fft"]["rate"] == options["replay-lora"]["rate"] == 0.1
    for name, method in (("merge-ties", "ties"), ("merge-dare-ties", "dare_ties")):
        assert (options[name]["method"], options[name]["density"], options[name]["combine"]) == (method, 0.2, "factors")


def test_a_task_limit_keeps_a_seeded_sample_of_each_named_split_in_order(tmp_path):
    import json

    rows = [{"prompt": f"q{i}", "answer": f"a{i}", "split": split} for i in range(30) for split in ("train", "test")]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = parse_config({**QUICKSTART, "tasks": [{"source": str(tmp_path / "t.jsonl"), "limit": {"train": 10}}]})
    (task,), _ = cfg.load_tasks()
    assert len(task.train) == 10 and len(task.test) == 30
    numbers = [int(ex.prompt[1:]) for ex in task.train]
    assert numbers == sorted(numbers) and numbers != list(range(10))  # a sample, in the file's order
    (again,), _ = cfg.load_tasks()
    assert again.train == task.train  # seeded
    with pytest.raises(ConfigError, match="limit.train: Input should be greater than or equal to 1"):
        parse_config({**QUICKSTART, "tasks": [{"source": "pack:people", "limit": {"train": 0}}]})
    with pytest.raises(ConfigError, match="limit.dev"):
        parse_config({**QUICKSTART, "tasks": [{"source": "pack:people", "limit": {"dev": 5}}]})


@pytest.mark.parametrize("change, messages", [
    ({1: "x"}, ["unknown key(s) 1; allowed: name, base"]),
    ({"strategies": [{"name": "x", "kind": "sequential", 2: True}]}, ["strategy 'x' (sequential)", "unknown key(s) 2; allowed: continue_adapter"]),
    ({"train": {3: 1}}, ["strategy 'seq-fft' train", "unknown key(s) 3; allowed: method"]),
])
def test_keys_that_are_not_strings_are_named(tmp_path, change, messages):
    path = write(tmp_path, {**QUICKSTART, **change})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert all(m in str(err.value) for m in messages) and str(path) in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("name: 2001-13-01\n", "a value cannot be read as the date, number or !!type it looks like or is tagged with: ValueError: month must be in 1..12); quote it"),
    ("seeds: !!int zero\n", "ValueError: invalid literal for int()"),
    ("name: !!bool maybe\n", "KeyError: 'maybe'"),
    ("name: !!timestamp x\n", "AttributeError"),
    ("name: !!int ''\n", "IndexError"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "not valid YAML (nested too deeply)"),
])
def test_bad_dates_numbers_and_deep_nesting_are_config_errors(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("seed, message", [(-1, "seeds.0: Input should be greater than or equal to 0"),
                                           (2**32, "seeds.0: Input should be less than 4294967296")])
def test_seeds_numpy_cannot_take_are_refused(seed, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({**QUICKSTART, "seeds": [seed]})


def test_option_models_parse_their_keywords_into_config_errors_that_name_each_key():
    from cairn.options import TrainConfig

    assert TrainConfig.parse("invalid training option", epochs=2).epochs == 2
    with pytest.raises(ConfigError) as err:
        TrainConfig.parse("invalid training option", epochs=0, lora_rank=4)
    assert str(err.value).startswith("invalid training option: unknown key(s) 'lora_rank'; allowed: method, epochs")
    with pytest.raises(ConfigError) as err:
        TrainConfig.parse("invalid training option", epochs=0)
    assert str(err.value) == "invalid training option: epochs: Input should be greater than or equal to 1" and err.value.exit_code == 4


def test_a_problem_of_a_whole_section_is_reported_without_a_placeholder_key():
    with pytest.raises(ConfigError) as err:
        parse_config({**QUICKSTART, "seeds": [1, 1]})
    assert str(err.value) == "config: seeds must be unique, got [1, 1]"


def test_options_read_back_from_a_dump_count_only_what_was_written():
    from cairn.options import MergeOptions
    from cairn.validation import SAVED, given

    assert given(MergeOptions(method="ties", **{"lambda": 0.5})) == ["method", "lambda"]  # aliases, in field order
    assert given(MergeOptions(method="ties", density=1.0)) == ["method", "density"]  # a default given is given
    dump = MergeOptions(method="ties", density=0.5).model_dump()
    assert given(MergeOptions(**dump)) == ["density"]  # a complete dump: its values off the defaults
    assert given(MergeOptions.model_validate(dump, context=SAVED), None) == ["density"]  # no context outside validation


def test_a_sweep_of_a_merges_lambda_reaches_its_options_and_a_point_its_router_cannot_read_is_refused():
    from cairn.sweep import experiments

    strategies = [{"name": "u", "kind": "moe", "router": "uniform"}, {"name": "m", "kind": "merge", "method": "ties", "lambda": 0.5}]
    cfg = parse_config({**QUICKSTART, "strategies": strategies, "sweep": {"set": {"strategies.m.lambda": [0.2, 0.4]}}})
    configs, _ = experiments(cfg, cfg.sweep)
    assert [s.typed_options().lambda_ for s in configs[0].strategies if s.kind == "merge"] == [0.2, 0.4]
    with pytest.raises(ConfigError, match=r"strategy 'u\.top_k-3' \(moe\): top_k does not apply to router uniform"):
        parse_config({**QUICKSTART, "strategies": strategies, "sweep": {"set": {"strategies.u.top_k": [3]}}})


def test_a_merge_of_at_most_k_inputs_is_refused_on_a_longer_stream_when_the_config_is_read():
    tasks = QUICKSTART["tasks"]  # three
    slerp = {"name": "s", "kind": "merge", "method": "slerp", "t": 0.5}
    nuslerp = {"name": "n", "kind": "merge", "method": "nuslerp"}
    with pytest.raises(ConfigError, match=r"strategy 's' \(kind merge\) runs at most 1 stage.*slerp merges at most 1 contribution.*stream has 3 tasks"):
        parse_config({**QUICKSTART, "strategies": [slerp]})
    with pytest.raises(ConfigError, match=r"nuslerp merges at most 2 contribution.*stream has 3 tasks"):
        parse_config({**QUICKSTART, "strategies": [nuslerp]})
    assert parse_config({**QUICKSTART, "tasks": tasks[:2], "strategies": [nuslerp]}).strategies[0].kind == "merge"
    assert parse_config({**QUICKSTART, "tasks": tasks[:1], "strategies": [slerp]}).strategies[0].kind == "merge"


# --- paths: a config file's relative paths are read from its folder ---------------------------------


def records(path, n=10):
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(n)))
    return path


def experiment(**keys):
    return {**QUICKSTART, "strategies": QUICKSTART["strategies"][:1], "probe": None, **keys}


def test_a_relative_task_source_is_read_from_the_config_files_folder_wherever_cairn_runs(tmp_path, monkeypatch):
    records(tmp_path / "exp" / "data" / "a.jsonl")
    path = write(tmp_path / "exp", experiment(tasks=[{"source": "data/a.jsonl"}]))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_config(path)
    (task,), _ = cfg.load_tasks()
    assert task.name == "a" and len(task.train) == 8
    assert cfg.tasks[0].source == str(tmp_path / "exp" / "data" / "a.jsonl") and cfg.folder == tmp_path / "exp"


def test_data_dir_is_read_from_the_config_files_folder_and_task_sources_from_data_dir(tmp_path, monkeypatch):
    records(tmp_path / "data" / "a.jsonl")
    records(tmp_path / "data" / "p.jsonl")
    (tmp_path / "configs").mkdir()
    path = write(tmp_path / "configs", experiment(data_dir="../data", tasks=["a.jsonl"], probe="p.jsonl"))
    monkeypatch.chdir("/")
    cfg = load_config(path)
    assert cfg.data_dir == str(tmp_path / "data")  # .. collapsed
    (task,), probe = cfg.load_tasks()
    assert (task.name, probe.name) == ("a", "p")


def test_out_is_read_from_the_config_files_folder_and_its_default_from_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    assert load_config(write(tmp_path, experiment(out="../runs/x"))).out_dir() == tmp_path.parent / "runs" / "x"
    assert load_config(write(tmp_path, experiment(out=None, name="n"))).out_dir() == Path("runs") / "n"


def test_absolute_home_and_built_in_sources_are_left_as_written(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    absolute = str(records(tmp_path / "abs.jsonl"))
    sources = [absolute, "pack:people?facts=3", "probe:general", "~/h.jsonl"]
    cfg = load_config(write(tmp_path, experiment(tasks=sources, probes=["lm-eval:hellaswag?limit=5"])))
    assert [t.source for t in cfg.tasks] == [absolute, "pack:people?facts=3", "probe:general", str(tmp_path / "home" / "h.jsonl")]
    assert [p.source for p in cfg.probes] == ["lm-eval:hellaswag?limit=5"]


def test_an_lm_eval_probes_include_folder_is_read_from_the_config_files_folder_and_its_other_options_kept(tmp_path):
    cfg = load_config(write(tmp_path, experiment(probe="lm-eval:mine?limit=5&include=tasks&fewshot=0")))
    assert cfg.probe.source == f"lm-eval:mine?limit=5&include={tmp_path / 'tasks'}&fewshot=0"


@pytest.mark.parametrize("base, resolved", [
    ("tiny-random", None), ("bundled:smollm2-135m", None), ("org/name", None),
    ("./model", "model"), ("model", "model"), ("models/m.gguf", "models/m.gguf"), ("../up/model", "../up/model"),
])  # fmt: skip
def test_a_base_folder_or_gguf_file_is_read_from_the_config_files_folder_and_a_model_spec_or_hub_id_is_not(tmp_path, monkeypatch, base, resolved):
    import os

    (tmp_path / "cfg").mkdir()
    monkeypatch.chdir("/")
    cfg = load_config(write(tmp_path / "cfg", experiment(base=base)))
    assert cfg.base == (base if resolved is None else os.path.normpath(tmp_path / "cfg" / resolved))


def test_an_org_name_base_that_is_a_folder_beside_the_config_is_that_folder(tmp_path):
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert load_config(write(tmp_path, experiment(base="org/name"))).base == str(tmp_path / "org" / "name")


def test_a_strategy_option_that_names_an_adapter_folder_is_read_from_the_config_files_folder(tmp_path):
    strategies = [{"name": "a", "kind": "moe", "router": "arrow", "general": "adapters/g"}, {"name": "m", "kind": "moe", "router": "arrow", "general": "mean"}]
    cfg = load_config(write(tmp_path, experiment(strategies=strategies, sweep={"set": {"strategies.m.general": ["mean", "adapters/h"]}})))
    assert [s.options["general"] for s in cfg.strategies] == [str(tmp_path / "adapters" / "g"), "mean"]
    assert cfg.sweep.set["strategies.m.general"] == ["mean", str(tmp_path / "adapters" / "h")]


def test_a_missing_source_names_the_path_it_looked_for_and_the_config_files_folder(tmp_path, monkeypatch):
    from cairn.errors import DataError
    from cairn.sweep import experiments

    records(tmp_path / "cfg" / "here.jsonl")
    path = write(tmp_path / "cfg", experiment(tasks=["here.jsonl", "data/none.jsonl"], sweep={"orders": 2}))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path)
    looked = tmp_path / "cfg" / "data" / "none.jsonl"
    expected = f"{path}: tasks[1].source 'data/none.jsonl' not found: looked for {looked} (relative paths in a config are read from the config's folder, {tmp_path / 'cfg'})"
    with pytest.raises(DataError) as err:
        cfg.load_tasks()
    assert str(err.value) == expected
    (_, swapped), _ = experiments(cfg, cfg.sweep)  # a sweep's other task order keeps where its paths came from
    with pytest.raises(DataError) as err:
        swapped.load_tasks()
    assert str(err.value) == expected.replace("tasks[1]", "tasks[0]")


def test_a_missing_data_dir_is_named_as_written_and_resolved(tmp_path):
    from cairn.errors import DataError

    path = write(tmp_path, experiment(data_dir="../no-data", tasks=["FOMC"]))
    with pytest.raises(DataError) as err:
        load_config(path).load_tasks()
    message = str(err.value)
    assert f"looked for {tmp_path.parent / 'no-data' / 'FOMC'}" in message
    assert f"data_dir '../no-data' = {tmp_path.parent / 'no-data'}, which does not exist" in message
    assert f"read from the config's folder, {tmp_path}" in message


def test_a_config_built_in_python_reads_relative_paths_from_the_current_directory(tmp_path, monkeypatch):
    from cairn.errors import DataError

    records(tmp_path / "data" / "a.jsonl")
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(experiment(tasks=["data/a.jsonl"], out="o"))
    assert (cfg.tasks[0].source, cfg.out, cfg.folder) == ("data/a.jsonl", "o", None)
    (task,), _ = cfg.load_tasks()
    assert task.name == "a"
    with pytest.raises(DataError) as err:
        parse_config(experiment(tasks=["b.jsonl"])).load_tasks()
    assert str(err.value) == (f"config: tasks[0].source 'b.jsonl' not found: looked for {tmp_path / 'b.jsonl'} "
                              f"(relative paths in a config built in Python are read from the current directory, {tmp_path})")


def test_a_relative_source_with_a_limit_is_read_from_the_configs_folder(tmp_path, monkeypatch):
    import json

    (tmp_path / "exp" / "data").mkdir(parents=True)
    (tmp_path / "exp" / "data" / "facts.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(40)))
    (tmp_path / "exp" / "e.yaml").write_text("tasks: ['data/facts.jsonl?limit=3']\nstrategies: [{name: s, kind: sequential}]\n")
    monkeypatch.chdir(tmp_path)
    tasks, _ = load_config("exp/e.yaml").load_tasks()
    assert [len(tasks[0].split(s)) for s in ("train", "eval", "test")] == [3, 3, 3]
