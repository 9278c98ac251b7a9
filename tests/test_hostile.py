"""Hostile inputs through the command line: each ends with its documented exit code and a one-line
error, never a traceback, and every file that was there before the command is still there, unchanged.

The sandbox (built once, copied for each case) holds contributions of tiny-random, one made on
another base of the same architecture, a plain PEFT adapter, one of another architecture, a store,
a finished run folder and a folder of someone's own files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from cairn.cli import main
from conftest import qa


def _train(out: Path, base: str = "tiny-random", task: str = "t.jsonl") -> None:
    from cairn.data import load_task
    from cairn.options import TrainConfig
    from cairn.contributions import train_contribution

    train_contribution(base, load_task(task), TrainConfig(epochs=1, batch_size=4), out, progress=False)


def _other_base(folder: Path) -> None:
    """tiny-random with one weight changed: the same architecture, another base."""
    from safetensors.torch import load_file, save_file

    from cairn.models import resolve_folder

    shutil.copytree(resolve_folder("tiny-random"), folder)
    weights = load_file(folder / "model.safetensors")
    weights["model.norm.weight"] += 1
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def _other_architecture(adapter: Path, out: Path) -> None:
    """A plain adapter whose q_proj factors are for a wider model than tiny-random."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, out)
    (out / "cairn.json").unlink()
    weights = load_file(out / "adapter_model.safetensors")
    for key in [k for k in weights if "q_proj.lora_A" in k]:
        weights[key] = weights[key].new_zeros(weights[key].shape[0], 2 * weights[key].shape[1])
    save_file(weights, out / "adapter_model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        rows = [{**r, "split": s} for r in qa(8) for s in ("train", "test")]
        Path("t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        Path("only-test.jsonl").write_text("".join(json.dumps({**r, "split": "test"}) + "\n" for r in qa(3)))
        Path("only-train.jsonl").write_text("".join(json.dumps({**r, "split": "train"}) + "\n" for r in qa(3)))
        _train(root / "a")
        _other_base(root / "other-base")
        _train(root / "b", base=str(root / "other-base"))
        shutil.copytree(root / "a", root / "plain")
        (root / "plain" / "cairn.json").unlink()
        _other_architecture(root / "a", root / "wide")
        (root / "victim").mkdir()
        (root / "victim" / "thesis.txt").write_text("months of work\n")
        assert main(["store", "--store", "store", "add", "a", "--name", "a"]) == 0
        run = root / "old-run"
        run.mkdir()
        (run / "results.json").write_text(json.dumps({"schema": 1, "config": {"name": "another", "seeds": [7]}, "tasks": [], "seeds": [7], "strategies": {}}))
        (run / "R_keep.csv").write_text("stage\n")
        (root / "incomplete").mkdir()
        (root / "incomplete" / "results.json").write_text(json.dumps({"schema": 1, "config": {"name": "x"}, "tasks": ["t"], "seeds": [0],
                                                                      "strategies": {"s": {"R": [[0.0]], "G": None}}}))  # fmt: skip
        _model_inputs(root)
        Path("run.yaml").write_text(
            "name: tiny\nbase: tiny-random\ntasks: [t.jsonl]\nprobe: null\ntrain: {epochs: 1, batch_size: 4}\n"
            "strategies: [{name: seq, kind: sequential}]\nseeds: [0]\n"
        )
        for name, strategy in {"merge-density": "{name: m, kind: merge, method: average, density: 0.5}",
                               "olora-fft": "{name: o, kind: olora, train: {method: fft}}"}.items():  # fmt: skip
            Path(f"{name}.yaml").write_text(f"name: {name}\nbase: tiny-random\ntasks: [t.jsonl]\nprobe: null\nstrategies: [{strategy}]\n")
    finally:
        os.chdir(cwd)
    return root


def _model_inputs(root: Path) -> None:
    """Broken model folders and files: corrupt safetensors, absurd config sizes, garbage GGUF,
    pickled weights holding more than tensors; and contributions a store must refuse."""
    import torch

    from cairn.models import resolve_folder

    tiny = Path(resolve_folder("tiny-random"))
    for name in ("header-list", "truncated", "absurd-config", "pickled"):
        shutil.copytree(tiny, root / name)
    weights = root / "header-list" / "model.safetensors"
    header = b'["not", "an", "object"]'
    weights.write_bytes(len(header).to_bytes(8, "little") + header)
    raw = (root / "truncated" / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    config = json.loads((root / "absurd-config" / "config.json").read_text())
    (root / "absurd-config" / "config.json").write_text(json.dumps({**config, "hidden_size": 10**9, "num_hidden_layers": 10**6}))
    from safetensors.torch import load_file

    state = load_file(root / "pickled" / "model.safetensors")
    (root / "pickled" / "model.safetensors").unlink()
    torch.save({**state, "extra": _NotATensor()}, root / "pickled" / "pytorch_model.bin")
    (root / "garbage.gguf").write_bytes(b"GGUF" + os.urandom(64))
    shutil.copytree(root / "a", root / "leaky")
    (root / "secret.txt").write_text("a key\n")
    (root / "leaky" / "extra.txt").symlink_to(root / "secret.txt")


class _NotATensor:
    """Something torch's weights-only unpickler refuses."""


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture
def here(sandbox, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the sandbox as the current folder."""
    root = tmp_path / "sandbox"
    shutil.copytree(sandbox, root, symlinks=True)
    monkeypatch.chdir(root)
    monkeypatch.setenv("CAIRN_STORE", "store")
    return root


def refused(capsys, root: Path, argv: list[str], code: int, *fragments: str) -> str:
    """Run `cairn ARGV`; assert its exit code, one error line naming `fragments`, no traceback,
    and every file present before unchanged. Returns the error line."""
    before = _snapshot(root)
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    after = _snapshot(root)
    assert {k: v for k, v in after.items() if k in before} == before, "a file that was there before changed or vanished"
    return lines[0]


TRAIN = ["train", "--base", "tiny-random", "--task", "t.jsonl", "--epochs", "1", "--batch-size", "4", "--no-eval"]
MERGE = ["merge", "--method", "ties", "--base", "tiny-random"]
MIX = ["mix", "--router", "uniform", "--base", "tiny-random"]


# --- outputs that would destroy someone's files ---------------------------------------------------


@pytest.mark.parametrize("argv", [
    [*TRAIN, "--out", "victim"],
    [*MERGE, "--inputs", "a", "./a", "--out", "victim"],
    [*MIX, "--inputs", "./a", "./a", "--out", "victim"],
], ids=["train", "merge", "mix"])  # fmt: skip
def test_an_output_folder_of_someone_elses_files_is_refused(capsys, here, argv):
    refused(capsys, here, argv, 4, "victim", "--overwrite")


def test_overwrite_replaces_a_foreign_folder_when_asked(capsys, here):
    assert main([*TRAIN, "--out", "victim", "--overwrite"]) == 0
    assert not (here / "victim" / "thesis.txt").exists() and (here / "victim" / "cairn.json").is_file()


def test_an_earlier_output_of_the_same_command_is_replaced_and_the_log_says_so(capsys, here):
    assert main([*TRAIN, "--out", "a"]) == 0
    assert "replacing the earlier `cairn train` output at a" in capsys.readouterr().err


def test_an_earlier_output_of_another_command_is_not_replaced_silently(capsys, here):
    refused(capsys, here, [*MERGE, "--inputs", "./a", "--out", "a"], 4, "a", "not an earlier `cairn merge` output")


@pytest.mark.parametrize("out", [".", "..", "../.."])
def test_the_current_folder_and_its_parents_are_never_an_output(capsys, here, out):
    refused(capsys, here, [*TRAIN, "--out", out, "--overwrite"], 4, "current")
    assert not any(p.name.endswith(".old") for p in here.parent.iterdir())


@pytest.mark.parametrize("command", [[*TRAIN, "--out"], [*MERGE, "--inputs", "./a", "--out"], ["run", "run.yaml", "--out"]], ids=["train", "merge", "run"])
def test_a_symlink_loop_as_output_is_a_clean_error(capsys, here, command):
    (here / "loop").symlink_to("loop")
    refused(capsys, here, [*command, "loop"], 4, "loop", "symbolic link")


def test_a_file_as_output_folder_is_refused(capsys, here):
    refused(capsys, here, [*TRAIN, "--out", "t.jsonl"], 4, "t.jsonl", "is a file")


# --- cairn run's folder ---------------------------------------------------------------------------


def test_a_run_folder_of_another_config_is_refused(capsys, here):
    refused(capsys, here, ["run", "run.yaml", "--out", "old-run"], 4, "old-run", "another config", "--overwrite")


def test_a_folder_that_is_no_run_is_refused_as_a_run_folder(capsys, here):
    refused(capsys, here, ["run", "run.yaml", "--out", "victim"], 4, "victim", "not a Cairn run folder")


def test_a_run_folder_in_use_refuses_a_second_run_at_start(capsys, here):
    from filelock import FileLock

    (here / "busy").mkdir()
    with FileLock(str(here / "busy" / ".lock")):
        refused(capsys, here, ["run", "run.yaml", "--out", "busy"], 2, "busy", "in use")
    assert not (here / "busy" / "run.json").exists()


def test_overwriting_a_run_folder_leaves_no_stale_files(capsys, here):
    assert main(["run", "run.yaml", "--out", "old-run", "--overwrite"]) == 0
    assert not (here / "old-run" / "R_keep.csv").exists()
    assert json.loads((here / "old-run" / "results.json").read_text())["config"]["name"] == "tiny"


def test_report_on_an_incomplete_results_file_names_what_is_missing(capsys, here):
    refused(capsys, here, ["report", "incomplete"], 3, "incomplete/results.json", "strategies.s")


# --- inputs made elsewhere ------------------------------------------------------------------------


@pytest.mark.parametrize("command", [MERGE, MIX], ids=["merge", "mix"])
def test_an_input_made_on_another_base_is_refused(capsys, here, command):
    refused(capsys, here, [*command, "--inputs", "./a", "b", "--out", "m"], 5, "b was made on a base with fingerprint")


@pytest.mark.parametrize("command", [MERGE, MIX], ids=["merge", "mix"])
def test_an_adapter_of_another_architecture_gets_a_clear_error(capsys, here, command):
    refused(capsys, here, [*command, "--inputs", "./a", "wide", "--out", "m"], 5, "wide", "another architecture")


def test_a_plain_adapter_is_merged_with_a_note_that_its_base_is_unverified(capsys, here):
    assert main([*MERGE, "--inputs", "./a", "plain", "--out", "m"]) == 0
    err = capsys.readouterr().err
    assert "plain: no Cairn manifest" in err and "could not be verified" in err and "Traceback" not in err


def test_a_folder_with_the_name_of_a_store_id_is_an_ambiguity_named_both_ways(capsys, here):
    refused(capsys, here, [*MERGE, "--inputs", "a", "--out", "m"], 4, "./a", "store:a")


def test_store_prefix_names_the_stored_contribution(capsys, here):
    assert main([*MERGE, "--inputs", "store:a", "./a", "--out", "m"]) == 0


# --- sizes before allocation, and empty splits ----------------------------------------------------


def test_a_lora_rank_above_the_layers_is_refused_before_allocating(capsys, here):
    refused(capsys, here, [*TRAIN, "--out", "r", "--lora-r", "1000000"], 4, "lora_r 1000000", "use lora_r <=")


def test_train_without_train_examples_and_eval_without_test_examples_agree(capsys, here):
    refused(capsys, here, [*TRAIN[:4], "only-test.jsonl", "--out", "r"], 3, "no 'train' examples")
    refused(capsys, here, ["eval", "--model", "tiny-random", "--task", "only-train.jsonl"], 3, "no 'test' examples")


# --- the store ------------------------------------------------------------------------------------


def test_store_show_into_a_closed_pipe_ends_quietly(capsys, here, monkeypatch):
    """`cairn store show ID | head -1`: the reader has gone before everything was written."""
    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "w") as closed:
        monkeypatch.setattr(sys, "stdout", closed)
        assert main(["store", "show", "a"]) == 0
        monkeypatch.undo()
    assert "Traceback" not in capsys.readouterr().err


def test_a_link_that_leaves_a_contribution_is_not_copied_into_the_store(capsys, here):
    refused(capsys, here, ["store", "--store", "store", "add", "leaky"], 3, "extra.txt")


def test_store_verify_reads_the_index_digest_when_weights_and_manifest_were_edited_together(capsys, here):
    from cairn.manifest import file_hashes

    item = here / "store" / "items" / "a"
    (item / "adapter_config.json").write_text((item / "adapter_config.json").read_text() + "\n")
    manifest = json.loads((item / "cairn.json").read_text())
    (item / "cairn.json").write_text(json.dumps({**manifest, "files": file_hashes(item)}))
    refused(capsys, here, ["store", "--store", "store", "verify"], 3, "failed verification")


# --- model files --------------------------------------------------------------------------------


@pytest.mark.parametrize("model, fragment", [
    ("header-list", "header-list/model.safetensors"),
    ("truncated", "truncated/model.safetensors"),
    ("absurd-config", "absurd-config/config.json"),
    ("garbage.gguf", "garbage.gguf"),
], ids=["safetensors-header-a-list", "safetensors-truncated", "absurd-config-sizes", "garbage-gguf"])  # fmt: skip
def test_a_broken_model_is_a_one_line_model_error_naming_its_file(capsys, here, model, fragment):
    refused(capsys, here, ["eval", "--model", model, "--task", "t.jsonl"], 5, fragment)


def test_a_pickle_refused_even_with_allow_pickle_says_why(capsys, here):
    refused(capsys, here, ["eval", "--model", "pickled", "--task", "t.jsonl", "--allow-pickle"], 5, "pytorch_model.bin", "_NotATensor")


def test_a_corrupt_input_of_a_merge_names_its_file_and_writes_nothing(capsys, here):
    shutil.copytree(here / "header-list", here / "ft")
    refused(capsys, here, [*MERGE, "--inputs", "ft", "--out", "m"], 5, "ft/model.safetensors")
    assert not (here / "m").exists()


# --- one validation path ------------------------------------------------------------------------


@pytest.mark.parametrize("argv, fragments", [
    (["run", "merge-density.yaml"], ("density does not apply to average",)),
    (["run", "olora-fft.yaml"], ("olora", "lora only")),
    ([*MERGE[:2], "average", *MERGE[3:], "--inputs", "./a", "--density", "0.5", "--out", "m"], ("density does not apply to average",)),
    ([*MIX, "--inputs", "./a", "./a", "--top-k", "1", "--out", "x"], ("top_k", "uniform")),
    (["mix", "--router", "centroid", "--base", "tiny-random", "--inputs", "ft1", "ft2", "--temperature", "0.1", "--out", "x"], ("temperature", "Mixtral")),
], ids=["run-merge-density", "run-olora-fft", "merge-density", "mix-uniform-top-k", "mixtral-temperature"])  # fmt: skip
def test_an_option_that_does_not_apply_is_refused_the_same_on_every_route(capsys, here, argv, fragments):
    from cairn.models import resolve_folder

    for name in ("ft1", "ft2"):  # full models of the base, for the Mixtral route
        shutil.copytree(resolve_folder("tiny-random"), here / name)
    refused(capsys, here, argv, 4, *fragments)
