"""The likelihood probe's cost: Cairn's `candidate_logprobs` (each prompt read once, its candidates
from the KV cache, the probe's shared few-shot prefix read once) against one forward pass per
(prompt, candidate) over prompt + answer, on the general probe's test split with the 3 seeded
alternatives `likelihood_scores` draws, on the bundled model. Both must give the same scores.

It runs at every stage of every strategy, so its cost is multiplied by the quickstart's 25 stage
models: at one pass per candidate it was half of `make demo`'s wall time.

    .venv/bin/python bench/likelihood.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from cairn.data import load_task
from cairn.data.batching import IGNORE, collate, encode, pad_id
from cairn.data.task import Example
from cairn.evaluation.likelihood import candidate_logprobs
from cairn.models import load_model
from cairn.options import DEFAULT_BASE


@torch.inference_mode()
def one_pass_each(model, tokenizer, pairs: list[Example], batch_size: int = 16) -> list[float]:
    """The plain reading: prompt + answer in one forward pass per pair, right-padded batches."""
    out = []
    for start in range(0, len(pairs), batch_size):
        batch = collate([encode(ex, tokenizer) for ex in pairs[start : start + batch_size]], pad_id(tokenizer))
        logp = torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float(), -1)
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE
        picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        out += (picked.sum(-1) / mask.sum(-1)).tolist()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; the best is reported")
    args = parser.parse_args()
    model, tokenizer = load_model(DEFAULT_BASE)
    examples = load_task("probe:general").split("test")
    answers = sorted({ex.answer for ex in examples})
    rng = random.Random(0)
    candidates = [[ex.answer, *rng.sample([a for a in answers if a != ex.answer], 3)] for ex in examples]
    prompts = [ex.prompt for ex in examples]
    pairs = [Example(p, a) for p, cands in zip(prompts, candidates) for a in cands]

    def best(fn):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - start)
        return min(times), result

    t_plain, plain = best(lambda: one_pass_each(model, tokenizer, pairs))
    t_cached, cached = best(lambda: [s for row in candidate_logprobs(model, tokenizer, prompts, candidates) for s in row])
    diff = max(abs(a - b) for a, b in zip(plain, cached))
    print(f"{len(prompts)} prompts x 4 candidates ({len(pairs)} pairs), best of {args.repeats}")
    print(f"one pass per (prompt, candidate): {t_plain:.2f} s")
    print(f"candidate_logprobs (KV cache):    {t_cached:.2f} s  -> {t_plain / t_cached:.1f}x, max |logprob diff| {diff:.2e}")


if __name__ == "__main__":
    main()
