"""Data parallelism against FSDP2 sharding on 2 CPU processes: the same full fine-tuning of the
bundled model launched with configs/accelerate/ddp.yaml and with configs/accelerate/fsdp2.yaml.

Prints, per launch, each process's share of the training state (`state_mb`: weights, gradients,
AdamW moments, read off its tensors), its training's peak rise in resident memory, the wall time,
and the largest relative difference between the two loss curves. On GPUs set ACCELERATE_USE_CPU=0
and num_processes in the configs to the GPU count.

    .venv/bin/python bench/distributed.py [--task SOURCE] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="pack:people?facts=10")
    parser.add_argument("--out", type=Path, default=None, help="where the two contributions go (default: a temporary folder)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="cairn-bench-distributed-"))
    env = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **os.environ}
    rows = {}
    for mode in ("ddp", "fsdp2"):
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "accelerate" / f"{mode}.yaml"),
                   "--main_process_port", "0", "-m", "cairn.cli", "train", "--base", "bundled:smollm2-135m", "--task", args.task,
                   "--method", "fft", "--lr", "1e-4", "--epochs", "1", "--batch-size", "4", "--bf16", "false", "--no-eval",
                   "--out", str(out / mode), "--overwrite"]  # fmt: skip
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        rows[mode] = json.loads((out / mode / "cairn.json").read_text())["train"]
    ddp, fsdp2 = rows["ddp"]["losses"], rows["fsdp2"]["losses"]
    print("| 2 processes, bundled 135M, FFT | state per process (MB) | peak rise per process (MB) | wall (s) | steps |")
    print("|---|---|---|---|---|")
    for mode, train in rows.items():
        print(f"| {mode} | {train['state_mb']:.0f} | {train['peak_mem_mb']:.0f} | {train['wall_s']:.1f} | {train['steps']} |")
    print(f"FSDP2 / DDP state: {rows['fsdp2']['state_mb'] / rows['ddp']['state_mb']:.3f}; "
          f"largest relative loss difference: {max(abs(a - b) / abs(a) for a, b in zip(ddp, fsdp2)):.1e}")


if __name__ == "__main__":
    main()
