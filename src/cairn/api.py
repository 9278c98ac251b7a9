"""The Python API: one function per command, each a thin composition of the library that makes
the command's checks, so that Python callers get the refusals the command line gives.

    import cairn
    results = cairn.run("configs/quickstart.yaml", out="runs/qs")          # = cairn run
    table = cairn.sweep("configs/olora-lambda.yaml", seeds=[0, 1])       # = cairn sweep
    cairn.train("pack:people", "runs/people", epochs=4)                  # = cairn train
    cairn.evaluate("runs/people", "pack:people").score                   # = cairn eval
    cairn.merge(["runs/people", "runs/countries"], "runs/m", base="bundled:smollm2-135m", method="ties", density=0.5)
    cairn.mix(["runs/people", "runs/countries"], "runs/x", base="bundled:smollm2-135m", router="centroid")

and `generate`, `report`, `store_add` / `store_list` / `store_show` / `store_verify`, `packs` and
`inspect` for the other commands. Tasks are sources (`pack:NAME`, files, folders, `lm-eval:...`)
or `Task` objects; models are specs (`bundled:smollm2-135m`, `tiny-random`, folders). Messages
name the command line's flags (`--rank`), which are the keywords' names unless said otherwise.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

from cairn.distributed import barrier
from cairn.errors import CairnError, ConfigError, DataError
from cairn.options import DEFAULT_BASE


def _at_least(minimum: int, **values) -> None:
    """Refuse a number below `minimum`, given as `flag_name=value` (`batch_size` for --batch-size)."""
    for name, value in values.items():
        if value is not None and value < minimum:
            flag = f"-{name}" if len(name) == 1 else f"--{name.replace('_', '-')}"
            raise ConfigError(f"{flag} must be at least {minimum}, got {value}")


def _task(task, tokenizer=None, chat_template: bool = False, metric: str | None = None):
    from cairn.data import load_task
    from cairn.data.chat import as_chat

    task = load_task(str(task), metric=metric) if isinstance(task, (str, Path)) else task
    return as_chat(task, tokenizer) if chat_template else task


def _model(model, allow_pickle: bool = False, base: str | None = None):
    """(model, tokenizer) of `model`: a spec (any kind, adapters and mixtures included, on `base`
    where given), or a loaded pair."""
    from cairn.contributions import load

    if isinstance(model, tuple):
        if base is not None:
            raise ConfigError("base names the base of an adapter to load; a loaded (model, tokenizer) pair has one")
        return model
    return load(str(model), base=base, allow_pickle=allow_pickle)


# --- experiments -------------------------------------------------------------------------------------


def run(config=None, out: str | Path | None = None, *, resume: bool = False, overwrite: bool = False, progress: bool = True, log=print) -> dict:
    """Run an experiment (a YAML path, a dict, an `ExperimentConfig`, or None for the
    quickstart), write its report into `out` (default: the config's) and return the results.
    A folder holding another config's run (or no run) is refused unless `overwrite`; the same
    config resumes, and `resume` insists on it (refused where `out` holds no interrupted run).
    One run at a time writes a folder (a lock)."""
    from cairn.config import quickstart
    from cairn.distributed import is_main
    from cairn.experiment import run_experiment
    from cairn.io import exclusive
    from cairn.report import write_report
    from cairn.run_folder import claim

    cfg = quickstart() if config is None else _config(config)
    out = Path(out or cfg.out_dir())
    if resume and not (out / "cache").is_dir():
        raise CairnError(f"--resume: {out} holds no interrupted run (no cache/); drop --resume to start one")
    if resume and overwrite:
        raise ConfigError("--resume continues the run in the folder, --overwrite replaces it: give one of them")
    main = is_main()
    with exclusive(out, "cairn run") if main else contextlib.nullcontext():
        if main:
            claim(out, cfg.model_dump(mode="json"), overwrite=overwrite)
        barrier()  # the other processes of a launch start once the folder is claimed
        results = run_experiment(cfg, out, progress=progress, log=log)
        if results is not None:  # None in the other processes under `accelerate launch`
            write_report(results, out)
            log(f"report: {out / 'report.html'}")
    return results


def check(config=None, out: str | Path | None = None, *, overwrite: bool = False) -> dict:
    """Validate a run without training (= cairn run --check): the config, its task sources, model
    specs, strategy options and the run folder `out` (default: the config's), as `run` would;
    returns the plan (`cairn.experiment.check_experiment`)."""
    from cairn.config import quickstart
    from cairn.experiment import check_experiment

    cfg = quickstart() if config is None else _config(config)
    return check_experiment(cfg, Path(out) if out else None, overwrite=overwrite)


def _config(config):
    from cairn.config import ExperimentConfig, load_config, parse_config

    if isinstance(config, ExperimentConfig):
        return config
    return parse_config(config) if isinstance(config, dict) else load_config(config)


def sweep(config, out: str | Path | None = None, *, grid: dict | None = None, seeds: list[int] | None = None, orders: int | None = None,
          progress: bool = True, log=print) -> dict:
    """Run a sweep (= cairn sweep): the config's `sweep:` section, with `grid` ({"strategies.NAME.KEY":
    [values]}), `seeds` and `orders` overriding it; returns the aggregated sweep dict."""
    from cairn.config import sweep_spec
    from cairn.distributed import is_main
    from cairn.io import exclusive
    from cairn.sweep import run_sweep

    cfg = _config(config)
    spec = _checked("sweep options", lambda: sweep_spec(cfg, grid=grid, seeds=seeds, orders=orders))
    out = Path(out or cfg.out_dir())  # run_sweep checks every grid point and order before anything trains
    with exclusive(out, "cairn sweep") if is_main() else contextlib.nullcontext():
        summary = run_sweep(cfg, spec, out, progress=progress, log=log)
    if summary is not None:  # None in the other processes under `accelerate launch`
        log(f"sweep: {out / 'sweep.md'}")
    return summary


def tune(config, out: str | Path | None = None, *, seeds: list[int] | None = None, budget: int | None = None, metric: str | None = None,
         max_forgetting: float | None = None, verdict: bool = True, progress: bool = True, log=print) -> dict:
    """Tune every strategy at equal budget on the eval splits (= cairn tune), the config's `tune:`
    section with these keywords overriding it; then, with `verdict`, run each at its chosen setting
    for the config's seeds and report. `verdict=False` is `cairn frontier`. Returns the tuning summary."""
    from cairn.config import TuneSpec, parse_config
    from cairn.distributed import is_main
    from cairn.io import exclusive
    from cairn.tuning import run_tuning

    cfg = _config(config)
    given = {k: v for k, v in {"seeds": seeds, "budget": budget, "metric": metric, "max_forgetting": max_forgetting}.items() if v is not None}
    spec = _checked("tune", lambda: TuneSpec.model_validate({**(cfg.tune.model_dump() if cfg.tune else {}), **given}))
    cfg = parse_config({**cfg.model_dump(mode="json"), "tune": spec.model_dump(mode="json")}, "config", like=cfg)
    out = Path(out or cfg.out_dir())
    with exclusive(out, "cairn tune" if verdict else "cairn frontier") if is_main() else contextlib.nullcontext():
        summary = run_tuning(cfg, out, verdict=verdict, progress=progress, log=log)
    return summary


def frontier(config, out: str | Path | None = None, **options) -> dict:
    """The learning–forgetting frontier (= cairn frontier): `tune` without the verdict run."""
    return tune(config, out, verdict=False, **options)


def _checked(where: str, build):
    """`build()`, with pydantic's errors turned into Cairn's own (a ConfigError naming each key)."""
    from pydantic import ValidationError

    from cairn.validation import config_error

    try:
        return build()
    except ValidationError as exc:
        raise config_error(exc, where) from None


def report(folder: str | Path) -> dict:
    """Re-render the report of the run folder `folder` from its results.json (= cairn report); returns the results."""
    from cairn.report import load_results, write_report

    results = load_results(Path(folder))
    write_report(results, Path(folder))
    return results


# --- one contribution --------------------------------------------------------------------------------


def _fingerprint_of(base: str):
    """A function giving `base`'s fingerprint, loading the model the first time it is called
    (only inputs that record a fingerprint need it), then remembering it for this call."""
    from cairn.models import load_model

    return functools.cache(lambda: load_model(base)[0].cairn_fingerprint)


def _checked_output(out, command: str, overwrite: bool) -> Path:
    from cairn.io import check_output
    from cairn.manifest import made_by

    check_output(out, earlier=made_by(Path(out)) == command, overwrite=overwrite, what=f"`cairn {command}` output")
    return Path(out)


def train(task, out: str | Path, *, base: str = DEFAULT_BASE, metric: str | None = None, chat_template: bool = False, overwrite: bool = False,
          test: bool = False, progress: bool = True, **options) -> dict:
    """Train a contribution (LoRA by default; `method="fft"` for full fine-tuning; any
    `TrainConfig` field as a keyword) on `task` (with `metric` overriding a source's) from `base`;
    save it at `out` and return its manifest. `out` may be new, empty, or an earlier `train`
    output; anything else needs `overwrite`. With `test` (cairn train without --no-eval), the
    main process then scores it on the task's test split, if any: the `EvalResult` is the
    returned manifest's "test" (not written to the file)."""
    from cairn.contributions import train_contribution
    from cairn.distributed import is_main
    from cairn.models import load_model
    from cairn.options import TrainConfig

    cfg = TrainConfig.parse("invalid training option", **options)
    out = _checked_output(out, "train", overwrite)
    if isinstance(task, str) and task.startswith("lm-eval:"):
        raise ConfigError(f"task {task}: an lm-eval task is measured by lm-eval and has no training data here; use it with cairn eval or as a probe")
    task = _task(task, metric=metric)
    if not task.train:
        raise DataError(f"task {task.name} has no 'train' examples")  # checked before loading the model
    if chat_template:
        task = _task(task, load_model(base)[1], chat_template)
    manifest = train_contribution(base, task, cfg, out, progress=progress)
    if test and task.test and is_main():  # under `accelerate launch`: the main process evaluates
        manifest["test"] = evaluate(out, task, progress=progress)
    return manifest


def evaluate(model, task, *, split: str = "test", metric: str | None = None, chat_template: bool = False, batch_size: int = 32, limit: int | None = None,
             base: str | None = None, allow_pickle: bool = False, json_path: str | Path | None = None, progress: bool = False):
    """Score `model` (a spec, on `base` where it is an adapter and given, or a loaded (model,
    tokenizer) pair) on `task`'s `split`, or a seeded sample of `limit` of its examples (= cairn
    eval; an lm-eval probe is scored by lm-eval on its own data, in no chat template); returns the
    `EvalResult` (score and per-example predictions), also written to `json_path` (--json) when given.
    Most predictions empty is logged as a warning with its likely causes."""
    from cairn.data.lm_eval import LmEvalProbe
    from cairn.evaluation import evaluate_task
    from cairn.evaluation.evaluate import single_line, warn_if_mostly_empty
    from cairn.io import atomic_write_json

    _at_least(1, batch_size=batch_size, limit=limit)
    if json_path is not None and Path(json_path).is_dir():
        raise ConfigError(f"--json {json_path} is a folder; give the path of a file to write")
    task = _task(task, metric=metric)
    probe = isinstance(task, LmEvalProbe)  # lm-eval holds its own data
    if not probe and not task.split(split):
        raise DataError(f"task {task.name} has no {split!r} examples")
    if limit is not None:
        if probe:
            raise ConfigError(f"{task.name}: an lm-eval probe runs lm-eval's own task; it takes no --limit")
        task = task.limited({split: limit})
    model, tokenizer = _model(model, allow_pickle, base)
    task = _task(task, tokenizer, chat_template and not probe)
    result = evaluate_task(model, tokenizer, task, split=split, batch_size=batch_size, progress=progress)
    if not probe:
        warn_if_mostly_empty(task.name, split, [row["prediction"] for row in result.predictions], stopped_at_newline=single_line(task))
    if json_path is not None:
        try:
            atomic_write_json(Path(json_path), result.to_dict())
        except OSError as exc:
            raise CairnError(f"--json {json_path}: cannot write ({exc.strerror or exc})") from exc
    return result


def generate(model, prompt: str, *, max_new_tokens: int = 64, chat_template: bool = False, base: str | None = None, allow_pickle: bool = False) -> str:
    """The greedy completion of `prompt` by `model` (a spec, on `base` where it is an adapter and
    given, or a loaded (model, tokenizer) pair; = cairn generate), with `chat_template` the prompt
    wrapped in the model's chat template as the user's turn (instruction-tuned models)."""
    from cairn.data.chat import chat_prompt, check_chat_template
    from cairn.evaluation import generate as complete

    _at_least(1, max_new_tokens=max_new_tokens)
    model, tokenizer = _model(model, allow_pickle, base)
    if chat_template:
        check_chat_template(tokenizer, "--chat-template")
        prompt = chat_prompt(tokenizer, prompt)
    return complete(model, tokenizer, [prompt], max_new_tokens=max_new_tokens)[0]


# --- combining contributions -------------------------------------------------------------------------


def _base_folder(base: str, what: str = "base") -> str:
    from cairn.models import ModelSpec, resolve_folder

    spec = ModelSpec.parse(base)
    if spec.kind in ("adapter", "moe"):
        raise ConfigError(f"{what} {base} is not a base model; give the full model the inputs were trained from")
    return resolve_folder(spec)


def _inputs(inputs: list, base: str, base_folder: str, store, fingerprint) -> list[Path]:
    """The inputs' folders (folders or store IDs), each checked against the base."""
    from cairn.contributions import check_inputs, resolve_inputs

    paths = resolve_inputs(list(inputs), _store_folder(store), fingerprint)
    if not paths:
        raise ConfigError("nothing to combine: give at least one input")
    check_inputs(paths, base_folder, fingerprint, base)
    return paths


def merge(inputs: list | None, out: str | Path, *, base: str | None = None, method: str | None = None, config: str | Path | None = None,
          weights: list[float] | None = None, as_adapter: bool | None = None, adapter_rank: int | None = None, store: str | Path | None = None,
          overwrite: bool = False, progress: bool = True, **options) -> dict:
    """Merge HF folders and/or PEFT adapters of `base` (folders, or IDs in `store`) by `method` and its
    `MergeOptions` (density, lambda, normalize, seed, combine), or as the mergekit YAML `config` says (then
    with no inputs, base, method, weights or options), into `out`; returns the merge's statistics.
    `adapter_rank` (--rank) writes a PEFT adapter of that rank instead of a model (`as_adapter`,
    when given, must say the same). Each input must have been made on the base (its recorded
    fingerprint), or at least fit its shapes."""
    from cairn.methods.merge.streaming import merge_models
    from cairn.models import recorded_base

    if as_adapter is not None and as_adapter != (adapter_rank is not None):
        raise ConfigError("--as-adapter and --rank go together: --as-adapter --rank R")
    _at_least(1, rank=adapter_rank)
    plan = _merge_plan(config, {"method": method, "base": base, "inputs": inputs, "weights": weights}, options)
    out = _checked_output(out, "merge", overwrite)
    from_yaml = {"mergekit_config": str(config)} if config is not None else {}
    folder = _base_folder(plan.base, f"{config}: base_model" if from_yaml else "base")
    fingerprint = _fingerprint_of(plan.base)
    paths = _inputs(plan.inputs, plan.base, folder, store, fingerprint)
    made_from = {"base": recorded_base(plan.base), "base_fingerprint": fingerprint(), **from_yaml}
    return merge_models(folder, paths, out, plan.opts, weights=plan.weights, adapter_rank=adapter_rank, dtype=plan.dtype, progress=progress, made_from=made_from)


def _merge_plan(config, given: dict, options: dict):
    """The merge asked for: the mergekit YAML `config`, refused with any of `given` or `options` set;
    else `given`'s method, base and inputs (each needed) with `options`."""
    from cairn.methods.merge.mergekit import MergePlan, read_mergekit_config
    from cairn.options import MergeOptions

    if config is not None:
        clash = [f"--{k}" for k, v in {**given, **options}.items() if v is not None]
        if clash:
            raise ConfigError(f"--config gives the whole merge; drop {', '.join(clash)} (or drop --config)")
        return read_mergekit_config(config)
    missing = [f"--{k}" for k in ("method", "base", "inputs") if not given[k]]
    if missing:
        raise ConfigError(f"cairn merge needs {', '.join(missing)} (or a mergekit YAML through --config)")
    opts = MergeOptions.parse("invalid merge option", method=given["method"], **options)
    return MergePlan(given["base"], list(given["inputs"]), given["weights"], opts, dtype=None)


def mix(inputs: list, out: str | Path, *, base: str, router: str = "centroid", top_k: int | None = None, tasks: list | None = None, shared: str = "base",
        store: str | Path | None = None, overwrite: bool = False, progress: bool = True, **options) -> Path:
    """Mix LoRA adapters into a LoRA-MoE folder, or full fine-tunes into a Mixtral folder, at
    `out` (see `MoeOptions`; `tasks`: one labelled task per input, for `router="trained"`)."""
    from cairn.methods.moe.lora_moe import attach_experts, save_moe
    from cairn.methods.moe.router_training import train_router
    from cairn.models import load_model, recorded_base
    from cairn.options import MoeOptions

    _at_least(1, top_k=top_k)
    given = {"top_k": top_k} if top_k is not None else {}
    opts = MoeOptions.parse("invalid mix option", router=router, **given, **options)
    if (router == "trained") != bool(tasks):
        raise ConfigError("tasks (--tasks) go with router 'trained' (and only with it): one labelled task per input, to train the router on")
    out = _checked_output(out, "mix", overwrite)
    folder = _base_folder(base)
    fingerprint = _fingerprint_of(base)
    inputs = _inputs(inputs, base, folder, store, fingerprint)
    adapters = [(p / "adapter_config.json").is_file() for p in inputs]
    if any(adapters) and not all(adapters):
        raise ConfigError("inputs mix adapters and full models: a mixture is made of LoRA adapters (LoRA-MoE) or of full fine-tunes (Mixtral), not both")
    if tasks and len(tasks) != len(inputs):
        raise ConfigError(f"{len(tasks)} tasks for {len(inputs)} inputs: give one task per input")
    made_from = {"base": recorded_base(base), "base_fingerprint": fingerprint()}
    if not all(adapters):
        from cairn.methods.moe.mixtral import export_mixtral

        opts.check_for_mixtral()
        export_mixtral(folder, inputs, out, router=router, top_k=opts.top_k, shared=shared, seed=opts.seed, progress=progress, made_from=made_from)
        return out
    model, tokenizer = load_model(base)
    model = attach_experts(model, inputs, opts)
    details = {}
    if tasks:
        losses = train_router(model, tokenizer, [_task(t) for t in tasks], opts, progress=progress)
        details["router_losses"] = [round(x, 4) for x in losses]
    save_moe(model, inputs, opts, out, made_from=made_from, details=details)
    return out


# --- the store ---------------------------------------------------------------------------------------


def _store_folder(store) -> Path:
    from cairn.store import default_store

    return Path(store) if store is not None else default_store()


def _store(store):
    from cairn.store import Store

    return Store(_store_folder(store))


def store_add(path: str | Path, name: str | None = None, *, store: str | Path | None = None, base: str | None = None, task: str | None = None) -> dict:
    """Copy the contribution at `path` into the store as `name` (default: TASK-METHOD-HASH; = cairn store add); returns its index entry.
    One made elsewhere (a plain PEFT adapter or HF folder, no cairn.json) needs `base`, the base it
    was trained on (checked against its shapes), and gets a manifest in the store (`task`: its name,
    default the folder's)."""
    if base is None:
        if task is not None:
            raise ConfigError("--task names a contribution made elsewhere, which goes with --base; a Cairn contribution's manifest names its task")
        return _store(store).add(path, name)
    from cairn.contributions import describe_made_elsewhere

    manifest = describe_made_elsewhere(Path(path), base, _base_folder(base), _fingerprint_of(base)(), task=task)
    return _store(store).add(path, name, manifest=manifest)


def store_list(*, store: str | Path | None = None) -> list[dict]:
    """The index entries of the store's contributions (= cairn store list)."""
    return _store(store).list()


def store_show(cid: str, *, store: str | Path | None = None) -> dict:
    """The manifest of the stored contribution `cid` (= cairn store show)."""
    return _store(store).show(cid)


def store_verify(cid: str | None = None, *, store: str | Path | None = None, log=print) -> list[str]:
    """Recompute the file hashes of the stored contribution `cid` (default: every one) and log
    `ID: ok` or its problems for each (= cairn store verify); then refuse (DataError) any that
    failed. Returns the IDs verified."""
    report = _store(store).verify(cid)
    bad = {i: problems for i, problems in report.items() if problems}
    for i in report:
        log(f"{i}: " + ("; ".join(bad[i]) if i in bad else "ok"))
    if bad:
        raise DataError(f"{len(bad)} of {len(report)} contribution(s) failed verification")
    return list(report)


# --- task sources ------------------------------------------------------------------------------------


def packs() -> list[tuple[str, str]]:
    """(name, description) of every built-in knowledge pack (= cairn data packs)."""
    from cairn.data.packs import list_packs

    return list_packs()


def inspect(source, *, metric: str | None = None, n: int = 3) -> dict:
    """What a task source holds (= cairn data inspect): its name, metric and data hash, and per
    split the number of examples, their mean prompt and answer lengths (characters; None when
    empty) and the first `n`."""
    from cairn.data import SPLITS
    from cairn.data.lm_eval import LmEvalProbe

    _at_least(0, n=n)
    task = _task(source, metric=metric)
    if isinstance(task, LmEvalProbe):
        raise ConfigError(f"{source}: an lm-eval probe's data is lm-eval's own, not here to inspect; score it with cairn eval")
    return {"task": task.name, "metric": task.metric, "data_hash": task.data_hash(), "splits": {s: _split_summary(task.split(s), n) for s in SPLITS}}


def _split_summary(examples: list, n: int) -> dict:
    def mean_chars(field: str) -> float | None:
        return sum(len(getattr(x, field)) for x in examples) / len(examples) if examples else None

    first = [{"prompt": x.prompt, "answer": x.answer} for x in examples[:n]]
    return {"examples": len(examples), "prompt_chars": mean_chars("prompt"), "answer_chars": mean_chars("answer"), "first": first}
