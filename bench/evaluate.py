"""Evaluation throughput: Cairn's batched greedy generation against a loop calling `model.generate`
once per example, on the test prompts of the 4 knowledge packs at their default 50 facts and the
whole general probe (the quickstart's evaluation before it was sized to 3 packs of 10 facts), with
the bundled model. Both must give the same text for every prompt.

Bar (issue 7): batched >= 5x the per-example loop.

    .venv/bin/python bench/evaluate.py [--limit N]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GenerationConfig

from cairn.data import load_task
from cairn.data.packs import PACKS
from cairn.evaluation.evaluate import max_new_tokens_for, single_line
from cairn.evaluation.generation import generate
from cairn.options import DEFAULT_BASE
from cairn.models import load_model


def one_by_one(model, tokenizer, prompts: list[str], max_new_tokens: int, stop_at_newline: bool) -> list[str]:
    """What a user writes first: `model.generate` on each prompt alone, greedy."""
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        stop_strings=["\n"] if stop_at_newline else None,
    )
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")
            tokens = model.generate(**ids, generation_config=config, tokenizer=tokenizer)
            text = tokenizer.decode(tokens[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
            out.append(text.split("\n", 1)[0].strip() if stop_at_newline else text.strip())
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default=DEFAULT_BASE)
    parser.add_argument("--limit", type=int, help="prompts per task (default: all)")
    args = parser.parse_args()

    model, tokenizer = load_model(args.base)
    model.eval()
    tasks = [load_task(f"pack:{name}") for name in PACKS] + [load_task("probe:general")]
    rows = []
    for task in tasks:
        prompts = [ex.prompt for ex in task.split("test")][: args.limit]
        length, newline = max_new_tokens_for(task, tokenizer), single_line(task)
        start = time.perf_counter()
        batched = generate(model, tokenizer, prompts, max_new_tokens=length, stop_at_newline=newline)
        fast = time.perf_counter() - start
        start = time.perf_counter()
        looped = one_by_one(model, tokenizer, prompts, length, newline)
        slow = time.perf_counter() - start
        same = sum(a == b for a, b in zip(batched, looped))
        rows.append((task.name, len(prompts), slow, fast, same))
        print(f"{task.name}: {len(prompts)} prompts, loop {slow:.1f}s, batched {fast:.1f}s ({slow / fast:.1f}x), same text {same}/{len(prompts)}", flush=True)

    print(f"\n{'task':<16} {'prompts':>7} {'loop_s':>7} {'batched_s':>9} {'speed-up':>8} {'same':>9}")
    for name, n, slow, fast, same in rows:
        print(f"{name:<16} {n:>7} {slow:>7.1f} {fast:>9.1f} {slow / fast:>7.1f}x {same:>4}/{n:<4}")
    n, slow, fast, same = (sum(r[i] for r in rows) for i in (1, 2, 3, 4))
    print(f"{'all':<16} {n:>7} {slow:>7.1f} {fast:>9.1f} {slow / fast:>7.1f}x {same:>4}/{n:<4}")


if __name__ == "__main__":
    main()
