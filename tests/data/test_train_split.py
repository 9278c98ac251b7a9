"""A source read as training material only (`load_train_split`): general data replayed beside the tasks."""

import json

import pytest

from cairn.data import load_task
from cairn.data.loaders import load_train_split
from cairn.errors import DataError


def lima_like(folder):
    """A TRACE-layout folder whose eval and test answers are empty, as trace-500/Lima's are."""
    folder.mkdir()
    (folder / "train.json").write_text(json.dumps([{"prompt": f"q{i}", "answer": f"a{i}"} for i in range(5)]))
    for split in ("eval", "test"):
        (folder / f"{split}.json").write_text(json.dumps([{"prompt": "q", "answer": ""}]))
    return folder


def test_a_folder_whose_eval_and_test_answers_are_empty_is_read_for_its_train_split_alone(tmp_path):
    folder = lima_like(tmp_path / "Lima")
    with pytest.raises(DataError, match="eval.json record 0: field 'answer' is empty"):
        load_task(str(folder))  # as a task it is refused
    task = load_train_split(str(folder))
    assert task.name == "Lima" and [ex.answer for ex in task.train] == [f"a{i}" for i in range(5)] and not task.test
    assert len(load_train_split(f"{folder}?limit=2").train) == 2


def test_a_file_gives_its_train_records_or_all_of_them_without_splits(tmp_path):
    marked = tmp_path / "marked.jsonl"
    marked.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "a", "answer": "1", "split": "train"}, {"prompt": "b", "answer": "", "split": "test"}, {"prompt": "c", "answer": "3", "split": "train"}]))  # fmt: skip
    assert [ex.prompt for ex in load_train_split(str(marked)).train] == ["a", "c"]
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": "x"}) + "\n" for i in range(10)))
    assert len(load_train_split(str(plain)).train) == 10  # no 80/10/10 cut: all of it is material


def test_a_source_without_training_examples_is_refused_naming_it(tmp_path):
    folder = tmp_path / "only-test"
    folder.mkdir()
    (folder / "test.json").write_text(json.dumps([{"prompt": "q", "answer": "a"}]))
    with pytest.raises(DataError, match=r"only-test: no train.json or train.jsonl \(a replay-only source needs its train split"):
        load_train_split(str(folder))
    with pytest.raises(DataError, match="probe:general: an evaluation set has no training examples"):
        load_train_split("probe:general")
    assert len(load_train_split("pack:people").train) > 0


def test_traces_lima_is_replay_material_though_its_eval_and_test_answers_are_empty():
    from conftest import TRACE

    if not (TRACE / "Lima").is_dir():
        pytest.skip("../shared/data/trace-500 absent")
    task = load_train_split(str(TRACE / "Lima"))
    assert task.name == "Lima" and len(task.train) > 100 and all(ex.answer.strip() for ex in task.train)
