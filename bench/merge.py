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
    "slerp": ("slerp", [], "", "t: 0.4"),  # the base and the first fine-tune; Cairn reads the same YAML
    "della": ("della", ["--density", "0.5"], "weight: 1.0, density: 0.5, epsilon: 0.15", ""),
    "della_linear": ("della_linear", ["--density", "0.5"], "weight: 1.0, density: 0.5, epsilon: 0.15", ""),
    "sce": ("sce", ["--select-topk", "0.5"], "", "select_topk: 0.5"),
    "karcher": ("karcher", [], "", "max_iter: 10, tol: 1.0e-5"),  # mergekit averages the base_model too: Cairn reads the same YAML
    "nuslerp": ("nuslerp", ["--weights", "1", "0.5"], "weight: WEIGHT", ""),  # the first two fine-tunes, weights 1 and 0.5
}
ONE_INPUT = ("slerp",)  # methods that take the base and one input
TWO_INPUTS = ("nuslerp",)  # methods that take the base and two inputs
SAME_YAML = ("slerp", "karcher")  # Cairn reads mergekit's YAML (its meaning of the base differs from `cairn merge --base`)
SEEDED = ("della", "della_linear")  # random: compared by their statistics, not entry by entry


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
print(usage.ru_maxrss, usage.ru_utime + usage.ru_stime, file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measure(cmd: list[str], env=None) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in GB, CPU seconds: user + system) of a command run as a child
    process. On a machine other jobs share, CPU time varies less than wall time."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    rss, cpu = proc.stderr.strip().splitlines()[-1].split()
    return wall, int(rss) / 2**20, float(cpu)


def sce_ties(base: np.ndarray, thetas: list[np.ndarray], select_topk: float) -> np.ndarray:
    """The entries (flat, boolean) whose variance across the inputs equals SCE's k-th largest: which
    of those to select is arbitrary in mergekit (torch.topk), so the two tools may pick different ones."""
    from cairn.methods.merge import kernels as K
    from cairn.methods.merge.methods import top_threshold

    b = np.ascontiguousarray(base, np.float32).reshape(-1)
    var = np.empty(b.size, np.float32)
    K.input_variance(var, tuple(np.ascontiguousarray(t, np.float32).reshape(-1) for t in thetas), b)
    k = int(np.float32(np.count_nonzero(var)) * np.float32(select_topk))
    t, _ = top_threshold(np.zeros_like(var), var, k)
    return var == t


def compare(a: Path, b: Path, ties_inputs: tuple[Path, list[Path], float] | None = None, sce_inputs: tuple[Path, list[Path], float] | None = None) -> tuple[float, float, int]:
    """(largest absolute difference, fraction of entries differing by more than 1e-6, how many of
    those are not explained by a tie at a TIES threshold or at SCE's variance threshold). A TIES
    entry is explained when some input's |τ| there equals that input's threshold: which of those
    tied entries to keep is arbitrary in mergekit (an unstable sort), so the two tools may keep
    different ones; an SCE entry when its variance across the inputs is the k-th largest."""
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
        if sce_inputs and bad.any():
            sce_base, sce_fts, topk = sce_inputs
            unexplained += int((bad & ~sce_ties(FolderWeights(sce_base).get(name), [FolderWeights(f).get(name) for f in sce_fts], topk)).sum())
        if ties_inputs and bad.any():
            base = base_w.get(name)
            tied = np.zeros_like(bad)
            for weights in input_ws:
                theta = weights.get(name)
                t, _ = magnitude_threshold(base, theta, density)
                tied |= np.abs(theta.astype(np.float32) - base.astype(np.float32)).reshape(-1) == t
            unexplained += int((bad & ~tied).sum())
    return worst, off / total, unexplained


def della_statistics(base_dir: Path, theta_dir: Path, out_dir: Path) -> tuple[float, float, float, float]:
    """Of a one-input della_linear merge (weight 1): (fraction of the non-zero τ entries kept,
    kept fraction among the smallest tenth of each row by |τ|, among the largest tenth, the mean
    over tensors of the rescale ‖out − base‖₁ / ‖kept τ‖₁). Rows as mergekit ranks: along dim 1,
    a 1-D tensor as one row."""
    from cairn.weights.tensor_files import FolderWeights

    fb, ft, fo = FolderWeights(base_dir), FolderWeights(theta_dir), FolderWeights(out_dir)
    kept = total = low_kept = low_total = high_kept = high_total = 0
    scales = []
    for name in fb.keys():
        b = fb.get(name).astype(np.float32)
        if b.dtype.kind != "f" or b.size < 20:
            continue
        tau = ft.get(name).astype(np.float32) - b
        moved = fo.get(name).astype(np.float32) - b
        if not tau.any():
            continue
        rows = lambda a: a.reshape(1, -1) if a.ndim < 2 else np.moveaxis(a, 1, -1).reshape(-1, a.shape[1])  # noqa: E731
        t, k = rows(tau), rows(moved) != 0
        kept += int((k & (t != 0)).sum())
        total += int((t != 0).sum())
        tenth = max(1, t.shape[1] // 10)
        order = np.argsort(np.abs(t), axis=1)
        low, high = np.take_along_axis(k, order[:, :tenth], 1), np.take_along_axis(k, order[:, -tenth:], 1)
        low_kept, low_total, high_kept, high_total = low_kept + int(low.sum()), low_total + low.size, high_kept + int(high.sum()), high_total + high.size
        scales.append(np.abs(moved).sum(dtype=np.float64) / np.abs(t[k]).sum(dtype=np.float64))
    return kept / total, low_kept / low_total, high_kept / high_total, float(np.mean(scales))


def karcher_reference(xs: list[np.ndarray], max_iter: int = 10, tol: float = 1e-5) -> np.ndarray:
    """mergekit's Karcher iteration (karcher_merge_tensors) on whole tensors in float64."""
    xs = [x.astype(np.float64).reshape(-1) for x in xs]
    norms = [float(np.sqrt(x @ x)) for x in xs]
    units = [x / n for x, n in zip(xs, norms) if n > tol]
    a = 1 / len(units)
    u = sum(a * v for v in units)
    u /= np.sqrt(u @ u)
    for _ in range(max_iter):
        step = np.zeros_like(u)
        for v in units:
            dot = float(np.clip(u @ v, -1, 1))
            theta = np.arccos(dot)
            if theta >= tol:
                step += a * theta / np.sin(theta) * (v - dot * u)
        size = float(np.sqrt(step @ step))
        if size < tol:
            break
        u = np.cos(size) * u + np.sin(size) * step / size
        u /= np.sqrt(u @ u)
    return sum(norms) / len(xs) * u


def karcher_against_float64(mk_out: Path, c_out: Path, inputs: list[Path]) -> tuple[float, float]:
    """(max |Cairn − reference|, max |mergekit − reference|) over every tensor, the reference being
    the Karcher iteration in float64: mergekit's float32 dot products of near unit vectors round
    cos θ, so its iteration can skip an input (θ rounded to 0) and step away from the mean."""
    from cairn.weights.tensor_files import FolderWeights

    fm, fc, fi = FolderWeights(mk_out), FolderWeights(c_out), [FolderWeights(f) for f in inputs]
    cairn_err = mk_err = 0.0
    for name in fm.keys():
        ref = karcher_reference([w.get(name) for w in fi])
        cairn_err = max(cairn_err, float(np.abs(fc.get(name).astype(np.float64).reshape(-1) - ref).max()))
        mk_err = max(mk_err, float(np.abs(fm.get(name).astype(np.float64).reshape(-1) - ref).max()))
    return cairn_err, mk_err


def write_config(path: Path, method: str, base: Path, inputs: list[Path]) -> None:
    mk_method, _, mk_params, mk_globals = CASES[method]
    weights = ["1.0", "0.5"]
    models = "".join(f"  - model: {f}\n    parameters: {{{mk_params.replace('WEIGHT', weights[i % 2])}}}\n" for i, f in enumerate(inputs))
    base_line = "" if mk_method == "linear" else f"base_model: {base}\n"  # linear's inputs are the models alone
    globals_line = f"parameters: {{{mk_globals}}}\n" if mk_globals else ""
    path.write_text(f"merge_method: {mk_method}\n{base_line}models:\n{models}{globals_line}dtype: float32\n")


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
        cairn_opts = CASES[method][1]
        config = args.work / f"mergekit-{method}.yml"
        inputs = fts[:1] if method in ONE_INPUT else fts[:2] if method in TWO_INPUTS else fts
        write_config(config, method, base, inputs)
        mk_out, c_out = args.work / f"out-mergekit-{method}", args.work / f"out-cairn-{method}"
        mk = measure([str(args.mergekit), str(config), str(mk_out), "--quiet"], env)
        given = ["--config", str(config)] if method in SAME_YAML else ["--method", method, "--base", str(base), "--inputs", *map(str, inputs), *cairn_opts]
        ca = measure([cairn, "merge", *given, "--out", str(c_out)], env)
        if method in SEEDED:
            print(f"{method:16s} mergekit {mk[0]:6.1f} s {mk[1]:5.2f} GB | cairn {ca[0]:5.1f} s {ca[1]:5.2f} GB | "
                  f"{mk[0] / ca[0]:5.1f}x faster ({mk[2] / ca[2]:.1f}x less CPU time), {ca[1] / mk[1]:.2f}x memory | seeded: statistics below", flush=True)
            continue
        worst, frac, unexplained = compare(mk_out, c_out, (base, fts, 0.5) if method == "ties" else None, (base, fts, 0.5) if method == "sce" else None)
        print(f"{method:16s} mergekit {mk[0]:6.1f} s {mk[1]:5.2f} GB | cairn {ca[0]:5.1f} s {ca[1]:5.2f} GB | "
              f"{mk[0] / ca[0]:5.1f}x faster ({mk[2] / ca[2]:.1f}x less CPU time), {ca[1] / mk[1]:.2f}x memory | max |diff| {worst:.2e}, {frac:.2e} of entries > 1e-6"
              + (f", {unexplained} not at a threshold tie" if method in ("ties", "sce") else ""), flush=True)
        if method == "karcher":
            cairn_err, mk_err = karcher_against_float64(mk_out, c_out, [*fts, base])
            print(f"{'':16s} against the same iteration in float64: cairn max |diff| {cairn_err:.2e}, mergekit {mk_err:.2e}", flush=True)
    if any(m in SEEDED for m in args.methods):  # della's statistics: one input, weight 1, so the output is the pruned, rescaled τ
        config = args.work / "mergekit-della-one.yml"
        write_config(config, "della_linear", base, fts[:1])
        mk_out, c_out = args.work / "out-mergekit-della-one", args.work / "out-cairn-della-one"
        measure([str(args.mergekit), str(config), str(mk_out), "--quiet"], env)
        measure([cairn, "merge", "--method", "della_linear", "--base", str(base), "--inputs", str(fts[0]), "--density", "0.5", "--out", str(c_out)], env)
        for tool, out in (("mergekit", mk_out), ("cairn", c_out)):
            kept, low, high, scale = della_statistics(base, fts[0], out)
            print(f"della (density 0.5, epsilon 0.15, 1 input) {tool:8s}: kept {kept:.4f} of τ's entries; smallest tenth of each row {low:.4f}, "
                  f"largest tenth {high:.4f} (p there 0.35-0.38 and 0.62-0.65); mean rescale {scale:.4f}", flush=True)
    print(f"\n{torch.get_num_threads()} threads; 4 fine-tunes of {base.name}, float32")


if __name__ == "__main__":
    main()
