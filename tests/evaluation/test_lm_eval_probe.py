"""lm-eval probes: a local lm-eval task (YAML over a JSONL written here) scored in memory, offline."""

import json

import pytest

from cairn.cli import main
from cairn.config import parse_config
from cairn.data import load_task
from cairn.errors import DataError
from cairn.data.lm_eval import parse_probe
from cairn.evaluation.lm_eval_probe import task_score

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
{metrics}
"""


@pytest.fixture
def tasks_dir(tmp_path):
    """Two local lm-eval tasks: one reporting acc and acc_norm, one reporting acc only."""
    folder = tmp_path / "lm_tasks"
    folder.mkdir()
    data = folder / "sums.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(2 * i + 1), "seven"], "label": i % 3}) + "\n" for i in range(9)))
    metric = "  - metric: {}\n    aggregation: mean\n    higher_is_better: true\n"
    (folder / "sums_norm.yaml").write_text(TASK.format(name="cairn_sums_norm", data=data, metrics=metric.format("acc") + metric.format("acc_norm")))
    (folder / "sums_acc.yaml").write_text(TASK.format(name="cairn_sums_acc", data=data, metrics=metric.format("acc")))
    return folder


def test_probe_sources_parse_and_bad_ones_are_named(tasks_dir):
    probe = load_task(f"lm-eval:cairn_sums_norm, cairn_sums_acc?fewshot=0&limit=5&include={tasks_dir}")
    assert (probe.tasks, probe.fewshot, probe.limit, probe.include) == (["cairn_sums_norm", "cairn_sums_acc"], 0, 5, str(tasks_dir))
    for bad, message in (("lm-eval:", "no lm-eval task named"), ("lm-eval:x?shots=2", "unknown option 'shots'"),
                         ("lm-eval:x?limit=0", "limit must be at least 1"), ("lm-eval:x?fewshot=two", "not a whole number"),
                         ("lm-eval:x?include=/nope", "include folder")):  # fmt: skip
        with pytest.raises(DataError, match=message):
            parse_probe(bad)


def test_the_reference_studys_metric_choice():
    assert task_score({"acc,none": 0.4, "acc_stderr,none": 0.1, "acc_norm,none": 0.6}) == ("acc_norm,none", 0.6)
    assert task_score({"acc,none": 0.4, "acc_stderr,none": 0.1}) == ("acc,none", 0.4)
    assert task_score({"exact_match,strict-match": 0.2}) == ("exact_match,strict-match", 0.2)
    with pytest.raises(DataError, match="none of acc_norm, acc, exact_match"):
        task_score({"bleu,none": 3.0})


def test_an_experiment_whose_probe_is_an_lm_eval_task(tasks_dir, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from cairn.experiment import run_experiment
    from cairn.models import load_model

    path = tmp_path / "alpha.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"alpha {i}?", "answer": f"a{i}", "split": s}) + "\n" for i in range(4) for s in ("train", "test")))
    source = f"lm-eval:cairn_sums_norm,cairn_sums_acc?include={tasks_dir}"
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"prompt": f"beta {i}?", "answer": f"b{i}", "split": "test"}) + "\n" for i in range(3)))
    cfg = parse_config({"base": "tiny-random", "tasks": [str(path)], "probe": source, "probes": [{"source": str(other), "metric": "edit_sim"}],
                        "train": {"epochs": 1, "batch_size": 4}, "strategies": [{"name": "seq", "kind": "sequential"}]})  # fmt: skip
    results = run_experiment(cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    further = results["strategies"]["seq"]["probes"]["other"]  # a further probe, reported on its own beside G
    assert len(further) == 2 and all(0 <= v <= 1 for v in further)
    from cairn.report import write_report

    write_report(results, tmp_path / "run")
    assert "## Further probes" in (tmp_path / "run" / "summary.md").read_text()
    model, tokenizer = load_model("tiny-random")
    direct = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer), tasks=["cairn_sums_norm", "cairn_sums_acc"],
                             task_manager=TaskManager(include_path=str(tasks_dir)))["results"]  # fmt: skip
    expected = (direct["cairn_sums_norm"]["acc_norm,none"] + direct["cairn_sums_acc"]["acc,none"]) / 2
    assert results["strategies"]["seq"]["G"][0] == pytest.approx(expected)
    assert len(results["strategies"]["seq"]["G"]) == 2
    per_task = results["strategies"]["seq"]["probes"]  # each lm-eval task is reported on its own too
    assert per_task[f"{cfg.probe.source.split('?')[0]}/cairn_sums_acc"][0] == pytest.approx(direct["cairn_sums_acc"]["acc,none"])
    cached = [json.loads(p.read_text()) for p in (tmp_path / "run" / "cache" / "eval").glob("*.json")]
    rows = next(c["predictions"] for c in cached if c["metric"] == "lm-eval")
    assert [(r["task"], r["metric"].split(",")[0]) for r in rows] == [("cairn_sums_norm", "acc_norm"), ("cairn_sums_acc", "acc")]


def test_cli_eval_runs_an_lm_eval_task_and_train_refuses_one(tasks_dir, capsys):
    assert main(["eval", "--model", "tiny-random", "--task", f"lm-eval:cairn_sums_acc?include={tasks_dir}&limit=4"]) == 0
    out = capsys.readouterr().out
    assert "lm-eval:cairn_sums_acc lm-eval lm-eval:" in out and "cairn_sums_acc: acc,none" in out
    assert main(["train", "--task", "lm-eval:arc_easy", "--out", "x"]) == 4
    assert "has no training data here" in capsys.readouterr().err
