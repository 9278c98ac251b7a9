"""Inference cost of a LoRA-MoE against the single merged model, on the evaluation workload: the
test prompts of the 4 knowledge packs and the general probe, greedy, batched as `cairn run`
evaluates. Prints tokens/s (prompt + generated tokens) of each and their ratio.

    .venv/bin/python bench/moe.py [--router centroid] [--top-k 2]

The 4 LoRA contributions (1 epoch each on the bundled model) are cached in bench/work/moe; the
first run trains them (about 2 minutes).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from cairn.data import load_task
from cairn.evaluation.evaluate import max_new_tokens_for, single_line
from cairn.evaluation.generation import generate
from cairn.methods.merge.streaming import merge_models
from cairn.options import MergeOptions
from cairn.options import MoeOptions
from cairn.methods.moe.lora_moe import attach_experts
from cairn.options import DEFAULT_BASE
from cairn.models import load_model, resolve_folder
from cairn.manifest import read_manifest
from cairn.options import TrainConfig
from cairn.contributions import train_contribution

ROOT = Path(__file__).resolve().parents[1]
PACKS = ["people", "compounds", "companies", "countries"]


def workload(model, tokenizer, tasks) -> tuple[float, int]:
    """(seconds, prompt + generated tokens) to evaluate `tasks` on `model`."""
    start, tokens = time.perf_counter(), 0
    for task in tasks:
        prompts = [ex.prompt for ex in task.split("test")]
        outs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens_for(task, tokenizer), stop_at_newline=single_line(task))
        tokens += sum(len(tokenizer(p)["input_ids"]) + len(tokenizer(o, add_special_tokens=False)["input_ids"]) for p, o in zip(prompts, outs))
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--router", default="centroid", choices=["uniform", "arrow", "centroid"])
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "moe")
    args = parser.parse_args()
    tasks = [load_task(f"pack:{p}") for p in PACKS]
    experts = []
    for task in tasks:
        folder = args.work / f"lora-{task.name}"
        if read_manifest(folder) is None:
            train_contribution(DEFAULT_BASE, task, TrainConfig(epochs=1), folder, progress=False)
        experts.append(folder)
    merged_dir = args.work / "merged-ties"
    if read_manifest(merged_dir) is None:
        merge_models(resolve_folder(DEFAULT_BASE), experts, merged_dir, MergeOptions(method="ties", density=0.5), progress=False, made_from={"base": DEFAULT_BASE, "base_fingerprint": "bench"})
    workloads = [*tasks, load_task("probe:general")]

    base, tokenizer = load_model(DEFAULT_BASE)
    merged, _ = load_model(str(merged_dir))
    options = MoeOptions(router=args.router, **({} if args.router == "uniform" else {"top_k": args.top_k}))  # uniform mixes every expert
    moe = attach_experts(base, experts, options).eval()
    rows = {}
    for name, model in (("merged model", merged), (f"LoRA-MoE ({args.router}" + ("" if args.router == "uniform" else f", top-{args.top_k}") + ")", moe)):
        seconds, tokens = workload(model, tokenizer, workloads)
        rows[name] = tokens / seconds
        print(f"{name:28s} {seconds:6.1f} s  {tokens} tokens  {tokens / seconds:7.1f} tokens/s", flush=True)
    (m, r) = rows.values()
    print(f"\nLoRA-MoE / merged tokens/s: {r / m:.2f} ({len(experts)} experts of rank 16 on every linear layer; {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
