"""Chat templates: prompts wrapped once, consistently, for training, evaluation and experiments."""

import json

import pytest

from cairn.cli import main
from cairn.config import parse_config
from cairn.data import Example, Task
from cairn.data.chat import as_chat
from cairn.errors import DataError


def test_prompts_become_one_user_turn_with_the_assistant_turn_opened(tiny):
    _, tokenizer = tiny
    task = Task("t", "exact", {"train": [Example("Who founded Zentrix?", "Ada")], "test": [Example("Q2", "B")]})
    chat = as_chat(task, tokenizer)
    prompt = chat.train[0].prompt
    assert prompt.startswith("<|im_start|>") and "<|im_start|>user\nWho founded Zentrix?<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n") and chat.train[0].answer == "Ada"
    assert chat.data_hash() != task.data_hash() and len(chat.test) == 1


def test_a_tokenizer_without_a_template_is_refused(tiny):
    from types import SimpleNamespace

    with pytest.raises(DataError, match="has no chat template"):
        as_chat(Task("t", "exact", {"train": [Example("q", "a")]}), SimpleNamespace(chat_template=None))


def test_experiment_and_task_options_choose_which_tasks_are_wrapped(tiny, tmp_path):
    _, tokenizer = tiny
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"prompt": "q?", "answer": "a", "split": "train"}) + "\n")
    cfg = parse_config({"base": "tiny-random", "tasks": [str(path), {"source": str(path), "name": "raw", "chat_template": False}],
                        "probe": None, "chat_template": True, "strategies": [{"name": "s", "kind": "sequential"}]})  # fmt: skip
    (wrapped, raw), _ = cfg.load_tasks(tokenizer)
    assert wrapped.train[0].prompt.endswith("assistant\n") and raw.train[0].prompt == "q?"
    (plain, _), _ = cfg.load_tasks()  # without a tokenizer nothing is wrapped
    assert plain.train[0].prompt == "q?"


def test_cli_train_and_eval_take_the_template(tmp_path, capsys):
    from cairn.models import load_model

    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}?", "answer": f"a{i}", "split": s}) + "\n" for i in range(4) for s in ("train", "test")))
    assert main(["train", "--base", "tiny-random", "--task", str(path), "--chat-template", "--epochs", "1", "--out", str(tmp_path / "c")]) == 0
    manifest = json.loads((tmp_path / "c" / "cairn.json").read_text())
    examples = [Example(f"q{i}?", f"a{i}") for i in range(4)]
    wrapped = as_chat(Task("a", "exact", {"train": examples, "test": examples}), load_model("tiny-random")[1])
    assert manifest["data_hash"] == wrapped.data_hash()  # the contribution was trained on the wrapped prompts
    assert main(["eval", "--model", str(tmp_path / "c"), "--task", str(path), "--chat-template", "--json", str(tmp_path / "r.json")]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["predictions"]
    assert rows[0]["prompt"].endswith("<|im_start|>assistant\n")
