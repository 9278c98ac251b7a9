"""The `cairn` command: parses arguments and calls the library. User errors print one line, no traceback.

Exit codes (the README's table): 0 success; 2 usage or general error; 3 bad data; 4 bad config
or option; 5 model cannot be loaded; 6 training diverged (`cairn run`: after writing the
report); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from cairn.errors import CairnError, ConfigError, DataError

# Characters that end a line for str.splitlines: escaped in error messages, which are one line.
_LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


def _one_line(message: str) -> str:
    return message.translate(_LINE_BREAKS)


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        super().error(_one_line(message))  # arguments are quoted raw in some of argparse's messages


class _MergeMethods:
    """`cairn merge --method` choices, read from the registry only when checked or shown: importing
    it imports torch, which the other commands (and `--help`) should not wait for."""

    def __iter__(self):
        from cairn.methods.merging import METHODS

        return iter(METHODS)

    def __contains__(self, name) -> bool:
        return name in list(self)


def _add_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="task source: FILE.jsonl|FILE.json|FOLDER|pack:NAME|probe:NAME")
    p.add_argument("--metric", choices=["exact", "choice", "rouge_l", "edit_sim", "sari"], help="override the task's metric")
    p.add_argument("--chat-template", action="store_true", help="wrap the prompts in the model's chat template (instruction-tuned models)")


def _add_overwrite(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace --out even when it is not an earlier `cairn {command}` output (an earlier one is replaced without it)")


def _parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="cairn", description="Add knowledge to an LLM contribution by contribution, and measure what it keeps.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a LoRA adapter or a full fine-tune on one task")
    p.add_argument("--base", default="bundled:smollm2-135m", help="base model spec (default: bundled:smollm2-135m)")
    _add_task_args(p)
    p.add_argument("--method", choices=["lora", "fft"], default="lora")
    p.add_argument("--out", required=True, type=Path, help="output folder (PEFT adapter or HF model)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--lora-r", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--no-eval", action="store_true", help="skip scoring the test split after training")
    _add_overwrite(p, "train")

    p = sub.add_parser("eval", help="score a model on a task split")
    p.add_argument("--model", required=True, help="model spec, HF folder or PEFT adapter folder")
    _add_task_args(p)
    p.add_argument("--split", default="test", choices=["train", "eval", "test"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", type=Path, help="write score and per-example predictions here")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickled (*.bin) weights from a source you trust")

    p = sub.add_parser("generate", help="greedy completion of a prompt")
    p.add_argument("--model", required=True)
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--allow-pickle", action="store_true")

    p = sub.add_parser("merge", help="merge fine-tunes and/or LoRA adapters of one base into one model")
    p.add_argument("--method", choices=_MergeMethods(), metavar="METHOD", help="one of: %(choices)s")
    p.add_argument("--base", help="base model spec (the model every input was fine-tuned from)")
    p.add_argument("--inputs", nargs="+", help="HF model folders, PEFT adapter folders, or IDs in --store")
    p.add_argument("--config", type=Path, help="a mergekit YAML config instead of --method/--base/--inputs/... (see README)")
    p.add_argument("--weights", nargs="+", type=float, help="one weight per input (default: 1 each)")
    p.add_argument("--density", type=float, help="fraction of each task vector kept (ties, dare_linear, dare_ties; default 1)")
    p.add_argument("--lambda", dest="lambda_", type=float, help="scale of the merged task vector (default 1)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, help="divide by the summed weights (default: the method's)")
    p.add_argument("--seed", type=int, help="seed of DARE's random drop (default 0)")
    p.add_argument("--out", required=True, type=Path, help="output folder (HF model, or PEFT adapter with --as-adapter)")
    p.add_argument("--as-adapter", action="store_true", help="write a PEFT LoRA adapter (truncated SVD of the merged delta)")
    p.add_argument("--rank", type=int, help="rank of the --as-adapter output")
    _add_overwrite(p, "merge")
    p.add_argument("--store", type=Path, default=Path(os.environ.get("CAIRN_STORE", "cairn-store")), help="store that input IDs refer to")

    p = sub.add_parser("mix", help="mix LoRA adapters (LoRA-MoE) or full fine-tunes (Mixtral) of one base into a mixture of experts")
    p.add_argument("--base", required=True, help="base model spec (the model every input was fine-tuned from)")
    p.add_argument("--inputs", required=True, nargs="+", help="PEFT adapter folders, or HF model folders (all of one kind), or IDs in --store")
    p.add_argument("--router", required=True, choices=["uniform", "arrow", "centroid", "trained", "random"])
    p.add_argument("--top-k", type=int, help="experts mixed per prompt (default 2; not for the uniform router, which mixes all)")
    p.add_argument("--temperature", type=float, help="softmax temperature of the router scores (default: centroid 0.005, arrow 0.1)")
    p.add_argument("--threshold", type=float, help="centroid: distance at which the base model ties an expert (default 2)")
    p.add_argument("--granularity", choices=["sequence", "token"], help="route once per prompt (default) or per token")
    p.add_argument("--tasks", nargs="+", help="trained router: one task source per input, the labelled data to train it on")
    p.add_argument("--shared", choices=["base", "average"], default="base", help="full fine-tunes: attention, norms and embeddings from the base or their average")
    p.add_argument("--out", required=True, type=Path, help="output folder (loads with cairn eval / cairn generate)")
    _add_overwrite(p, "mix")
    p.add_argument("--store", type=Path, default=Path(os.environ.get("CAIRN_STORE", "cairn-store")), help="store that input IDs refer to")

    p = sub.add_parser("run", help="run an experiment: strategies x seeds over a task stream, then report")
    p.add_argument("config", nargs="?", type=Path, help="experiment YAML (default: the built-in quickstart)")
    p.add_argument("--out", type=Path, help="run folder (default: the config's `out`, else runs/NAME)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run (refused if the run folder holds none); a plain rerun resumes too")
    p.add_argument("--overwrite", action="store_true", help="replace the results in --out of another config's run (its cache/ is kept), or a folder that is not a run's")

    p = sub.add_parser("sweep", help="run an experiment over a grid of strategy settings x seeds x task orders; mean and 95%% CI per grid point")
    p.add_argument("config", type=Path, help="experiment YAML; its `sweep:` section gives the defaults of the options below")
    p.add_argument("--set", action="append", default=[], metavar="strategies.NAME.KEY=V1,V2,...",
                   help="values of one strategy setting (an option, or train.FIELD); repeat for a grid")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (default: the sweep's, else the config's)")
    p.add_argument("--orders", type=int, help="task orders: the config's, then K-1 other seeded permutations (default 1)")
    p.add_argument("--out", type=Path, help="output folder (default: the config's out)")

    p = sub.add_parser("report", help="re-render the report of a run folder from its results.json")
    p.add_argument("dir", type=Path)

    p = sub.add_parser("store", help="a folder of contributions with verified manifests")
    p.add_argument("--store", type=Path, default=Path(os.environ.get("CAIRN_STORE", "cairn-store")),
                   help="store folder (default: $CAIRN_STORE, else ./cairn-store)")
    ssub = p.add_subparsers(dest="store_command", required=True)
    q = ssub.add_parser("add", help="copy a contribution (adapter or model folder with cairn.json) into the store")
    q.add_argument("path", type=Path)
    q.add_argument("--name", help="its ID in the store (default: TASK-METHOD-HASH)")
    ssub.add_parser("list", help="the contributions in the store")
    q = ssub.add_parser("show", help="a contribution's manifest")
    q.add_argument("id")
    q = ssub.add_parser("verify", help="recompute every file hash; exit 3 on any mismatch")
    q.add_argument("id", nargs="?")

    p = sub.add_parser("data", help="inspect task sources")
    dsub = p.add_subparsers(dest="data_command", required=True)
    dsub.add_parser("packs", help="list the built-in knowledge packs")
    p = dsub.add_parser("inspect", help="sizes, splits, metric and a few examples of a task source")
    p.add_argument("source")
    p.add_argument("--metric", choices=["exact", "choice", "rouge_l", "edit_sim", "sari"])
    p.add_argument("-n", type=int, default=3, help="examples to show per split")
    return parser


def _cmd_train(args) -> None:
    from cairn.api import train
    from cairn.distributed import is_main

    overrides = {"method": args.method, "epochs": args.epochs, "lr": args.lr, "lora_r": args.lora_r, "batch_size": args.batch_size, "seed": args.seed}
    manifest = train(args.task, args.out, base=args.base, metric=args.metric, chat_template=args.chat_template, overwrite=args.overwrite,
                     **{k: v for k, v in overrides.items() if v is not None})  # fmt: skip
    if not is_main():  # under `accelerate launch`: the main process reports and evaluates
        return
    t = manifest["train"]
    print(f"trained {manifest['method']} on {manifest['task']}: {t['steps']} steps, final loss {t['losses'][-1]:.4f}, "
          f"{t['tokens']} tokens in {t['wall_s']:.1f}s ({t['tokens_per_s']:.0f} tokens/s) -> {args.out}")
    if not args.no_eval:
        from cairn.api import evaluate
        from cairn.data import load_task

        task = load_task(args.task, metric=args.metric)
        if task.test:
            result = evaluate(str(args.out), task, chat_template=args.chat_template, progress=True)
            print(f"{task.name} test {task.metric}: {result.score:.4f} (n={result.n})")


def _at_least(minimum: int, **values) -> None:
    """Refuse a numeric option below `minimum` (given as `option_name=value`)."""
    for name, value in values.items():
        if value is not None and value < minimum:
            flag = f"-{name}" if len(name) == 1 else f"--{name.replace('_', '-')}"
            raise ConfigError(f"{flag} must be at least {minimum}, got {value}")


def _cmd_eval(args) -> None:
    from cairn.data import load_task
    from cairn.evaluation import evaluate_task
    from cairn.models import load_model
    from cairn.io import atomic_write_json

    _at_least(1, batch_size=args.batch_size)
    if args.json is not None and args.json.is_dir():
        raise ConfigError(f"--json {args.json} is a folder; give the path of a file to write")
    task = load_task(args.task, metric=args.metric)
    probe = args.task.startswith("lm-eval:")  # lm-eval holds its own data
    if not probe and not task.split(args.split):
        raise DataError(f"task {task.name} has no {args.split!r} examples")
    model, tokenizer = load_model(args.model, allow_pickle=args.allow_pickle)
    if args.chat_template and not probe:
        from cairn.data.chat import as_chat

        task = as_chat(task, tokenizer)
    result = evaluate_task(model, tokenizer, task, split=args.split, batch_size=args.batch_size, progress=True)
    print(f"{task.name} {result.split} {task.metric}: {result.score:.4f} (n={result.n})")
    for row in result.predictions if probe else []:
        print(f"  {row['task']}: {row['metric']} {row['score']:.4f}")
    if args.json:
        try:
            atomic_write_json(args.json, result.to_dict())
        except OSError as exc:
            raise CairnError(f"--json {args.json}: cannot write ({exc.strerror or exc})") from exc


def _cmd_generate(args) -> None:
    from cairn.evaluation import generate
    from cairn.models import load_model

    _at_least(1, max_new_tokens=args.max_new_tokens)
    model, tokenizer = load_model(args.model, allow_pickle=args.allow_pickle)
    print(generate(model, tokenizer, [args.prompt], max_new_tokens=args.max_new_tokens)[0])


def _cmd_merge(args) -> None:
    from cairn.api import merge, merge_mergekit

    if args.as_adapter != (args.rank is not None):
        raise ConfigError("--as-adapter and --rank go together: --as-adapter --rank R")
    _at_least(1, rank=args.rank)
    given = {"density": args.density, "lambda": args.lambda_, "seed": args.seed, "normalize": args.normalize}
    common = {"adapter_rank": args.rank, "store": args.store, "overwrite": args.overwrite}
    if args.config:
        clash = [f"--{k}" for k in ("method", "base", "inputs", "weights") if getattr(args, k) is not None]
        clash += [f"--{k}" for k, v in given.items() if v is not None]
        if clash:
            raise ConfigError(f"--config gives the whole merge; drop {', '.join(clash)} (or drop --config)")
        stats = merge_mergekit(args.config, args.out, **common)
    else:
        missing = [f"--{k}" for k in ("method", "base", "inputs") if not getattr(args, k)]
        if missing:
            raise ConfigError(f"cairn merge needs {', '.join(missing)} (or a mergekit YAML through --config)")
        stats = merge(args.inputs, args.out, base=args.base, method=args.method, weights=args.weights, **common,
                      **{k: v for k, v in given.items() if v is not None})  # fmt: skip
    _report_merge(stats, len(stats.get("inputs", [])), args.out)


def _report_merge(stats: dict, n: int, out: Path) -> None:
    line = f"merged {n} models ({stats['method']}) in {stats['wall_s']:.1f}s -> {out}"
    if "svd" in stats:
        svd = stats["svd"]
        line += f" (rank-{svd['rank']} adapter on {svd['modules']} modules, relative error {svd['relative_error']:.4f})"
    print(line)


def _cmd_mix(args) -> None:
    from cairn.api import mix

    _at_least(1, top_k=args.top_k)
    given = {"top_k": args.top_k, "temperature": args.temperature, "threshold": args.threshold, "granularity": args.granularity}
    out = mix(args.inputs, args.out, base=args.base, router=args.router, tasks=args.tasks, shared=args.shared, store=args.store,
              overwrite=args.overwrite, **{k: v for k, v in given.items() if v is not None})  # fmt: skip
    lora = (out / "moe.json").is_file()
    what = "adapters into a LoRA-MoE" if lora else "full fine-tunes into a Mixtral model"
    print(f"mixed {len(args.inputs)} {what} (router {args.router}) -> {out}")


def _cmd_run(args) -> None:
    from tqdm.auto import tqdm

    from cairn.api import run
    from cairn.config import load_config, quickstart

    cfg = load_config(args.config) if args.config else quickstart()
    out = args.out or cfg.out_dir()
    if args.resume and not (out / "cache").is_dir():
        raise CairnError(f"--resume: {out} holds no interrupted run (no cache/); drop --resume to start one")
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues the run in the folder, --overwrite replaces it: give one of them")
    results = run(cfg, out, overwrite=args.overwrite, log=tqdm.write)
    if results is None:  # a process other than the main one under `accelerate launch`
        return
    _print_summary(results)
    print(f"report: {out / 'report.html'}")
    diverged = [name for name, s in results["strategies"].items() if s.get("diverged")]
    if diverged:
        from cairn.errors import TrainingDiverged

        raise TrainingDiverged(f"training diverged in {', '.join(diverged)} (see {out / 'summary.md'}); the other strategies' results are complete")


def _cmd_sweep(args) -> None:
    from tqdm.auto import tqdm

    from cairn.api import sweep
    from cairn.config import load_config
    from cairn.sweep import parse_set

    cfg = load_config(args.config)
    seeds = None
    if args.seeds is not None:
        try:
            seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            raise ConfigError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
    out = args.out or cfg.out_dir()  # run_sweep checks every grid point and order before anything trains
    summary = sweep(cfg, out, grid=dict(parse_set(text) for text in args.set), seeds=seeds, orders=args.orders, log=tqdm.write)
    if summary is None:  # a process other than the main one under `accelerate launch`
        return
    _print_sweep(summary)
    print(f"sweep: {out / 'sweep.md'}")


def _print_sweep(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from cairn.report import HEADLINE
    from cairn.sweep import format_stat

    runs = len(summary["seeds"]) * len(summary["orders"])
    table = Table(title=f"{summary['name']} sweep: at the last stage, mean ± 95% CI over {runs} run(s)")
    table.add_column("variant", no_wrap=True)  # the names tell the grid points apart: never cut them
    for header in ("runs", *HEADLINE):
        table.add_column(header)
    for row in summary["rows"]:
        table.add_row(row["variant"], str(row["runs"]), *[format_stat(row["final"][k]) for k in HEADLINE])
    Console().print(table)


def _cmd_report(args) -> None:
    from cairn.report import load_results, write_report

    results = load_results(args.dir)
    write_report(results, args.dir)
    _print_summary(results)
    print(f"report: {args.dir / 'report.html'}")


def _print_summary(results: dict) -> None:
    """The summary as terminal tables: metrics averaged and at the last stage, then cost."""
    from rich.console import Console
    from rich.table import Table

    from cairn.report import HEADLINE, SUMMARY_HEADER, summary_rows

    console = Console()
    n_metrics = len(HEADLINE)
    for part, title in (("summary", "averaged over stages"), ("final", "at the last stage")):
        table = Table(*SUMMARY_HEADER[: n_metrics + 1], title=f"{results['config']['name']}: {title}")
        for row in summary_rows(results, part):
            table.add_row(*row[: n_metrics + 1])
        console.print(table)
    table = Table(SUMMARY_HEADER[0], *SUMMARY_HEADER[n_metrics + 1 :], title="cost")
    for row in summary_rows(results, "summary"):
        table.add_row(row[0], *row[n_metrics + 1 :])
    console.print(table)


def _cmd_store(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from cairn.errors import DataError
    from cairn.store import Store

    store = Store(args.store)
    if args.store_command == "add":
        entry = store.add(args.path, args.name)
        print(f"added {entry['id']} ({entry['task']}, {entry['method']}) to {args.store}")
    elif args.store_command == "list":
        table = Table("id", "task", "method", "kind", "base", "base fingerprint", title=str(args.store))
        for e in store.list():
            table.add_row(e["id"], e["task"], e["method"], str(e["kind"]), str(e["base"]), e["base_fingerprint"][:12])
        Console().print(table)
    elif args.store_command == "show":
        print(json.dumps(store.show(args.id), indent=2))
    else:
        report = store.verify(args.id)
        bad = {cid: problems for cid, problems in report.items() if problems}
        for cid in report:
            print(f"{cid}: " + ("; ".join(bad[cid]) if cid in bad else "ok"))
        if bad:
            raise DataError(f"{len(bad)} of {len(report)} contribution(s) failed verification")


def _cmd_data(args) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if args.data_command == "packs":
        from cairn.data.packs import list_packs

        table = Table("pack", "description", title="built-in knowledge packs (use as pack:NAME)")
        for name, description in list_packs():
            table.add_row(name, description)
        console.print(table)
        return
    from cairn.data import SPLITS, load_task

    _at_least(0, n=args.n)
    task = load_task(args.source, metric=args.metric)
    console.print(f"[bold]{task.name}[/bold]  metric: {task.metric}  data hash: {task.data_hash()[:12]}")
    table = Table("split", "examples", "mean prompt chars", "mean answer chars")
    for split in SPLITS:
        xs = task.split(split)
        mean = lambda f: f"{sum(len(f(x)) for x in xs) / len(xs):.0f}" if xs else "-"  # noqa: E731
        table.add_row(split, str(len(xs)), mean(lambda x: x.prompt), mean(lambda x: x.answer))
    console.print(table)
    for split in SPLITS:
        for ex in task.split(split)[: args.n]:
            console.print(f"[dim]{split}[/dim] {json.dumps({'prompt': ex.prompt, 'answer': ex.answer}, ensure_ascii=False)[:300]}")


COMMANDS = {
    "train": _cmd_train,
    "eval": _cmd_eval,
    "generate": _cmd_generate,
    "merge": _cmd_merge,
    "mix": _cmd_mix,
    "run": _cmd_run,
    "sweep": _cmd_sweep,
    "report": _cmd_report,
    "store": _cmd_store,
    "data": _cmd_data,
}


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage and the problem (2), or the help (0)
        return exc.code if isinstance(exc.code, int) else 2
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    _log_to_stderr(args.command)
    try:
        COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, where it can be handled
    except CairnError as exc:
        print(f"cairn {args.command}: error: {_one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # the reader went away (`cairn store list | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail again
        return 0
    except KeyboardInterrupt:
        print("cairn: interrupted", file=sys.stderr)
        return 130
    return 0


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever `sys.stderr` is when a record comes (tests redirect it)."""

    stream = property(lambda self: sys.stderr, lambda self, value: None)


def _log_to_stderr(command: str) -> None:
    """The library's notes (`logging.getLogger("cairn")`: what was replaced, what was cleaned up,
    what could not be verified) as one line each on stderr, named after the command."""
    logger = logging.getLogger("cairn")
    handler = next((h for h in logger.handlers if isinstance(h, _Stderr)), None)
    if handler is None:
        handler = _Stderr()
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    handler.setFormatter(logging.Formatter(f"cairn {command}: %(message)s"))


if __name__ == "__main__":
    sys.exit(main())
