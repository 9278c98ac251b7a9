import json

import pytest

from cairn.data import load_task
from cairn.errors import DataError
from conftest import TRACE, qa


def test_jsonl_without_split_is_a_seeded_80_10_10_split(write_jsonl):
    path = write_jsonl(qa(50))
    a, b, c = load_task(str(path)), load_task(str(path)), load_task(str(path), seed=1)
    assert (len(a.train), len(a.eval), len(a.test)) == (40, 5, 5)
    assert a.splits == b.splits
    assert a.test != c.test
    assert a.name == "task" and a.metric == "exact"
    prompts = [e.prompt for s in a.splits.values() for e in s]
    assert len(set(prompts)) == 50


def test_split_field_and_aliases(write_jsonl):
    records = qa(3)
    for r, s in zip(records, ["train", "validation", "test"]):
        r["split"] = s
    task = load_task(str(write_jsonl(records)))
    assert [len(task.train), len(task.eval), len(task.test)] == [1, 1, 1]


def test_json_list_and_metric_override(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(qa(10)))
    task = load_task(str(path), metric="rouge_l", name="mine")
    assert task.metric == "rouge_l" and task.name == "mine"
    assert sum(len(s) for s in task.splits.values()) == 10


def test_trace_layout_folder_with_jsonl(tmp_path):
    folder = tmp_path / "Py150"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa(4)))
    (folder / "test.json").write_text(json.dumps(qa(2)))
    task = load_task(str(folder))
    assert task.name == "Py150" and task.metric == "edit_sim"
    assert (len(task.train), len(task.eval), len(task.test)) == (4, 0, 2)


def test_hf_datasets_folder(tmp_path):
    from datasets import Dataset, DatasetDict

    ds = DatasetDict({"train": Dataset.from_list(qa(6)), "validation": Dataset.from_list(qa(2)), "test": Dataset.from_list(qa(3))})
    ds.save_to_disk(str(tmp_path / "hf"))
    task = load_task(str(tmp_path / "hf"))
    assert (len(task.train), len(task.eval), len(task.test)) == (6, 2, 3)
    Dataset.from_list(qa(20)).save_to_disk(str(tmp_path / "single"))
    assert len(load_task(str(tmp_path / "single")).test) == 2


def test_hf_datasets_folder_missing_column(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([{"question": "q", "answer": "a"}])}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(DataError, match=r"missing column\(s\) \['prompt'\]"):
        load_task(str(tmp_path / "hf"))


@pytest.mark.parametrize(
    "lines, message",
    [
        (["{not json"], r"task.jsonl:1: not valid JSON"),
        ([json.dumps({"prompt": "p"})], r"line 1: missing field 'answer'"),
        ([json.dumps({"prompt": "p", "answer": "a"}), json.dumps({"prompt": "", "answer": "a"})], r"line 2: field 'prompt' is empty"),
        ([json.dumps({"prompt": "p", "answer": 3})], r"line 1: field 'answer' must be a string, got int"),
        ([json.dumps(["p", "a"])], r"line 1: expected an object"),
        ([json.dumps({"prompt": "p", "answer": "a", "split": "training"})], r"line 1: unknown split 'training'"),
        ([json.dumps({"prompt": "p", "answer": "a", "split": "train"}), json.dumps({"prompt": "p", "answer": "a"})], r"line 2: missing field 'split'"),
        (["   "], r"empty file"),
    ],
)
def test_bad_jsonl_names_file_line_and_problem(tmp_path, lines, message):
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message) as err:
        load_task(str(path))
    assert str(path) in str(err.value)


def test_bad_json_file_reports_position(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('[{"prompt": "p",\n "answer": }]')
    with pytest.raises(DataError, match=r"t\.json:2:\d+: not valid JSON"):
        load_task(str(path))
    path.write_text('{"prompt": "p", "answer": "a"}')
    with pytest.raises(DataError, match="expected a JSON list"):
        load_task(str(path))
    path.write_text("[]")
    with pytest.raises(DataError, match="empty list"):
        load_task(str(path))


def test_unknown_sources_and_metric(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_task(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="unknown knowledge pack 'nope'"):
        load_task("pack:nope")
    with pytest.raises(DataError, match="unknown probe set"):
        load_task("probe:nope")
    with pytest.raises(DataError, match="unknown metric 'bleu'; expected one of exact, choice"):
        load_task("pack:people", metric="bleu")
    with pytest.raises(DataError, match="TRACE-layout folder"):
        load_task(str(tmp_path))


def test_non_utf8_file(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"prompt": "\xff", "answer": "a"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        load_task(str(path))


@pytest.mark.skipif(not TRACE.is_dir(), reason="../shared/data/trace-500 absent")
@pytest.mark.parametrize("name, metric", [("NumGLUE-cm", "exact"), ("FOMC", "choice"), ("Py150", "edit_sim"), ("20Minuten", "sari"), ("MeetingBank", "rouge_l")])
def test_trace_folders_get_trace_metrics(name, metric):
    task = load_task(str(TRACE / name))
    assert task.metric == metric
    assert len(task.test) > 0 and len(task.eval) > 0
    assert (len(task.train) > 0) == (name != "MeetingBank")


def test_data_hash_changes_with_content(write_jsonl):
    a = load_task(str(write_jsonl(qa(10), "a.jsonl")))
    records = qa(10)
    records[3]["answer"] = "other"
    b = load_task(str(write_jsonl(records, "b.jsonl")))
    assert a.data_hash() == load_task(str(write_jsonl(qa(10), "c.jsonl"))).data_hash()
    assert a.data_hash() != b.data_hash()


def test_pack_options_set_size_and_seed():
    small = load_task("pack:people?facts=10")
    assert small.name == "people-10" and len(small.test) == 10 and len(small.train) == 30
    other = load_task("pack:people?facts=10&seed=2")
    assert other.test != small.test
    with pytest.raises(DataError, match="unknown pack option 'size'; allowed: facts, seed"):
        load_task("pack:people?size=3")
    with pytest.raises(DataError, match="option 'facts' must be an integer"):
        load_task("pack:people?facts=many")


@pytest.mark.parametrize("suffix, text, message", [
    (".jsonl", '{"prompt": "p", "answer": "a"}\n' + "[" * 5000 + "]" * 5000 + "\n", r"task\.jsonl:2: not valid JSON \(nested too deeply\)"),
    (".json", "[" * 5000 + "]" * 5000, r"task\.json: not valid JSON \(nested too deeply\)"),
    (".jsonl", '{"prompt": "p", "answer": ' + "9" * 5000 + "}\n", r"task\.jsonl:1: not valid JSON \(an integer with more than \d+ digits\)"),
])
def test_too_deep_or_too_long_json_is_a_data_error(tmp_path, suffix, text, message):
    path = tmp_path / f"task{suffix}"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        load_task(str(path))


def test_raw_line_separators_inside_strings_do_not_split_records(tmp_path):
    path = tmp_path / "task.jsonl"
    records = [{"prompt": f"a\u2028b\x85c {i}", "answer": "d\u2029e"} for i in range(10)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    task = load_task(str(path))
    assert sorted(e.prompt for s in task.splits.values() for e in s) == sorted(r["prompt"] for r in records)


def test_unpaired_surrogate_escape_is_refused(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text('{"prompt": "p", "answer": "a"}\n{"prompt": "x\\ud800", "answer": "a"}\n')
    with pytest.raises(DataError, match=r"task\.jsonl line 2: field 'prompt' is not valid Unicode \(unpaired surrogate '\\ud800' at character 1\)"):
        load_task(str(path))


def test_unknown_user_in_a_home_path_is_a_data_error():
    with pytest.raises(DataError, match="task source not found: ~no-such-user-cairn/t.jsonl"):
        load_task("~no-such-user-cairn/t.jsonl")


@pytest.mark.parametrize("value", ["²", "٣", "--3", "9" * 5000])
def test_pack_options_take_plain_integers_only(value):
    with pytest.raises(DataError, match="option 'facts' must be an integer"):
        load_task(f"pack:people?facts={value}")


def test_a_folder_or_file_source_with_a_limit_keeps_a_seeded_sample_of_each_split(tmp_path, write_jsonl):
    folder = tmp_path / "big"
    folder.mkdir()
    for split, n in (("train", 30), ("test", 8)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"prompt": f"{split} q{i}", "answer": f"a{i}"}) + "\n" for i in range(n)))
    task = load_task(f"{folder}?limit=5")
    assert (len(task.train), len(task.test), task.name) == (5, 5, "big")
    assert task.train == load_task(f"{folder}?limit=5").train and set(task.train) <= set(load_task(str(folder)).train)
    assert len(load_task(f"{write_jsonl(qa(20))}?limit=3").train) == 3
    with pytest.raises(DataError, match=r"'facts=5' after '\?' is not an option of a file or folder source, which takes limit=N"):
        load_task(f"{folder}?facts=5")
    with pytest.raises(DataError, match="limit must be a whole number of examples, at least 1, got '0'"):
        load_task(f"{folder}?limit=0")
