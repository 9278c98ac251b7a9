"""The Python API: each function does what its command does, on tiny-random, and refuses what
the command refuses, with the same message and exit code."""

import json
from pathlib import Path

import pytest

import cairn
from cairn import api
from cairn.cli import main
from cairn.errors import CairnError
from cairn.evaluation import EvalResult
from cairn.manifest import file_hashes, write_manifest


def test_train_evaluate_merge_mix_and_run(tmp_path):
    path = tmp_path / "alpha.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"alpha {i}?", "answer": f"a{i}", "split": s}) + "\n" for i in range(4) for s in ("train", "test")))
    manifest = cairn.train(str(path), tmp_path / "c1", base="tiny-random", epochs=1, batch_size=4, test=True, progress=False)
    assert manifest["task"] == "alpha" and (tmp_path / "c1" / "adapter_model.safetensors").is_file()
    assert manifest["test"].n == 4 and "test" not in json.loads((tmp_path / "c1" / "cairn.json").read_text())
    cairn.train(str(path), tmp_path / "c2", base="tiny-random", epochs=1, batch_size=4, seed=1, progress=False)
    result = cairn.evaluate(tmp_path / "c1", str(path))
    assert result.n == 4 and 0 <= result.score <= 1
    stats = cairn.merge([tmp_path / "c1", tmp_path / "c2"], tmp_path / "m", base="tiny-random", method="ties", density=0.5, progress=False)
    assert stats["method"] == "ties" and (tmp_path / "m" / "model.safetensors").is_file()
    out = cairn.mix([tmp_path / "c1", tmp_path / "c2"], tmp_path / "x", base="tiny-random", router="centroid", progress=False)
    assert cairn.evaluate(out, str(path)).n == 4  # the mixture loads wherever a model spec is taken
    config = {"name": "api", "base": "tiny-random", "tasks": [str(path)], "probe": None, "train": {"epochs": 1, "batch_size": 4},
              "strategies": [{"name": "seq", "kind": "sequential"}]}  # fmt: skip
    results = cairn.run(config, tmp_path / "run", progress=False, log=lambda *_: None)
    assert len(results["strategies"]["seq"]["R"]) == 2 and (tmp_path / "run" / "summary.md").is_file()


def test_import_cairn_stays_light():
    import subprocess
    import sys

    code = "import sys, cairn; assert 'torch' not in sys.modules; cairn.API"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def refused_alike(capsys, call, argv: list[str]) -> CairnError:
    """`call()` raises the CairnError whose message and exit code `cairn ARGV` gives; returns it."""
    with pytest.raises(CairnError) as refusal:
        call()
    assert main(argv) == refusal.value.exit_code
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"cairn {argv[0]}: error: {refusal.value}"
    return refusal.value


MERGE = ["merge", "--method", "ties", "--base", "tiny-random", "--inputs", "a", "--out", "o"]
NO_MODEL = "bundled:nope"  # refused only when loaded: every check below comes first


@pytest.mark.parametrize("call, argv", [
    (lambda: api.merge(["a"], "o", base="tiny-random", method="ties", as_adapter=False, adapter_rank=4), [*MERGE, "--rank", "4"]),
    (lambda: api.merge(["a"], "o", base="tiny-random", method="ties", as_adapter=True), [*MERGE, "--as-adapter"]),
    (lambda: api.merge(["a"], "o", base="tiny-random", method="ties", adapter_rank=0), [*MERGE, "--as-adapter", "--rank", "0"]),
    (lambda: api.merge(None, "o", config="mk.yaml", method="ties", density=0.5), ["merge", "--config", "mk.yaml", "--method", "ties", "--density", "0.5", "--out", "o"]),
    (lambda: api.merge(None, "o", base="tiny-random"), ["merge", "--base", "tiny-random", "--out", "o"]),
    (lambda: api.mix(["a"], "o", base=NO_MODEL, router="centroid", top_k=0), ["mix", "--base", NO_MODEL, "--inputs", "a", "--router", "centroid", "--top-k", "0", "--out", "o"]),
    (lambda: api.evaluate(NO_MODEL, "pack:people", batch_size=0), ["eval", "--model", NO_MODEL, "--task", "pack:people", "--batch-size", "0"]),
    (lambda: api.evaluate(NO_MODEL, "pack:people", json_path="."), ["eval", "--model", NO_MODEL, "--task", "pack:people", "--json", "."]),
    (lambda: api.evaluate(NO_MODEL, "probe:general", split="train"), ["eval", "--model", NO_MODEL, "--task", "probe:general", "--split", "train"]),
    (lambda: api.generate(NO_MODEL, "hi", max_new_tokens=0), ["generate", "--model", NO_MODEL, "hi", "--max-new-tokens", "0"]),
    (lambda: api.run(None, "nothing", resume=True), ["run", "--out", "nothing", "--resume"]),
    (lambda: api.run(None, "interrupted", resume=True, overwrite=True), ["run", "--out", "interrupted", "--resume", "--overwrite"]),
    (lambda: api.inspect("pack:people", n=-1), ["data", "inspect", "pack:people", "-n", "-1"]),
    (lambda: api.inspect("lm-eval:hellaswag"), ["data", "inspect", "lm-eval:hellaswag"]),
], ids=[
    "merge-a-rank-without-as-adapter", "merge-as-adapter-without-a-rank", "merge-a-rank-below-1", "merge-a-config-with-other-options",
    "merge-without-method-and-inputs", "mix-a-top-k-below-1", "eval-a-batch-size-below-1", "eval-a-json-path-that-is-a-folder",
    "eval-a-split-without-examples", "generate-max-new-tokens-below-1", "run-resume-without-an-interrupted-run",
    "run-resume-with-overwrite", "inspect-n-below-0", "inspect-an-lm-eval-probe",
])  # fmt: skip
def test_the_api_refuses_what_the_command_line_refuses_with_the_same_message_and_code(capsys, tmp_path, monkeypatch, call, argv):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "interrupted" / "cache").mkdir(parents=True)
    refused_alike(capsys, call, argv)


def _scored(model, tokenizer, task, **_) -> EvalResult:
    return EvalResult(task.name, task.metric, "lm-eval", 1, 0.5, [{"task": "hellaswag", "metric": "acc", "score": 0.5, "prediction": "x"}])


def test_evaluate_scores_an_lm_eval_probe_in_no_chat_template_in_the_api_as_on_the_command_line(capsys, monkeypatch):
    seen = []
    monkeypatch.setattr("cairn.evaluation.evaluate_task", lambda model, tokenizer, task, **kw: seen.append(task) or _scored(model, tokenizer, task))
    assert api.evaluate("tiny-random", "lm-eval:hellaswag", chat_template=True).score == 0.5
    assert main(["eval", "--model", "tiny-random", "--task", "lm-eval:hellaswag", "--chat-template"]) == 0
    assert [type(t).__name__ for t in seen] == ["LmEvalProbe", "LmEvalProbe"]  # as lm-eval reads it, prompts untouched
    assert capsys.readouterr().out.splitlines()[-2:] == ["lm-eval:hellaswag lm-eval lm-eval: 0.5000 (n=1)", "  hellaswag: acc 0.5000"]


def test_evaluate_names_the_json_file_it_cannot_write_in_the_api_as_on_the_command_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("cairn.evaluation.evaluate_task", _scored)
    (tmp_path / "file").write_text("")
    target = tmp_path / "file" / "r.json"
    error = refused_alike(capsys, lambda: api.evaluate("tiny-random", "pack:people", json_path=target),
                          ["eval", "--model", "tiny-random", "--task", "pack:people", "--json", str(target)])  # fmt: skip
    assert f"--json {target}: cannot write" in str(error)


def test_store_verify_lists_every_contribution_then_refuses_a_tampered_one_in_the_api_as_on_the_command_line(capsys, tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    write_manifest(folder, {"schema": 1, "kind": "adapter", "base": "tiny-random", "base_fingerprint": "0" * 64, "task": "t", "method": "lora",
                            "files": file_hashes(folder)})  # fmt: skip
    store = tmp_path / "store"
    assert api.store_add(folder, "c", store=store)["id"] == "c" and [e["id"] for e in api.store_list(store=store)] == ["c"]
    assert api.store_verify(store=store, log=lambda line: None) == ["c"]
    (store / "items" / "c" / "adapter_model.safetensors").write_bytes(b"changed")
    lines = []
    error = refused_alike(capsys, lambda: api.store_verify(store=store, log=lines.append), ["store", "--store", str(store), "verify"])
    assert error.exit_code == 3 and len(lines) == 1 and lines[0].startswith("c: ")
    main(["store", "--store", str(store), "verify"])
    assert capsys.readouterr().out.splitlines() == lines


def test_the_default_store_is_cairn_store_else_the_current_folders(monkeypatch, tmp_path):
    from cairn.store import default_store

    monkeypatch.delenv("CAIRN_STORE", raising=False)
    assert default_store() == Path("cairn-store")
    monkeypatch.setenv("CAIRN_STORE", str(tmp_path / "s"))
    assert default_store() == tmp_path / "s"
    assert api.store_list() == []  # an empty store lists nothing: the API reads the same default


def test_inspect_returns_what_data_inspect_prints(capsys, write_jsonl):
    from conftest import qa

    source = str(write_jsonl(qa(20)))
    summary = api.inspect(source, n=1)
    assert summary["metric"] == "exact" and summary["splits"]["train"]["examples"] == 16 and len(summary["splits"]["train"]["first"]) == 1
    assert main(["data", "inspect", source, "-n", "1"]) == 0
    assert summary["splits"]["test"]["first"][0]["prompt"].split("\n")[0] in capsys.readouterr().out
