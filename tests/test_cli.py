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
