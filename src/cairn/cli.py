"""The `cairn` command: parses arguments, calls one `cairn.api` function per command (which makes
every check) and prints what it returns. User errors print one line, no traceback.

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
import typing
from pathlib import Path

from cairn import api, progress
from cairn.data.task import METRICS, SPLITS
from cairn.distributed import is_main
from cairn.errors import CairnError, ConfigError, TrainingDiverged
from cairn.options import DEFAULT_BASE, MERGE_METHODS, MIXTRAL_SHARED, ROUTERS, TEMPERATURE, TRAIN_METHODS, TrainConfig
from cairn.store import default_store

# Characters that end a line for str.splitlines: escaped in error messages, which are one line.
_LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


def _one_line(message: str) -> str:
    return message.translate(_LINE_BREAKS)


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        super().error(_one_line(message))  # arguments are quoted raw in some of argparse's messages


def _command(sub, name: str, handler, help: str, usage: str | None = None) -> argparse.ArgumentParser:
    """The subcommand `name`, whose arguments `handler(args)` runs."""
    p = sub.add_parser(name, help=help, description=help, usage=usage)
    p.set_defaults(handler=handler)
    return p


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model spec (bundled:NAME, tiny-random, a hub id), HF folder, PEFT adapter folder or `cairn mix` folder")
    p.add_argument("--base", help="the base an adapter or mixture is loaded on (default: the one its cairn.json, moe.json or adapter_config.json names)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickled (*.bin) weights from a source you trust")


def _add_chat_template(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chat-template", action="store_true", help="wrap the prompts in the model's chat template (instruction-tuned models)")


def _add_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="task source: FILE.jsonl|FILE.json|FOLDER|pack:NAME|probe:NAME|lm-eval:TASKS")
    p.add_argument("--metric", choices=METRICS, help="score with this metric instead of the task's (default: the task's)")
    _add_chat_template(p)


# `cairn train`'s flag for each TrainConfig field (its help is the field's description): the argparse
# type, or the choices. tests/test_cli.py checks that every field has one.
_TRAIN_FLAGS = {
    "method": TRAIN_METHODS, "epochs": int, "lr": float, "batch_size": int, "grad_accum": int, "warmup_ratio": float,
    "scheduler": typing.get_args(TrainConfig.model_fields["scheduler"].annotation), "weight_decay": float, "max_grad_norm": float, "lora_r": int, "lora_alpha": float,
    "lora_dropout": float, "target_modules": list, "max_length": int, "seed": int, "bf16": ("auto", "true", "false"),
}  # fmt: skip


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    for name, kind in _TRAIN_FLAGS.items():
        field = TrainConfig.model_fields[name]
        shown = (field.json_schema_extra or {}).get("shown_default", field.default)
        help = f"{field.description} (default: {shown})"
        flag = "--" + name.replace("_", "-")
        if isinstance(kind, tuple):
            p.add_argument(flag, choices=kind, help=help)
        elif kind is list:
            p.add_argument(flag, nargs="+", metavar="MODULE", help=help)
        else:
            p.add_argument(flag, type=kind, metavar=name.upper(), help=help)


def _train_options(args) -> dict:
    """The TrainConfig fields given on the command line (bf16's words made booleans)."""
    given = {name: getattr(args, name) for name in _TRAIN_FLAGS if getattr(args, name) is not None}
    if given.get("bf16") in ("true", "false"):
        given["bf16"] = given["bf16"] == "true"
    if given.get("target_modules") == ["all-linear"]:
        given["target_modules"] = "all-linear"
    return given


def _add_output(p: argparse.ArgumentParser, command: str, help: str) -> None:
    p.add_argument("--out", required=True, type=Path, help=help)
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace --out even when it is not an earlier `cairn {command}` output (an earlier one is replaced without it)")


def _add_store(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--store", type=Path, default=default_store(), help=f"{help} (default: $CAIRN_STORE, else ./cairn-store)")


def _add_inputs(p: argparse.ArgumentParser, required: bool, help: str) -> None:
    p.add_argument("--base", required=required, help="base model spec (the model every input was fine-tuned from)" + ("" if required else "; required without --config"))
    p.add_argument("--inputs", required=required, nargs="+", help=help)
    _add_store(p, "store that input IDs refer to")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cairn-llm")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="cairn", description="Add knowledge to an LLM contribution by contribution, and measure what it keeps.")
    parser.add_argument("--version", action="version", version=f"cairn {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = _command(sub, "train", _cmd_train, "train a LoRA adapter or a full fine-tune on one task")
    p.add_argument("--base", default=DEFAULT_BASE, help=f"base model spec (default: {DEFAULT_BASE})")
    _add_task_args(p)
    _add_output(p, "train", "output folder (PEFT adapter or HF model)")
    _add_train_flags(p)
    p.add_argument("--no-eval", action="store_true", help="skip scoring the test split after training")

    p = _command(sub, "eval", _cmd_eval, "score a model on a task split")
    _add_model(p)
    _add_task_args(p)
    p.add_argument("--split", default="test", choices=SPLITS, help="the split to score (default: test)")
    p.add_argument("--limit", type=int, metavar="N", help="score a seeded sample of N examples of the split (default: all)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts generated at once (default: 32)")
    p.add_argument("--json", type=Path, help="write score and per-example predictions here")

    p = _command(sub, "generate", _cmd_generate, "greedy completion of a prompt")
    _add_model(p)
    p.add_argument("prompt", help="the text to complete")
    _add_chat_template(p)
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated at most (default: 64)")

    # One of two forms, which argparse's groups cannot say without refusing a mix of them itself;
    # api.merge refuses it, with the message the Python API gives.
    usage = "cairn merge (--method METHOD --base BASE --inputs INPUT [INPUT ...] | --config MERGEKIT_YAML) --out OUT [options]"
    p = _command(sub, "merge", _cmd_merge, "merge fine-tunes and/or LoRA adapters of one base into one model", usage)
    p.add_argument("--method", choices=tuple(MERGE_METHODS), metavar="METHOD", help="the merge method (required without --config), one of: %(choices)s")
    p.add_argument("--config", type=Path, help="a mergekit YAML config instead of --method/--base/--inputs/... (see README)")
    _add_inputs(p, False, "HF model folders, PEFT adapter folders, or IDs in --store (required without --config)")
    p.add_argument("--weights", nargs="+", type=float, help="one weight per input (default: 1 each)")
    p.add_argument("--density", type=float, help="fraction of each task vector kept (ties, dare_*, breadcrumbs*, della*; default 1)")
    p.add_argument("--gamma", type=float, help="breadcrumbs*: fraction of each task vector's largest entries dropped (default 0.01)")
    p.add_argument("--t", type=float, help="slerp: where between the base (0) and the input (1) (required for slerp)")
    p.add_argument("--filter-wise", action="store_true", default=None, help="model_stock: one ratio per output row, not per tensor (default: per tensor)")
    p.add_argument("--epsilon", type=float, help="della*: keep probabilities run from density - epsilon to density + epsilon by magnitude rank (default 0.15)")
    p.add_argument("--select-topk", type=float, help="sce: fraction of the entries of largest variance across the inputs kept (default 1)")
    p.add_argument("--max-iter", type=int, help="karcher: most iterations (default 10)")
    p.add_argument("--tol", type=float, help="karcher: convergence tolerance (default 1e-5)")
    p.add_argument("--nuslerp-flatten", action=argparse.BooleanOptionalAction, help="nuslerp: over the whole tensor (default), or row by row")
    p.add_argument("--nuslerp-row-wise", action="store_true", default=None, help="nuslerp without flattening: column by column instead of row by row")
    p.add_argument("--lambda", dest="lambda_", type=float, help="scale of the merged task vector (default 1)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, help="divide by the summed weights (default: the method's)")
    p.add_argument("--seed", type=int, help="seed of the random drops of dare_* and della* (default 0)")
    p.add_argument("--combine", choices=("delta", "factors"), help="delta (default): merge each module's exact ΔW = B·A; factors: merge LoRA adapters' A with A and B with B, as PEFT's add_weighted_adapter (writes an adapter)")
    _add_output(p, "merge", "output folder (HF model, or PEFT adapter with --as-adapter)")
    p.add_argument("--as-adapter", action="store_true", help="write a PEFT LoRA adapter (truncated SVD of the merged delta)")
    p.add_argument("--rank", type=int, help="rank of the --as-adapter output")

    temperatures = ", ".join(f"{router} {t}" for router, t in TEMPERATURE["lora-moe"].items())
    p = _command(sub, "mix", _cmd_mix, "mix LoRA adapters (LoRA-MoE) or full fine-tunes (Mixtral) of one base into a mixture of experts")
    _add_inputs(p, True, "PEFT adapter folders, or HF model folders (all of one kind), or IDs in --store")
    p.add_argument("--router", required=True, choices=ROUTERS, help="how each prompt picks its experts: %(choices)s")
    p.add_argument("--top-k", type=int, help="experts mixed per prompt (default 2; not for the uniform router, which mixes all)")
    p.add_argument("--temperature", type=float, help=f"softmax temperature of the router scores (default: {temperatures})")
    p.add_argument("--threshold", type=float, help="centroid: distance at which the base model ties an expert (default 2)")
    p.add_argument("--granularity", choices=["sequence", "token"], help="route once per prompt (default) or per token (arrow: per token only)")
    p.add_argument("--general", help="arrow: GenKnowSub's general adapter subtracted from every expert: 'mean' (of the inputs) or an adapter folder (default: none subtracted)")
    p.add_argument("--tasks", nargs="+", help="trained router: one task source per input, the labelled data to train it on")
    p.add_argument("--shared", choices=MIXTRAL_SHARED, default="base", help="full fine-tunes: attention, norms and embeddings from the base or their average (default: base)")
    _add_output(p, "mix", "output folder (loads with cairn eval / cairn generate)")

    p = _command(sub, "run", _cmd_run, "run an experiment: strategies x seeds over a task stream, then report")
    p.add_argument("config", nargs="?", type=Path, help="experiment YAML (default: the built-in quickstart)")
    p.add_argument("--out", type=Path, help="run folder (default: the config's `out`, else runs/NAME)")
    p.add_argument("--check", action="store_true",
                   help="validate the config, its task sources, model specs and strategy options, print the plan, and train nothing")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run (refused if the run folder holds none); a plain rerun resumes too")
    p.add_argument("--overwrite", action="store_true", help="replace the results in --out of another config's run (its cache/ is kept), or a folder that is not a run's")

    p = _command(sub, "sweep", _cmd_sweep, "run an experiment over a grid of strategy settings x seeds x task orders; mean and 95%% CI per grid point")
    p.add_argument("config", type=Path, help="experiment YAML; its `sweep:` section gives the defaults of the options below")
    p.add_argument("--set", action="append", default=[], metavar="strategies.NAME.KEY=V1,V2,...",
                   help="values of one strategy setting (an option, or train.FIELD); repeat for a grid (default: the sweep section's grid)")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (default: the sweep's, else the config's)")
    p.add_argument("--orders", type=int, help="task orders: the config's, then K-1 other seeded permutations (default 1)")
    p.add_argument("--out", type=Path, help="output folder (default: the config's out)")

    for name, what in (("tune", "tune every strategy at the same budget on the eval splits, then run each at its chosen setting and rank them"),
                       ("frontier", "every strategy's learning-forgetting points over its tuning grid, its Pareto front and the matched comparison")):
        p = _command(sub, name, _cmd_tune, what)
        p.add_argument("config", type=Path, help="experiment YAML; its `tune:` section gives the defaults of the options below")
        p.add_argument("--seeds", help="comma-separated tuning seeds (default: the tune section's, else the config's first)")
        p.add_argument("--budget", type=int, help="grid points per strategy (default: the largest grid's size, 4 without one)")
        p.add_argument("--metric", choices=["op", "new", "retained", "bwt", "old_change"], help="what the choice maximizes on the eval splits (default op)")
        p.add_argument("--max-forgetting", type=float, help="only points whose eval old_change >= -X qualify (default: no bound)")
        p.add_argument("--out", type=Path, help="output folder (default: the config's out)")

    p = _command(sub, "report", _cmd_report, "re-render the report of a run folder from its results.json")
    p.add_argument("dir", type=Path, help="the run folder (`cairn run`'s --out)")

    p = sub.add_parser("store", help="a folder of contributions with verified manifests")
    _add_store(p, "store folder")
    ssub = p.add_subparsers(dest="store_command", required=True)
    q = _command(ssub, "add", _cmd_store_add, "copy a contribution (adapter or model folder) into the store")
    q.add_argument("path", type=Path, help="the contribution's folder")
    q.add_argument("--name", help="its ID in the store (default: TASK-METHOD-HASH)")
    q.add_argument("--base", help="for one made elsewhere (no cairn.json): the base it was trained on; it gets a manifest in the store")
    q.add_argument("--task", help="with --base: the task's name (default: the folder's name)")
    _command(ssub, "list", _cmd_store_list, "the contributions in the store")
    _command(ssub, "show", _cmd_store_show, "a contribution's manifest").add_argument("id", help="its ID (`cairn store list`)")
    _command(ssub, "verify", lambda args: api.store_verify(args.id, store=args.store, log=print),
             "recompute every file hash; exit 3 on any mismatch").add_argument("id", nargs="?", help="one contribution's ID (default: every one)")

    p = sub.add_parser("data", help="inspect task sources")
    dsub = p.add_subparsers(dest="data_command", required=True)
    _command(dsub, "packs", lambda args: _print_table(("pack", "description"), api.packs(), "built-in knowledge packs (use as pack:NAME)"),
             "list the built-in knowledge packs")
    p = _command(dsub, "inspect", _cmd_data_inspect, "sizes, splits, metric and a few examples of a task source")
    p.add_argument("source", help="task source: FILE.jsonl|FILE.json|FOLDER|pack:NAME|probe:NAME")
    p.add_argument("--metric", choices=METRICS, help="score with this metric instead of the task's (default: the task's)")
    p.add_argument("-n", type=int, default=3, help="examples to show per split (default: 3)")
    return parser


def _given(args, *names: str) -> dict:
    """The options among `names` given on the command line (None: left to the library's default),
    keyed by the API's names (`lambda_`, the attribute of --lambda, as `lambda`)."""
    return {name.rstrip("_"): getattr(args, name) for name in names if getattr(args, name) is not None}


def _cmd_train(args) -> None:
    manifest = api.train(args.task, args.out, base=args.base, metric=args.metric, chat_template=args.chat_template, overwrite=args.overwrite,
                         test=not args.no_eval, **_train_options(args))  # fmt: skip
    if not is_main():  # under `accelerate launch`: the main process reports
        return
    t = manifest["train"]
    print(f"trained {manifest['method']} on {manifest['task']}: {t['steps']} steps, final loss {t['losses'][-1]:.4f}, "
          f"{t['tokens']} tokens in {t['wall_s']:.1f}s ({t['tokens_per_s']:.0f} tokens/s) -> {args.out}")
    if "test" in manifest:
        _print_score(manifest["test"])


def _print_score(result) -> None:
    """An `EvalResult`'s score line; for an lm-eval probe, then one line per lm-eval task."""
    print(f"{result.task} {result.split} {result.metric}: {result.score:.4f} (n={result.n})")
    for row in result.predictions if result.split == "lm-eval" else []:
        print(f"  {row['task']}: {row['metric']} {row['score']:.4f}")


def _cmd_eval(args) -> None:
    _print_score(api.evaluate(args.model, args.task, split=args.split, metric=args.metric, chat_template=args.chat_template, batch_size=args.batch_size,
                              limit=args.limit, base=args.base, allow_pickle=args.allow_pickle, json_path=args.json, progress=True))  # fmt: skip


def _cmd_generate(args) -> None:
    print(api.generate(args.model, args.prompt, max_new_tokens=args.max_new_tokens, chat_template=args.chat_template, base=args.base, allow_pickle=args.allow_pickle))


def _cmd_merge(args) -> None:
    stats = api.merge(args.inputs, args.out, base=args.base, method=args.method, config=args.config, weights=args.weights, as_adapter=args.as_adapter,
                      adapter_rank=args.rank, store=args.store, overwrite=args.overwrite,
                      **_given(args, "density", "gamma", "t", "filter_wise", "epsilon", "select_topk", "max_iter", "tol", "nuslerp_flatten",
                               "nuslerp_row_wise", "lambda_", "seed", "normalize", "combine"))  # fmt: skip
    line = f"merged {len(stats.get('inputs', []))} models ({stats['method']}) in {stats['wall_s']:.1f}s -> {args.out}"
    if "svd" in stats:
        svd = stats["svd"]
        line += f" (rank-{svd['rank']} adapter on {svd['modules']} modules, relative error {svd['relative_error']:.4f})"
    print(line)


def _cmd_mix(args) -> None:
    out = api.mix(args.inputs, args.out, base=args.base, router=args.router, tasks=args.tasks, shared=args.shared, store=args.store, overwrite=args.overwrite,
                  **_given(args, "top_k", "temperature", "threshold", "granularity", "general"))  # fmt: skip
    what = "adapters into a LoRA-MoE" if (out / "moe.json").is_file() else "full fine-tunes into a Mixtral model"
    print(f"mixed {len(args.inputs)} {what} (router {args.router}) -> {out}")


def _cmd_run(args) -> None:
    if args.check:
        if args.resume:
            raise ConfigError("--check validates a run without starting one; drop --resume")
        _print_plan(api.check(args.config, args.out, overwrite=args.overwrite))
        return
    results = api.run(args.config, args.out, resume=args.resume, overwrite=args.overwrite, log=progress.write)
    if results is None:  # a process other than the main one under `accelerate launch`
        return
    _print_summary(results)
    diverged = [name for name, s in results["strategies"].items() if s.get("diverged")]
    if diverged:
        raise TrainingDiverged(f"training diverged in {', '.join(diverged)} (see the run's summary.md); the other strategies' results are complete")


_OUT_STATES = {"start": "a new run starts there", "resume": "it holds this config's run, which resumes", "replace": "--overwrite replaces what it holds (cache/ kept)"}


def _print_plan(plan: dict) -> None:
    """`cairn run --check`: what was checked, and what the run would train."""
    print(f"{plan['name']}: the config, its sources, model specs and options are valid; nothing was trained")
    print(f"base: {plan['base']} ({plan['base_checked']})")
    examples = lambda e: e if isinstance(e, str) else " / ".join(f"{e[s]} {s}" for s in ("train", "eval", "test"))  # noqa: E731
    described = [("task", t) for t in plan["tasks"]] + ([("probe", plan["probe"])] if plan["probe"] else []) + [("further probe", p) for p in plan["probes"]]
    _print_table(("role", "name", "metric", "examples"), ([role, t["name"], t["metric"], examples(t["examples"])] for role, t in described), "data")
    rows = ([s["name"], s["kind"], s["method"], f"{s['lr']:g}", str(s["epochs"]), json.dumps(s["options"]) if s["options"] else ""] for s in plan["strategies"])
    _print_table(("strategy", "kind", "method", "lr", "epochs", "options"), rows, f"strategies ({plan['setting']} setting)")
    print(f"plan: {len(plan['strategies'])} strategies x {len(plan['tasks'])} stages x {len(plan['seeds'])} seed(s) {plan['seeds']} = at most "
          f"{plan['trainings']} trainings (shared and cached work is reused)")
    print(f"out: {plan['out']}: {_OUT_STATES[plan['out_state']]}")


def _cmd_sweep(args) -> None:
    from cairn.config import parse_set

    seeds = _seeds(args.seeds)
    grid = dict(parse_set(text) for text in args.set)
    summary = api.sweep(args.config, args.out, grid=grid, seeds=seeds, orders=args.orders, log=progress.write)
    if summary is not None:  # None in the processes other than the main one under `accelerate launch`
        _print_sweep(summary)


def _cmd_tune(args) -> None:
    seeds = _seeds(args.seeds)
    summary = api.tune(args.config, args.out, seeds=seeds, budget=args.budget, metric=args.metric, max_forgetting=args.max_forgetting,
                       verdict=args.command == "tune", log=progress.write)
    if summary is None:  # a process other than the main one under `accelerate launch`
        return
    metric = summary["metric"]
    rows = ([r["variant"], f"{r['eval'][metric]:.3f}" if r["eval"][metric] is not None else "–",
             "✓" if any(c["variant"] == r["variant"] for c in summary["chosen"].values()) else ""] for r in summary["rows"])
    _print_table(("point", f"eval {metric}", "chosen"), rows, f"{summary['name']}: {summary['budget']} point(s) per strategy, chosen on eval splits")


def _seeds(text: str | None) -> list[int] | None:
    try:
        return None if text is None else [int(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None


def _print_sweep(summary: dict) -> None:
    from rich.table import Column

    from cairn.report import CHANGES, HEADLINE
    from cairn.sweep import format_stat

    runs = len(summary["seeds"]) * len(summary["orders"])
    header = (Column("variant", no_wrap=True), "runs", *HEADLINE)  # the names tell the grid points apart: never cut them
    rows = ([row["variant"], str(row["runs"]), *[format_stat(row["final"][k], k in CHANGES) for k in HEADLINE]] for row in summary["rows"])
    _print_table(header, rows, f"{summary['name']} sweep: at the last stage, mean ± 95% CI over {runs} run(s)")


def _cmd_report(args) -> None:
    _print_summary(api.report(args.dir))
    print(f"report: {args.dir / 'report.html'}")


def _print_summary(results: dict) -> None:
    """The summary as terminal tables: metrics averaged and at the last stage, then cost."""
    from cairn.report import HEADLINE, SUMMARY_HEADER, summary_rows

    n = len(HEADLINE) + 1  # the name column, then the metrics; the costs after them
    for part, title in (("summary", "averaged over stages"), ("final", "at the last stage")):
        _print_table(SUMMARY_HEADER[:n], (row[:n] for row in summary_rows(results, part)), f"{results['config']['name']}: {title}")
    _print_table([SUMMARY_HEADER[0], *SUMMARY_HEADER[n:]], ([row[0], *row[n:]] for row in summary_rows(results, "summary")), "cost")


def _console():
    """Rich's console on stdout; when stdout is not a terminal (a file, a pipe), wide enough that no
    table is cut or wrapped (rich would fit 80 columns and shorten the IDs one types)."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=10_000)


def _print_table(header, rows, title: str | None = None) -> None:
    """A terminal table (rich) of `rows` (strings) under `header`."""
    from rich.table import Table

    table = Table(*header, title=title)
    for row in rows:
        table.add_row(*row)
    _console().print(table)


def _cmd_store_add(args) -> None:
    entry = api.store_add(args.path, args.name, store=args.store, base=args.base, task=args.task)
    print(f"added {entry['id']} ({entry['task']}, {entry['method']}) to {args.store}")


def _cmd_store_show(args) -> None:
    print(json.dumps(api.store_show(args.id, store=args.store), indent=2))


def _cmd_store_list(args) -> None:
    rows = ([e["id"], e["task"], e["method"], str(e["kind"]), str(e["base"]), e["base_fingerprint"][:12]] for e in api.store_list(store=args.store))
    _print_table(("id", "task", "method", "kind", "base", "base fingerprint"), rows, str(args.store))


def _cmd_data_inspect(args) -> None:
    summary = api.inspect(args.source, metric=args.metric, n=args.n)
    splits = summary["splits"]
    _console().print(f"[bold]{summary['task']}[/bold]  metric: {summary['metric']}  data hash: {summary['data_hash'][:12]}")
    chars = lambda mean: "-" if mean is None else f"{mean:.0f}"  # noqa: E731
    rows = ([split, str(s["examples"]), chars(s["prompt_chars"]), chars(s["answer_chars"])] for split, s in splits.items())
    _print_table(("split", "examples", "mean prompt chars", "mean answer chars"), rows)
    for split, s in splits.items():
        for example in s["first"]:
            _console().print(f"[dim]{split}[/dim] {json.dumps(example, ensure_ascii=False)[:300]}")


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage and the problem (2), or the help (0)
        return exc.code if isinstance(exc.code, int) else 2
    progress.quiet_libraries()  # before transformers is imported: it reads its settings from the environment
    _log_to_stderr(args.command)
    try:
        args.handler(args)
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
