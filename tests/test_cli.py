import json
import subprocess
import sys

import pytest

from cairn.cli import main
from conftest import TRACE, qa


def test_data_packs_lists_every_pack(capsys):
    assert main(["data", "packs"]) == 0
    out = capsys.readouterr().out
    for name in ("people", "compounds", "companies", "countries"):
        assert name in out


def test_data_inspect_shows_splits_and_metric(capsys, write_jsonl):
    assert main(["data", "inspect", str(write_jsonl(qa(20)))]) == 0
    out = capsys.readouterr().out
    assert "metric: exact" in out and "train" in out and "16" in out


def test_eval_writes_json_with_predictions(capsys, write_jsonl, tmp_path):
    out = tmp_path / "r.json"
    assert main(["eval", "--model", "tiny-random", "--task", str(write_jsonl(qa(20))), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data) == {"task", "metric", "split", "n", "score", "predictions"}
    assert data["n"] == 2 and len(data["predictions"]) == 2 and data["split"] == "test"
    assert "task test exact:" in capsys.readouterr().out


def test_train_then_eval_an_adapter_folder(capsys, tmp_path, write_jsonl):
    source = str(write_jsonl(qa(20)))
    adapter = tmp_path / "adapter"
    assert main(["train", "--base", "tiny-random", "--task", source, "--out", str(adapter), "--epochs", "1", "--no-eval"]) == 0
    assert "trained lora on task" in capsys.readouterr().out
    assert main(["eval", "--model", str(adapter), "--task", source]) == 0
    assert "task test exact:" in capsys.readouterr().out


def test_generate_prints_a_completion(capsys):
    assert main(["generate", "--model", "tiny-random", "Hello", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("argv, code, message", [
    (["eval", "--model", "tiny-random", "--task", "pack:nope"], 3, "unknown knowledge pack"),
    (["eval", "--model", "bundled:nope", "--task", "pack:people"], 5, "unknown bundled model"),
    (["train", "--base", "tiny-random", "--task", "pack:people", "--out", "x", "--epochs", "0"], 4, "epochs: Input should be greater than or equal to 1"),
])
def test_user_errors_give_one_line_and_a_documented_code(capsys, argv, code, message):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_file_through_the_real_command_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p"}\n')
    proc = subprocess.run([sys.executable, "-m", "cairn.cli", "data", "inspect", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 3
    assert "bad.jsonl line 1: missing field 'answer'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(not TRACE.is_dir(), reason="../shared/data/trace-500 absent")
def test_eval_runs_on_a_trace_folder(capsys, tmp_path):
    out = tmp_path / "fomc.json"
    assert main(["eval", "--model", "tiny-random", "--task", str(TRACE / "FOMC"), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["metric"] == "choice" and data["n"] == 100


def test_usage_errors_and_help_return_their_code(capsys):
    assert main(["teleport"]) == 2
    assert "cairn: error: argument command: invalid choice: 'teleport'" in capsys.readouterr().err
    assert main(["eval", "--help"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "bundled:nope", "--task", "pack:people", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["generate", "--model", "bundled:nope", "hi", "--max-new-tokens", "-1"], "--max-new-tokens must be at least 1, got -1"),
    (["merge", "--method", "ties", "--base", "bundled:nope", "--inputs", "x", "--out", "o", "--as-adapter", "--rank", "0"], "--rank must be at least 1, got 0"),
    (["data", "inspect", "pack:people", "-n", "-1"], "-n must be at least 0, got -1"),
    (["train", "--base", "bundled:nope", "--task", "pack:people", "--out", "o", "--seed", "-1"], "invalid training option: seed: Input should be greater than or equal to 0"),
])
def test_numbers_below_their_minimum_are_refused_before_any_model_loads(capsys, argv, message):
    assert main(argv) == 4
    assert message in capsys.readouterr().err


def test_train_and_eval_refuse_a_folder_or_empty_split_before_loading_a_model(capsys, tmp_path):
    assert main(["eval", "--model", "bundled:nope", "--task", "pack:people", "--json", str(tmp_path)]) == 4
    assert f"--json {tmp_path} is a folder" in capsys.readouterr().err
    assert main(["train", "--base", "bundled:nope", "--task", "probe:general", "--out", str(tmp_path / "o")]) == 3
    assert "task probe:general has no 'train' examples" in capsys.readouterr().err


def test_an_error_naming_a_path_with_a_line_break_stays_one_line(capsys, tmp_path):
    assert main(["run", str(tmp_path / "a\nb.yaml")]) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a\\nb.yaml: cannot read" in err


def test_report_on_a_results_file_that_is_not_an_object(capsys, tmp_path):
    (tmp_path / "results.json").write_text("[]")
    assert main(["report", str(tmp_path)]) == 3


def test_run_resume_needs_a_run_to_continue(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "holds no interrupted run" in capsys.readouterr().err


def _subcommands(parser):
    """(name, parser) of every subcommand, nested ones as 'store add'."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", p) for n, p in _subcommands(sub))


def test_every_option_of_every_command_has_a_description_and_says_its_default():
    from cairn.cli import _parser

    for name, sub in _subcommands(_parser()):
        for action in sub._actions:
            if action.option_strings == ["-h", "--help"] or not action.option_strings and action.nargs == 0:
                continue
            if type(action).__name__ == "_SubParsersAction":
                continue
            assert action.help, f"cairn {name} {action.option_strings or action.dest}: no help"
            if action.default not in (None, False) and not isinstance(action.default, bool):
                assert "default" in action.help, f"cairn {name} {action.option_strings}: its default {action.default!r} is not shown"


def test_cairn_train_has_a_flag_for_every_training_setting_and_passes_it_through(tmp_path, write_jsonl):
    from cairn.cli import _TRAIN_FLAGS
    from cairn.manifest import read_manifest
    from cairn.options import TrainConfig

    assert set(_TRAIN_FLAGS) == set(TrainConfig.model_fields)
    argv = ["train", "--base", "tiny-random", "--task", str(write_jsonl(qa(20))), "--out", str(tmp_path / "a"), "--no-eval", "--epochs", "1",
            "--lora-alpha", "8", "--max-length", "64", "--grad-accum", "2", "--warmup-ratio", "0.2", "--bf16", "false", "--target-modules", "q_proj", "v_proj"]  # fmt: skip
    assert main(argv) == 0
    settings = read_manifest(tmp_path / "a")["hyperparameters"]
    assert (settings["lora_alpha"], settings["max_length"], settings["grad_accum"], settings["warmup_ratio"], settings["bf16"], settings["target_modules"]) == (
        8.0, 64, 2, 0.2, False, ["q_proj", "v_proj"])  # fmt: skip


def test_cairn_version_and_the_merge_usage_shows_its_two_required_forms(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"cairn {version('cairn-llm')}"
    assert main(["merge", "--help"]) == 0
    assert "(--method METHOD --base BASE --inputs INPUT [INPUT ...] | --config MERGEKIT_YAML) --out OUT" in capsys.readouterr().out


def test_eval_limit_scores_a_sample_and_most_predictions_empty_is_a_warning_naming_the_likely_causes(capsys, write_jsonl, monkeypatch):
    source = str(write_jsonl(qa(40)))
    monkeypatch.setattr("cairn.evaluation.evaluate.generate", lambda model, tokenizer, prompts, **kw: [""] * len(prompts))
    assert main(["eval", "--model", "tiny-random", "--task", source, "--split", "train", "--limit", "5"]) == 0
    captured = capsys.readouterr()
    assert "task train exact: 0.0000 (n=5)" in captured.out
    assert "5 of 5 predictions are empty and score 0" in captured.err and "--chat-template" in captured.err and "first newline" in captured.err


def test_generate_with_chat_template_wraps_the_prompt_as_the_users_turn(capsys, monkeypatch):
    seen = []
    monkeypatch.setattr("cairn.evaluation.generate", lambda model, tokenizer, prompts, **kw: seen.extend(prompts) or ["ok"])
    assert main(["generate", "--model", "tiny-random", "What is 2+2?", "--chat-template"]) == 0
    assert capsys.readouterr().out.strip() == "ok"
    assert seen[0] != "What is 2+2?" and "What is 2+2?" in seen[0] and seen[0].rstrip().endswith("assistant")


def test_tables_written_to_a_file_or_pipe_are_never_cut_to_80_columns(capsys, tmp_path):
    from cairn.manifest import file_hashes, write_manifest

    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"w")
    write_manifest(folder, {"schema": 1, "kind": "adapter", "base": "tiny-random", "base_fingerprint": "ab" * 32, "task": "a-rather-long-task-name-of-a-party",
                            "method": "lora", "files": file_hashes(folder)})  # fmt: skip
    name = "a-rather-long-task-name-of-a-party-lora-0123456789-and-more"
    assert main(["store", "--store", str(tmp_path / "s"), "add", str(folder), "--name", name]) == 0
    capsys.readouterr()
    assert main(["store", "--store", str(tmp_path / "s"), "list"]) == 0
    assert name in capsys.readouterr().out  # whole, on one line: the ID a user copies


def test_run_check_validates_and_prints_the_plan_without_training_and_refuses_what_the_run_would(capsys, tmp_path, write_jsonl):
    source = write_jsonl(qa(20))
    config = tmp_path / "exp.yaml"
    config.write_text(f"name: checked\nbase: tiny-random\ntasks: [{{source: {source}}}]\nstrategies: [{{name: seq, kind: sequential}}]\nseeds: [0, 1]\n"
                      f"out: {tmp_path / 'out'}\n")  # fmt: skip
    assert main(["run", str(config), "--check"]) == 0
    out = capsys.readouterr().out
    assert "nothing was trained" in out and "1 strategies x 1 stages x 2 seed(s) [0, 1] = at most 2 trainings" in out and "a new run starts there" in out
    assert not (tmp_path / "out").exists()
    config.write_text(config.read_text().replace(str(source), str(tmp_path / "missing.jsonl")))
    assert main(["run", str(config), "--check"]) == 3
    assert "missing.jsonl" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    config.write_text(config.read_text().replace(str(tmp_path / "missing.jsonl"), str(source)))
    assert main(["run", str(config), "--check"]) == 4
    assert "is not a Cairn run folder" in capsys.readouterr().err and (tmp_path / "out" / "notes.txt").read_text() == "mine"
