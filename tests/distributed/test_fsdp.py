"""Training sharded by FSDP2 between 2 CPU processes (gloo), launched with the shipped
configs/accelerate/fsdp2.yaml: the same loss curve and the same trained model as one process,
the whole model on every process afterwards, a sharded checkpoint that resumes to the
uninterrupted result, and `cairn train` / `cairn run` writing what a single process writes.
accelerate's own FSDP mode needs GPUs; on CPUs Cairn shards with the function accelerate's
`prepare` calls there, so what these tests run is the GPU path once the model is sharded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("train_losses.py")
FSDP2 = ROOT / "configs" / "accelerate" / "fsdp2.yaml"
# Relative difference allowed between the 1-process and the sharded 2-process curves at every step:
# float32 only reorders sums (measured over 16 steps: at most 1.0e-7 for LoRA with gradient
# accumulation, 2.8e-7 for FFT); bf16 autocast rounds differently shaped matmuls apart (measured:
# at most 3.7e-5 for FFT).
TOLERANCE = {False: 1e-5, True: 1e-3}
# Largest difference allowed between the float32 weights trained by one process and by two sharded
# ones after 16 AdamW steps (measured: at most 1.5e-6 for LoRA at lr 1e-2, 2.4e-7 for FFT at 1e-3;
# bf16 autocast: 1.6e-3 for FFT, not compared).
WEIGHTS_ATOL = 1e-4


def env(**extra) -> dict:
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **extra}


def launched(*command: str) -> list[str]:
    """`command` (a script, or `-m module ...`) under `accelerate launch` with the FSDP2 config."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP2), "--main_process_port", "0", *command]


def train_script(out: Path, processes: int, fields: list[str], expect: int = 0) -> dict | None:
    command = launched(str(SCRIPT)) if processes == 2 else [sys.executable, str(SCRIPT)]
    done = subprocess.run([*command, str(out), *fields], env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == expect, done.stderr[-3000:]
    return json.loads(out.read_text()) if expect == 0 else None


def fingerprints(out: Path) -> set[str]:
    return {p.read_text() for p in out.parent.glob(f"{out.name}.rank*")}


@pytest.mark.parametrize(
    "fields",
    [
        ["method=lora", "lr=0.01", "bf16=false", "batch_size=3", "grad_accum=2"],
        ["method=fft", "lr=0.001", "bf16=true", "batch_size=6"],
    ],
    ids=["lora-fp32-grad-accum", "fft-bf16"],
)
def test_two_sharded_processes_follow_one_process_and_both_end_with_its_whole_model(tmp_path, fields):
    fields = [*fields, "epochs=4"]
    one = train_script(tmp_path / "one.json", 1, [*fields, f"weights={tmp_path / 'one.safetensors'}"])
    two = train_script(tmp_path / "two.json", 2, [*fields, f"weights={tmp_path / 'two.safetensors'}"])
    assert (one["processes"], two["processes"]) == (1, 2)
    assert (one["fsdp_groups"], two["fsdp_groups"]) == ([], [3])  # one group per decoder layer of tiny-random's 2, and the root's
    assert two["steps"] == one["steps"] and two["tokens"] == one["tokens"]
    assert one["losses"][-1] < one["losses"][0] - 0.1  # it trains: the curves are worth comparing
    tolerance = TOLERANCE["bf16=true" in fields]
    for step, (a, b) in enumerate(zip(one["losses"], two["losses"]), 1):
        assert abs(a - b) <= tolerance * abs(a), f"step {step}: one process {a}, two sharded {b}"
    assert len(fingerprints(tmp_path / "two.json")) == 1  # both processes hold the same whole model
    assert 0.45 * one["state_mb"] <= two["state_mb"] <= 0.55 * one["state_mb"]  # each holds half the weights, gradients and moments
    mine, theirs = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert mine.keys() == theirs.keys()
    if "bf16=false" in fields:
        assert max(float((mine[k] - theirs[k]).abs().max()) for k in mine) <= WEIGHTS_ATOL


def test_a_sharded_training_stopped_after_a_checkpoint_resumes_to_the_uninterrupted_result(tmp_path):
    """LoRA: the shards hold the trainable part only (the frozen base is not checkpointed). FFT
    resumes the same way (measured: equal losses and weights); it is left out for the suite's time."""
    fields = ["method=lora", "lr=0.01", "bf16=false", "batch_size=3", "epochs=2", "checkpoint_every=3"]
    whole = train_script(tmp_path / "whole.json", 2, [*fields, f"checkpoint_dir={tmp_path / 'a'}", f"weights={tmp_path / 'whole.safetensors'}"])
    train_script(tmp_path / "stopped.json", 2, [*fields, f"checkpoint_dir={tmp_path / 'b'}", "stop_after_checkpoints=2"], expect=1)
    checkpoint = tmp_path / "b" / "step-00000006"
    assert [p.name for p in (tmp_path / "b").iterdir()] == [checkpoint.name]
    assert sorted(p.name for p in (checkpoint / "shards").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each process's shards, no gathered copy
    assert not (checkpoint / "trainable.safetensors").exists()
    resumed = train_script(tmp_path / "resumed.json", 2, [*fields, f"checkpoint_dir={tmp_path / 'b'}", f"weights={tmp_path / 'resumed.safetensors'}"])
    assert resumed["losses"] == whole["losses"] and resumed["tokens"] == whole["tokens"]
    a, b = load_file(tmp_path / "whole.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert all(a[k].equal(b[k]) for k in a)
    assert fingerprints(tmp_path / "whole.json") == fingerprints(tmp_path / "resumed.json")


def test_cairn_train_under_fsdp2_saves_the_contribution_one_process_saves(tmp_path):
    """A full fine-tune (every weight sharded) through `cairn train`: the main process saves the
    gathered model, its routing statistics and manifest; the weights are one process's."""
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"prompt": f"Q: code {i}?\nA:", "answer": f"c{i} x{i % 3}"}) + "\n" for i in range(12)))
    cli = ["-m", "cairn.cli", "train", "--base", "tiny-random", "--task", str(tmp_path / "t.jsonl"), "--method", "fft", "--lr", "1e-3",
           "--epochs", "2", "--batch-size", "4", "--bf16", "false", "--no-eval", "--out"]
    for command, out in (([sys.executable, *cli], "one"), (launched(*cli), "two")):
        done = subprocess.run([*command, str(tmp_path / out)], env=env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / out / "cairn.json").read_text()) for out in ("one", "two"))
    assert two["base_fingerprint"] == one["base_fingerprint"] and two["train"]["steps"] == one["train"]["steps"]
    assert two["train"]["losses"] == pytest.approx(one["train"]["losses"], rel=TOLERANCE[False])
    mine, theirs = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert mine.keys() == theirs.keys() and all(mine[k].shape == theirs[k].shape for k in mine)
    assert max(float((mine[k] - theirs[k]).abs().max()) for k in mine) <= WEIGHTS_ATOL
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())  # routing statistics too


def test_cairn_run_under_fsdp2_evaluates_the_gathered_models_as_one_process_does(tmp_path):
    """Sequential full fine-tuning and a merge of full fine-tunes, sharded: the main process
    evaluates every stage's whole model and writes one set of results, equal to one process's."""
    import yaml

    from tests.conftest import code_tasks

    config = {
        "name": "fsdp", "base": "tiny-random", "tasks": code_tasks(tmp_path), "probe": None,
        "train": {"method": "fft", "epochs": 2, "batch_size": 4, "lr": 1e-3, "bf16": False},
        "strategies": [{"name": "seq", "kind": "sequential"}, {"name": "avg", "kind": "merge", "method": "average"}],
    }  # fmt: skip
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(config))
    cli = ["-m", "cairn.cli", "run", str(tmp_path / "fsdp.yaml"), "--out"]
    for command, out in (([sys.executable, *cli], "one"), (launched(*cli), "two")):
        done = subprocess.run([*command, str(tmp_path / out)], env=env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("report:") == 1  # one process reported
    one, two = (json.loads((tmp_path / out / "results.json").read_text()) for out in ("one", "two"))
    for name in ("seq", "avg"):
        flat = lambda R: [x for row in R for x in row]  # noqa: E731
        assert flat(two["strategies"][name]["R"]) == pytest.approx(flat(one["strategies"][name]["R"]), abs=0.01)
        assert two["strategies"][name]["cost"]["tokens"] == one["strategies"][name]["cost"]["tokens"]


def test_a_regularised_training_is_refused_under_fsdp2_before_any_step(monkeypatch):
    """O-LoRA's penalty reads whole adapter matrices: sharded, it is refused with what to use instead."""
    import torch

    from cairn import training
    from cairn.data import Example
    from cairn.errors import ConfigError
    from cairn.models import load_model
    from cairn.options import TrainConfig

    monkeypatch.setattr(training, "fsdp2_requested", lambda accelerator: True)
    model, tokenizer = load_model("tiny-random")
    steps = []
    with pytest.raises(ConfigError, match=r"olora on t: a regularised training .*distributed_type: MULTI_GPU"):
        training.train(model, tokenizer, [Example("q", "a")] * 4, TrainConfig(batch_size=2), extra_loss=lambda m: steps.append(1) or torch.zeros(()), progress=False, desc="olora on t")
    assert steps == []


def test_every_process_of_a_launch_filling_the_model_cache_leaves_whole_weights(tmp_path):
    """transformers saves weights on rank 0 only once torch.distributed is up; whichever process's
    copy of the tiny-random cache lands, it has its weights."""
    from cairn.models import ModelSpec, resolve_folder

    bundled = resolve_folder(ModelSpec("bundled", "smollm2-135m"))  # its tokenizer builds tiny-random; linked, not converted again
    (tmp_path / "cache" / "models").mkdir(parents=True)
    (tmp_path / "cache" / "models" / Path(bundled).name).symlink_to(bundled)
    script = tmp_path / "load.py"
    script.write_text("from accelerate import PartialState\nPartialState()\nfrom cairn.models import load_model, fingerprint\nprint(fingerprint(load_model('tiny-random')[0]))\n")
    done = subprocess.run(launched(str(script)), env=env(CAIRN_CACHE=str(tmp_path / "cache")), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "cache" / "models"
    (cached,) = [p for p in folder.iterdir() if p.name.startswith("tiny-random") and not p.name.startswith(".")]
    assert (cached / "model.safetensors").is_file() and (cached / "config.json").is_file()
    assert len(set(done.stdout.split())) == 1  # both processes loaded the same model
