"""Merge 4 full fine-tunes of the bundled 135M model with Cairn and with mergekit; print the
wall time and peak memory of each (a separate process each, peak RSS from wait4 in a small launcher), their ratios,
and how far the two tools' outputs are apart.

    make bench-merge           # creates bench/.mergekit-venv (mergekit from PyPI) and runs this

The fine-tunes (1 epoch of FFT on each knowledge pack, cached in bench/work/merge) take about
two minutes the first time. Bars (issue 4): ties >= 10x faster than mergekit with <= half its
peak memory; average >= 2x faster.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PACKS = ["people", "compounds", "companies", "countries"]
# Cairn method -> (mergekit method, Cairn CLI options, mergekit per-model parameters, mergekit global parameters)
CASES = {
    "ties": ("ties", ["--density", "0.5"], "weight: 1.0, density: 0.5", ""),
    "average": ("linear", [], "weight: 1.0", ""),
    "task_arithmetic": ("task_arithmetic", ["--lambda", "0.5"], "weight: 1.0", "lambda: 0.5"),
    "breadcrumbs": ("breadcrumbs", ["--density", "0.5"], "weight: 1.0, density: 0.5, gamma: 0.01", ""),
    "breadcrumbs_ties": ("breadcrumbs_ties", ["--density", "0.5"], "weight: 1.0, density: 0.5, gamma: 0.01", ""),
    "model_stock": ("model_stock", [], "", ""),
    "slerp": ("slerp", [], "", "t: 0.4"),  # the base and the first fine-tune; `cairn merge` has no --t, so Cairn reads the same YAML
}
ONE_INPUT = ("slerp",)  # methods that take the base and one input


def fine_tunes(work: Path) -> tuple[Path, list[Path]]:
    from cairn.data import load_task
    from cairn.options import DEFAULT_BASE
    from cairn.models import resolve_folder
    from cairn.manifest import read_manifest
    from cairn.options import TrainConfig
    from cairn.contributions import train_contribution

    out = []
    for pack in PACKS:
        folder = work / f"fft-{pack}"
        if read_manifest(folder) is None:
            cfg = TrainConfig(method="fft", epochs=1, lr=1e-4)
            train_contribution(DEFAULT_BASE, load_task(f"pack:{pack}"), cfg, folder)
        out.append(folder)
    return Path(resolve_folder(DEFAULT_BASE)), out


# Linux counts a spawned child's peak RSS from its parent's peak (the child starts as the parent's
# copy), so this process, which holds whole models while comparing, would inflate every figure.
# A small launcher process forks the command and reports the command's own peak.
_LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss, file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measure(cmd: list[str], env=None) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of a command run as a child process."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return wall, int(proc.stderr.strip().splitlines()[-1]) / 2**20


def compare(a: Path, b: Path, ties_inputs: tuple[Path, list[Path], float] | None = None) -> tuple[float, float, int]:
    """(largest absolute difference, fraction of entries differing by more than 1e-6, how many of
    those are not explained by a tie at a TIES threshold). An entry is explained when some
    input's |τ| there equals that input's threshold: which of those tied entries to keep is
    arbitrary in mergekit (an unstable sort), so the two tools may keep different ones."""
    from cairn.methods.merge.methods import magnitude_threshold
    from cairn.weights.tensor_files import FolderWeights

    fa, fb = FolderWeights(a), FolderWeights(b)
    if ties_inputs:
        base_dir, inputs, density = ties_inputs
        base_w, input_ws = FolderWeights(base_dir), [FolderWeights(f) for f in inputs]
    worst, off, total, unexplained = 0.0, 0, 0, 0
    for name in fa.keys():
        d = np.abs(fa.get(name).astype(np.float32) - fb.get(name).astype(np.float32))
        worst = max(worst, float(d.max()))
        bad = d.reshape(-1) > 1e-6
        off += int(bad.sum())
        total += d.size
        if ties_inputs and bad.any():
            base = base_w.get(name)
            tied = np.zeros_like(bad)
            for weights in input_ws:
                theta = weights.get(name)
                t, _ = magnitude_threshold(base, theta, density)
                tied |= np.abs(theta.astype(np.float32) - base.astype(np.float32)).reshape(-1) == t
            unexplained += int((bad & ~tied).sum())
    return worst, off / total, unexplained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mergekit", type=Path, default=ROOT / "bench" / ".mergekit-venv" / "bin" / "mergekit-yaml")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "merge")
    parser.add_argument("--methods", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    if not args.mergekit.exists():
        sys.exit(f"{args.mergekit} not found: run `make bench-merge`, which installs mergekit into bench/.mergekit-venv")
    args.work.mkdir(parents=True, exist_ok=True)
    base, fts = fine_tunes(args.work)
    for f in [base, *fts]:  # warm the page cache so neither tool pays the first disk read
        (f / "model.safetensors").read_bytes()
    cairn = str(Path(sys.executable).with_name("cairn"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for method in args.methods:
        mk_method, cairn_opts, mk_params, mk_globals = CASES[method]
        config = args.work / f"mergekit-{method}.yml"
        inputs = fts[:1] if method in ONE_INPUT else fts
        models = "".join(f"  - model: {f}\n    parameters: {{{mk_params}}}\n" for f in inputs)
        base_line = "" if mk_method == "linear" else f"base_model: {base}\n"  # linear's inputs are the models alone
        globals_line = f"parameters: {{{mk_globals}}}\n" if mk_globals else ""
        config.write_text(f"merge_method: {mk_method}\n{base_line}models:\n{models}{globals_line}dtype: float32\n")
        mk_out, c_out = args.work / f"out-mergekit-{method}", args.work / f"out-cairn-{method}"
        mk = measure([str(args.mergekit), str(config), str(mk_out), "--quiet"], env)
        given = ["--config", str(config)] if method == "slerp" else ["--method", method, "--base", str(base), "--inputs", *map(str, inputs), *cairn_opts]
        ca = measure([cairn, "merge", *given, "--out", str(c_out)], env)
        worst, frac, unexplained = compare(mk_out, c_out, (base, fts, 0.5) if method == "ties" else None)
        print(f"{method:16s} mergekit {mk[0]:6.1f} s {mk[1]:5.2f} GB | cairn {ca[0]:5.1f} s {ca[1]:5.2f} GB | "
              f"{mk[0] / ca[0]:5.1f}x faster, {ca[1] / mk[1]:.2f}x memory | max |diff| {worst:.2e}, {frac:.2e} of entries > 1e-6"
              + (f", {unexplained} not at a threshold tie" if method == "ties" else ""), flush=True)
    print(f"\n{torch.get_num_threads()} threads; 4 fine-tunes of {base.name}, float32")


if __name__ == "__main__":
    main()
