"""The training loop under `accelerate launch` with 2 CPU processes (gloo) follows the loss curve
of one process with the same global batch: every process draws the same global batches and
trains on its rows, the loss is summed over them and divided by the global token count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("train_losses.py")
# Relative difference allowed between the 1- and 2-process curves at every step: float32 only
# reorders sums (measured ≤ 3e-7 over 16 steps); bf16 autocast rounds activations of differently
# shaped matmuls apart (measured ≤ 8e-5).
TOLERANCE = {False: 1e-5, True: 1e-3}


def launch(out: Path, processes: int, fields: list[str]) -> dict:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    if processes == 1:
        command = [sys.executable, str(SCRIPT)]
    else:  # --multi_gpu starts them through torchrun; ACCELERATE_USE_CPU joins them over gloo
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", str(SCRIPT)]
    done = subprocess.run([*command, str(out), *fields], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    "fields",
    [
        ["method=lora", "lr=0.01", "bf16=false", "batch_size=6"],
        ["method=fft", "lr=0.001", "bf16=true", "batch_size=6"],
        # 22 examples in batches of 7 leave a last batch of 1 row: one process trains on nothing then
        ["method=lora", "lr=0.01", "bf16=false", "batch_size=7"],
        ["method=lora", "lr=0.01", "bf16=false", "batch_size=3", "grad_accum=2"],
    ],
    ids=["lora-fp32", "fft-bf16", "uneven-last-batch", "grad-accum"],
)
def test_two_processes_follow_the_one_process_loss_curve(tmp_path, fields):
    fields = [*fields, "epochs=4"]
    one = launch(tmp_path / "one.json", 1, fields)
    two = launch(tmp_path / "two.json", 2, fields)
    assert (one["processes"], two["processes"]) == (1, 2)
    assert two["steps"] == one["steps"] and two["tokens"] == one["tokens"]
    assert one["losses"][-1] < one["losses"][0] - 0.1  # it trains: the curves are worth comparing
    tolerance = TOLERANCE["bf16=true" in fields]
    for step, (a, b) in enumerate(zip(one["losses"], two["losses"]), 1):
        assert abs(a - b) <= tolerance * abs(a), f"step {step}: one process {a}, two {b}"


def test_cairn_run_under_two_processes_trains_together_and_writes_once(tmp_path):
    """`cairn run` launched on 2 processes: both train every stage, the main one evaluates and
    writes; its results match a single-process run of the same config."""
    import yaml

    from tests.conftest import code_tasks

    config = {
        "name": "dist",
        "base": "tiny-random",
        "tasks": code_tasks(tmp_path),
        "probe": None,
        "train": {"method": "lora", "epochs": 2, "batch_size": 4, "lr": 1e-2, "bf16": False},
        "strategies": [{"name": "seq", "kind": "sequential"}, {"name": "olora", "kind": "olora"}, {"name": "avg", "kind": "merge", "method": "average"}],
    }
    (tmp_path / "dist.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cli = ["-m", "cairn.cli", "run", str(tmp_path / "dist.yaml"), "--out"]
    launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", "0"]
    for command, out in (([sys.executable, *cli], "one"), ([sys.executable, *launcher, *cli], "two")):
        done = subprocess.run([*command, str(tmp_path / out)], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / out / "results.json").read_text()) for out in ("one", "two"))
    assert done.stdout.count("report:") == 1  # one process reported
    for name in ("seq", "olora", "avg"):
        flat = lambda R: [x for row in R for x in row]  # noqa: E731
        assert flat(two["strategies"][name]["R"]) == pytest.approx(flat(one["strategies"][name]["R"]), abs=0.01)
        assert two["strategies"][name]["cost"]["tokens"] == one["strategies"][name]["cost"]["tokens"]

    def curves(out):
        manifests = [json.loads(p.read_text()) for p in sorted((tmp_path / out / "cache").rglob("cairn.json"))]
        return sorted((m["task"], m["train"]["losses"]) for m in manifests if "train" in m)

    assert len(curves("one")) == 4  # alpha from the base (shared by all three); beta after it (seq), orthogonal to it (olora), from the base (avg)
    for (task_a, a), (task_b, b) in zip(curves("one"), curves("two"), strict=True):
        assert task_a == task_b and b == pytest.approx(a, rel=TOLERANCE[False])


def test_processes_that_accelerate_leaves_unjoined_stop_instead_of_all_writing(tmp_path):
    """An FSDP config on a machine without GPUs: accelerate starts 2 processes but joins neither,
    so both would be the main one; the first question of who is main stops them with the fix."""
    config = tmp_path / "fsdp.yaml"
    config.write_text("distributed_type: FSDP\nnum_processes: 2\nnum_machines: 1\nmixed_precision: 'no'\nfsdp_config: {fsdp_version: 2}\n")
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"} | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port", "0",
               "-m", "cairn.cli", "train", "--base", "tiny-random", "--task", "pack:people", "--out", str(tmp_path / "out")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "started as 2 processes (WORLD_SIZE) but accelerate joined them as 1" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "kind, processes, batch_size, message",
    [
        ("DEEPSPEED", 2, 16, "distributed_type DEEPSPEED: Cairn's training loop does not drive a DeepSpeed engine"),
        ("MEGATRON_LM", 2, 16, "distributed_type MEGATRON_LM is not supported"),
        ("MULTI_CPU", 4, 3, "batch_size 3 is the global batch, split between 4 processes: it must be at least 4"),
    ],
)
def test_what_the_loop_cannot_do_distributed_is_refused_before_any_work(kind, processes, batch_size, message):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from cairn.errors import ConfigError
    from cairn.options import TrainConfig
    from cairn.training import _check_distribution

    accelerator = SimpleNamespace(distributed_type=DistributedType[kind], num_processes=processes)
    with pytest.raises(ConfigError, match=message):
        _check_distribution(accelerator, TrainConfig(batch_size=batch_size))
    _check_distribution(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2), TrainConfig(batch_size=2))  # fine


def test_which_launches_shard_with_fsdp2_and_which_are_refused(monkeypatch):
    """FSDP2 on GPUs (accelerate's FSDP mode) and on CPU processes (accelerate's MULTI_CPU with the
    config's FSDP settings); FSDP1 refused; a DeepSpeed config that accelerate ran as MULTI_CPU refused."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from cairn.distributed import fsdp2_requested
    from cairn.errors import ConfigError
    from cairn.options import TrainConfig
    from cairn.training import _check_distribution

    for name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    cpu = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2)
    gpu = lambda version: SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=2, state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version)))  # noqa: E731
    assert not fsdp2_requested(cpu)
    assert fsdp2_requested(gpu(2))
    with pytest.raises(ConfigError, match=r"fsdp_version 1; Cairn shards with FSDP2: set fsdp_config: \{fsdp_version: 2\}"):
        fsdp2_requested(gpu(1))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert fsdp2_requested(cpu)
    assert fsdp2_requested(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))  # accelerate's PartialState on GPUs
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="fsdp_version 1"):
        fsdp2_requested(cpu)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="use FSDP2, which shards the same three"):
        _check_distribution(cpu, TrainConfig(batch_size=2))


def test_a_zero3_launch_is_refused_with_what_it_needs_and_writes_nothing(tmp_path):
    """configs/accelerate/zero3.yaml: accelerate reads it and refuses for want of the deepspeed
    package; where the package is installed, Cairn refuses before any work and names FSDP2."""
    config = Path(__file__).resolve().parents[2] / "configs" / "accelerate" / "zero3.yaml"
    from accelerate.commands.config.config_args import load_config_from_file

    assert load_config_from_file(str(config)).deepspeed_config["zero_stage"] == 3
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port", "0",
               "-m", "cairn.cli", "train", "--base", "tiny-random", "--task", "pack:people?facts=5", "--out", str(tmp_path / "out")]
    done = subprocess.run(command, env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "DeepSpeed is not installed" in done.stderr or "use FSDP2, which shards the same three" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_run_with_strategies_that_read_whole_weights_is_refused_under_fsdp2_before_any_model_loads(monkeypatch, tmp_path):
    import cairn.experiment as experiment
    from cairn.config import parse_config
    from cairn.errors import ConfigError

    config = {"name": "x", "base": "no-such-base-is-read", "tasks": ["pack:people?facts=5"], "probe": None,
              "strategies": [{"name": "seq", "kind": "sequential"}, {"name": "orth", "kind": "olora"}, {"name": "anchored", "kind": "l2"},
                             {"name": "kept", "kind": "osf", "train": {"method": "fft"}}, {"name": "mm", "kind": "magmax"}]}  # fmt: skip
    monkeypatch.setattr(experiment, "fsdp2_launch", lambda: True)
    with pytest.raises(ConfigError, match=r"strategies orth, anchored, kept train with a loss term or a gradient projection .*\(configs/accelerate/ddp.yaml\)"):
        experiment.run_experiment(parse_config(config), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
