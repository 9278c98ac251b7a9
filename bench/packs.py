"""Knowledge packs on the bundled model: test score before and after default LoRA training, and time.

Bars (issue 2): before <= 0.1, after >= 0.8, training <= 3 minutes per pack on 2 cores; and the
general probe's base score >= 0.7.

    .venv/bin/python bench/packs.py [--packs people compounds ...]
"""

from __future__ import annotations

import argparse
import time

from cairn.data import load_task
from cairn.data.packs import PACKS
from cairn.evaluation import evaluate_task
from cairn.options import DEFAULT_BASE
from cairn.models import load_model
from cairn.options import TrainConfig
from cairn.training import train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--packs", nargs="*", default=list(PACKS))
    parser.add_argument("--base", default=DEFAULT_BASE)
    args = parser.parse_args()

    model, tokenizer = load_model(args.base)
    start = time.perf_counter()
    probe = evaluate_task(model, tokenizer, load_task("probe:general"))
    print(f"probe:general base score {probe.score:.3f} (n={probe.n}, {time.perf_counter() - start:.1f}s)")
    rows = []
    for name in args.packs:
        task = load_task(f"pack:{name}")
        model, tokenizer = load_model(args.base)
        before = evaluate_task(model, tokenizer, task).score
        result = train(model, tokenizer, task.train, TrainConfig(), progress=False)
        after = evaluate_task(result.model, tokenizer, task).score
        rows.append((name, before, after, result.wall_s, result.tokens_per_s))
        print(f"{name}: before {before:.3f} after {after:.3f} train {result.wall_s:.0f}s ({result.tokens_per_s:.0f} tok/s)", flush=True)
    print("\npack        before  after  train_s  tok/s")
    for name, before, after, wall, tps in rows:
        print(f"{name:<11} {before:6.3f} {after:6.3f} {wall:8.0f} {tps:6.0f}")
    ok = probe.score >= 0.7 and all(b <= 0.1 and a >= 0.8 and w <= 180 for _, b, a, w, _ in rows)
    print(f"bars met: {ok}")


if __name__ == "__main__":
    main()
