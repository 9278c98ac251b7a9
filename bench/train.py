"""Training throughput: Cairn's loop against TRL's SFTTrainer, and both against the machine's ceiling.

Same model (the bundled one), data (a knowledge pack), LoRA config (r 16, alpha 32, every linear
layer), batch size, epochs, learning rate and precision (bf16 autocast where the CPU has it), one
run after the other, each in a fresh process that this script starts: no run inherits another's
allocator state or warm caches, and TRL runs with the C library's defaults, as its users get them.
Throughput is non-padding tokens per second of wall time around each tool's whole training call
(TRL: building the trainer, which tokenises, and training).

The ceiling is the rate of a large matrix multiply; a run's share of it counts 4·N FLOPs per token
for LoRA and 6·N for FFT (N: non-embedding parameters), plus the output projection for the tokens
where logits are computed (Cairn: answer tokens; TRL: every token).

The floor is what Cairn's run would reach if its steps did nothing but their matrix multiplies (and,
for FFT, the optimizer step): the same run once more under torch's profiler, timing those ops where
they ran (same shapes, layouts and cache state). The rest of a step (elementwise ops, casts, op
dispatch, autograd) is the overhead that stands between the two.

Bars (issue 7): LoRA >= 3x TRL's tokens/s and >= 40% of the bf16 ceiling; FFT >= 2x TRL's.

    .venv/bin/python bench/train.py [--pack people] [--epochs 3] [--only lora|fft]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from cairn.data import load_task
from cairn.data.batching import IGNORE, continuation, encode
from cairn.options import DEFAULT_BASE
from cairn.models import load_model
from cairn.options import DEFAULT_LR, TrainConfig
from cairn.speedups import bf16_supported
from cairn.training import lora_config, train


def matmul_rate(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """FLOP/s of an n x n matrix multiply in `dtype`, the best this machine does."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    return 2 * n**3 * runs / (time.perf_counter() - start)


def sizes(model) -> tuple[int, int]:
    """(non-embedding parameters, parameters of the output projection)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    output = model.get_output_embeddings().weight
    body = sum(p.numel() for p in model.parameters() if id(p) not in embeddings and p is not output)
    return body, output.numel()


def cairn_run(base, task, cfg: TrainConfig) -> dict:
    model, tokenizer = load_model(base)
    features = [encode(ex, tokenizer, cfg.max_length) for ex in task.train]
    start = time.perf_counter()
    result = train(model, tokenizer, task.train, cfg, progress=False)
    wall = time.perf_counter() - start
    answer = sum(sum(label != IGNORE for label in f["labels"][1:]) for f in features) * cfg.epochs
    return {"tokens": result.tokens, "logit_tokens": answer, "wall_s": wall, "loss": sum(result.losses) / len(result.losses)}


def trl_run(base, task, cfg: TrainConfig, bf16: bool, checkpointing: bool) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = load_model(base)
    rows = [{"prompt": ex.prompt, "completion": continuation(ex)} for ex in task.train]
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            per_device_train_batch_size=cfg.batch_size,
            num_train_epochs=cfg.epochs,
            learning_rate=cfg.learning_rate,
            lr_scheduler_type=cfg.scheduler,
            warmup_steps=cfg.warmup_ratio,  # transformers 5: a float below 1 is a ratio
            max_grad_norm=cfg.max_grad_norm,
            max_length=cfg.max_length,
            bf16=bf16,
            gradient_checkpointing=checkpointing,
            use_cpu=not torch.cuda.is_available(),
            save_strategy="no",
            report_to="none",
            logging_steps=10**6,
            disable_tqdm=True,
            seed=cfg.seed,
        )
        start = time.perf_counter()
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=lora_config(cfg) if cfg.method == "lora" else None,
        )
        output = trainer.train()
        wall = time.perf_counter() - start
        data = trainer.train_dataset
    tokens = sum(len(ids) for ids in data["input_ids"]) * cfg.epochs
    return {"tokens": tokens, "logit_tokens": tokens, "wall_s": wall, "loss": output.training_loss}


MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def cairn_floor(base, task, cfg: TrainConfig) -> dict:
    """`cairn_run` under the profiler: seconds its matrix multiplies and its optimizer steps took."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run = cairn_run(base, task, cfg)
    ops = prof.key_averages()
    seconds = lambda names: sum(op.self_cpu_time_total for op in ops if op.key in names) / 1e6  # noqa: E731
    return {"tokens": run["tokens"], "matmul_s": seconds(MATMULS), "optimizer_s": seconds({"aten::_fused_adamw_"})}


RUNS = {  # the tools compared
    "cairn": lambda base, task, cfg, bf16: cairn_run(base, task, cfg),
    "trl": lambda base, task, cfg, bf16: trl_run(base, task, cfg, bf16, checkpointing=True),
    "trl (no grad. checkpointing)": lambda base, task, cfg, bf16: trl_run(base, task, cfg, bf16, checkpointing=False),
}
CHILD_RUNS = {**RUNS, "cairn-floor": lambda base, task, cfg, bf16: cairn_floor(base, task, cfg)}


def config(method: str, epochs: int) -> TrainConfig:
    return TrainConfig(method=method, epochs=epochs, batch_size=16, lora_r=16, lr=DEFAULT_LR[method] if method == "lora" else 1e-4)


def one_run(tool: str, method: str, args) -> dict:
    """One tool's training run in a child process of this script; its figures come back as JSON."""
    command = [sys.executable, __file__, "--pack", args.pack, "--epochs", str(args.epochs), "--base", args.base, "--run", tool, method]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{tool} {method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pack", default="people")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--base", default=DEFAULT_BASE)
    parser.add_argument("--only", choices=["lora", "fft"])
    parser.add_argument("--run", nargs=2, metavar=("TOOL", "METHOD"), help=argparse.SUPPRESS)  # a child's one run
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    bf16 = bf16_supported()
    if args.run:
        tool, method = args.run
        print(json.dumps(CHILD_RUNS[tool](args.base, load_task(f"pack:{args.pack}"), config(method, args.epochs), bf16)))
        return

    ceiling = {"bf16": matmul_rate(torch.bfloat16), "fp32": matmul_rate(torch.float32)}
    print(f"matmul ceiling: bf16 {ceiling['bf16'] / 1e9:.0f} GFLOP/s, fp32 {ceiling['fp32'] / 1e9:.0f} GFLOP/s", flush=True)
    body, output = sizes(load_model(args.base)[0])
    print(f"non-embedding parameters {body / 1e6:.1f} M, output projection {output / 1e6:.1f} M; bf16 {bf16}", flush=True)

    rows, floors = [], {}
    for method in [args.only] if args.only else ["lora", "fft"]:
        per_token = 4 if method == "lora" else 6
        f = one_run("cairn-floor", method, args)
        floors[method] = f["tokens"] / (f["matmul_s"] + (f["optimizer_s"] if method == "fft" else 0.0))
        print(f"{method} floor: {f['matmul_s']:.1f}s of matrix multiplies, {f['optimizer_s']:.1f}s of optimizer steps for {f['tokens']} tokens", flush=True)
        for tool in RUNS:
            r = one_run(tool, method, args)
            tps = r["tokens"] / r["wall_s"]
            flops = per_token * (body * r["tokens"] + output * r["logit_tokens"])
            share = flops / r["wall_s"] / ceiling["bf16" if bf16 else "fp32"]
            rows.append((method, tool, r["tokens"], r["wall_s"], tps, share, r["loss"]))
            print(f"{method} {tool}: {r['tokens']} tokens in {r['wall_s']:.1f}s = {tps:.0f} tokens/s, {share:.1%} of the ceiling, mean training loss {r['loss']:.3f}", flush=True)

    print(f"\n{'method':<6} {'tool':<29} {'tokens':>7} {'wall_s':>7} {'tok/s':>6} {'ceiling':>8} {'vs TRL':>7}")
    for method, tool, tokens, wall, tps, share, _ in rows:
        trl = next(r[4] for r in rows if r[0] == method and r[1] == "trl")
        print(f"{method:<6} {tool:<29} {tokens:>7} {wall:>7.1f} {tps:>6.0f} {share:>8.1%} {tps / trl:>6.2f}x")
    for method, floor in floors.items():
        trl = next(r[4] for r in rows if r[0] == method and r[1] == "trl")
        cairn = next(r[4] for r in rows if r[0] == method and r[1] == "cairn")
        what = "matrix multiplies and optimizer steps" if method == "fft" else "matrix multiplies"
        print(
            f"{method} floor: steps of nothing but their {what} would train {floor:.0f} tokens/s = {floor / trl:.2f}x TRL; "
            f"Cairn reaches {cairn / floor:.0%} of it"
        )


if __name__ == "__main__":
    main()
