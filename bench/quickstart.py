"""Wall time and peak memory of the quickstart (`cairn run`), then of the same command again.

Bars: issue 3 (`bench/quickstart-sequential.yaml`, the default): first run <= 10 minutes on 2 cores;
issue 7 (`--config configs/quickstart.yaml`, every strategy): first run <= 15 minutes and <= 6 GB
peak memory. The rerun reuses finished work: < 1 minute.

    .venv/bin/python bench/quickstart.py [--config bench/quickstart-sequential.yaml] [--out runs/bench-quickstart]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak resident MB of the child) for one command."""
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="bench/quickstart-sequential.yaml")
    parser.add_argument("--out", default="runs/bench-quickstart")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    cmd = [sys.executable, "-m", "cairn.cli", "run", args.config, "--out", args.out]
    first, peak = timed(cmd)
    again, _ = timed(cmd)
    results = json.loads((Path(args.out) / "results.json").read_text())
    for name, s in results["strategies"].items():
        summary = ", ".join(f"{k} {v:+.3f}" for k, v in s["summary"].items() if v is not None)
        print(f"{name}: {summary}")
    print(f"first run {first / 60:.1f} min (peak {peak / 1024:.2f} GB), rerun {again:.0f} s")
    full = Path(args.config).resolve() == (Path(__file__).parents[1] / "configs" / "quickstart.yaml").resolve()
    limit = 900 if full else 600
    print(f"bars met ({'issue 7: <= 15 min, <= 6 GB' if full else 'issue 3: <= 10 min'}; rerun < 1 min): {first <= limit and again < 60 and (not full or peak <= 6 * 1024)}")


if __name__ == "__main__":
    main()
