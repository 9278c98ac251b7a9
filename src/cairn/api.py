"""The Python API: one function per command, each a thin composition of the library.

    import cairn
    results = cairn.run("configs/quickstart.yaml", out="runs/qs")          # = cairn run
    table = cairn.sweep("configs/olora-lambda.yaml", seeds=[0, 1])       # = cairn sweep
    cairn.train("pack:people", "runs/people", epochs=4)                  # = cairn train
    cairn.evaluate("runs/people", "pack:people").score                   # = cairn eval
    cairn.merge(["runs/people", "runs/countries"], "runs/m", base="bundled:smollm2-135m", method="ties", density=0.5)
    cairn.mix(["runs/people", "runs/countries"], "runs/x", base="bundled:smollm2-135m", router="centroid")

Tasks are sources (`pack:NAME`, files, folders, `lm-eval:...`) or `Task` objects; models are
specs (`bundled:smollm2-135m`, `tiny-random`, folders).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

from cairn.distributed import barrier
from cairn.errors import ConfigError, DataError
from cairn.models import DEFAULT_BASE


def _task(task, tokenizer=None, chat_template: bool = False, metric: str | None = None):
    from cairn.data import load_task
    from cairn.data.chat import as_chat

    task = load_task(str(task), metric=metric) if isinstance(task, (str, Path)) else task
    return as_chat(task, tokenizer) if chat_template else task


def run(config=None, out: str | Path | None = None, *, overwrite: bool = False, progress: bool = True, log=print) -> dict:
    """Run an experiment (a YAML path, a dict, an `ExperimentConfig`, or None for the
    quickstart), write its report into `out` (default: the config's) and return the results.
    A folder holding another config's run (or no run) is refused unless `overwrite`; the same
    config resumes. One run at a time writes a folder (a lock)."""
    from cairn.config import quickstart
    from cairn.distributed import is_main
    from cairn.experiment import run_experiment
    from cairn.io import exclusive
    from cairn.report import write_report
    from cairn.run_folder import claim

    cfg = quickstart() if config is None else _config(config)
    out = Path(out or cfg.out_dir())
    main = is_main()
    with exclusive(out, "cairn run") if main else contextlib.nullcontext():
        if main:
            claim(out, cfg.model_dump(mode="json"), overwrite=overwrite)
        barrier()  # the other processes of a launch start once the folder is claimed
        results = run_experiment(cfg, out, progress=progress, log=log)
        if results is not None:  # None in the other processes under `accelerate launch`
            write_report(results, out)
    return results


def _config(config):
    from cairn.config import ExperimentConfig, load_config, parse_config

    if isinstance(config, ExperimentConfig):
        return config
    return parse_config(config) if isinstance(config, dict) else load_config(config)


def sweep(config, out: str | Path | None = None, *, grid: dict | None = None, seeds: list[int] | None = None, orders: int | None = None,
          progress: bool = True, log=print) -> dict:
    """Run a sweep (= cairn sweep): the config's `sweep:` section, with `grid` ({"strategies.NAME.KEY":
    [values]}), `seeds` and `orders` overriding it; returns the aggregated sweep dict."""
    from cairn.distributed import is_main
    from cairn.io import exclusive
    from cairn.sweep import run_sweep, sweep_spec

    cfg = _config(config)
    spec = _checked("sweep options", lambda: sweep_spec(cfg, grid=grid, seeds=seeds, orders=orders))
    out = Path(out or cfg.out_dir())
    with exclusive(out, "cairn sweep") if is_main() else contextlib.nullcontext():
        return run_sweep(cfg, spec, out, progress=progress, log=log)


def _checked(where: str, build):
    """`build()`, with pydantic's errors turned into Cairn's own (a ConfigError naming each key)."""
    from pydantic import ValidationError

    from cairn.validation import config_error

    try:
        return build()
    except ValidationError as exc:
        raise config_error(exc, where) from None


def _fingerprint_of(base: str):
    """A function giving `base`'s fingerprint, loading the model the first time it is called
    (only inputs that record a fingerprint need it), then remembering it for this call."""
    from cairn.models import load_model

    return functools.cache(lambda: load_model(base)[0].cairn_fingerprint)


def _checked_output(out, command: str, overwrite: bool) -> Path:
    from cairn.io import check_output
    from cairn.store import made_by

    check_output(out, earlier=made_by(Path(out)) == command, overwrite=overwrite, what=f"`cairn {command}` output")
    return Path(out)


def train(task, out: str | Path, *, base: str = DEFAULT_BASE, metric: str | None = None, chat_template: bool = False, overwrite: bool = False,
          progress: bool = True, **options) -> dict:
    """Train a contribution (LoRA by default; `method="fft"` for full fine-tuning; any
    `TrainConfig` field as a keyword) on `task` (with `metric` overriding a source's) from `base`;
    save it at `out` and return its manifest. `out` may be new, empty, or an earlier `train`
    output; anything else needs `overwrite`."""
    from cairn.models import load_model
    from cairn.training import TrainConfig, train_contribution

    cfg = TrainConfig.parse("invalid training option", **options)
    out = _checked_output(out, "train", overwrite)
    if isinstance(task, str) and task.startswith("lm-eval:"):
        raise ConfigError(f"task {task}: an lm-eval task is measured by lm-eval and has no training data here; use it with cairn eval or as a probe")
    task = _task(task, metric=metric)
    if not task.train:
        raise DataError(f"task {task.name} has no 'train' examples")  # checked before loading the model
    if chat_template:
        task = _task(task, load_model(base)[1], chat_template)
    return train_contribution(base, task, cfg, out, progress=progress)


def evaluate(model, task, *, split: str = "test", chat_template: bool = False, batch_size: int = 32, progress: bool = False):
    """Score `model` (a spec, or a loaded (model, tokenizer) pair) on `task`; returns the
    `EvalResult` (score and per-example predictions)."""
    from cairn.evaluation import evaluate_task
    from cairn.models import load_model

    model, tokenizer = model if isinstance(model, tuple) else load_model(str(model))
    return evaluate_task(model, tokenizer, _task(task, tokenizer, chat_template), split=split, batch_size=batch_size, progress=progress)


def _base_folder(base: str, what: str = "base") -> str:
    from cairn.models import ModelSpec, resolve_folder

    spec = ModelSpec.parse(base)
    if spec.kind in ("adapter", "moe"):
        raise ConfigError(f"{what} {base} is not a base model; give the full model the inputs were trained from")
    return resolve_folder(spec)


def _inputs(inputs: list, base: str, base_folder: str, store, fingerprint) -> list[Path]:
    """The inputs' folders (folders or store IDs), each checked against the base."""
    from cairn.contributions import check_inputs, default_store, resolve_inputs

    paths = resolve_inputs(list(inputs), store or default_store(), fingerprint)
    if not paths:
        raise ConfigError("nothing to combine: give at least one input")
    check_inputs(paths, base_folder, fingerprint, base)
    return paths


def merge(inputs: list, out: str | Path, *, base: str, method: str = "ties", weights: list[float] | None = None, adapter_rank: int | None = None,
          store: str | Path | None = None, overwrite: bool = False, progress: bool = True, **options) -> dict:
    """Merge HF folders and/or PEFT adapters of `base` (folders, or IDs in `store`; see `MergeOptions`:
    density, lambda, normalize, seed) into `out`; returns the merge's statistics. Each input must
    have been made on `base` (its recorded fingerprint), or at least fit its shapes."""
    from cairn.methods.merge_models import merge_models
    from cairn.methods.merging import MergeOptions

    opts = MergeOptions.parse("invalid merge option", method=method, **options)
    if adapter_rank is not None and adapter_rank < 1:
        raise ConfigError(f"adapter rank must be at least 1, got {adapter_rank}")
    out = _checked_output(out, "merge", overwrite)
    folder = _base_folder(base)
    fingerprint = _fingerprint_of(base)
    paths = _inputs(inputs, base, folder, store, fingerprint)
    manifest = {"base": base, "base_fingerprint": fingerprint()}
    return merge_models(folder, paths, out, opts, weights=weights, adapter_rank=adapter_rank, progress=progress, manifest=manifest)


def merge_mergekit(config: str | Path, out: str | Path, *, adapter_rank: int | None = None, store: str | Path | None = None,
                   overwrite: bool = False, progress: bool = True) -> dict:
    """Merge as a mergekit YAML config says (= cairn merge --config)."""
    from cairn.methods.merge_models import merge_models
    from cairn.methods.mergekit_config import read_mergekit_config

    if adapter_rank is not None and adapter_rank < 1:
        raise ConfigError(f"adapter rank must be at least 1, got {adapter_rank}")
    out = _checked_output(out, "merge", overwrite)
    plan = read_mergekit_config(config)
    folder = _base_folder(plan.base, f"{config}: base_model")
    fingerprint = _fingerprint_of(plan.base)
    paths = _inputs(plan.inputs, plan.base, folder, store, fingerprint)
    manifest = {"base": plan.base, "base_fingerprint": fingerprint(), "mergekit_config": str(config)}
    return merge_models(folder, paths, out, plan.opts, weights=plan.weights, adapter_rank=adapter_rank, dtype=plan.dtype, progress=progress, manifest=manifest)


def mix(inputs: list, out: str | Path, *, base: str, router: str = "centroid", top_k: int | None = None, tasks: list | None = None, shared: str = "base",
        store: str | Path | None = None, overwrite: bool = False, progress: bool = True, **options) -> Path:
    """Mix LoRA adapters into a LoRA-MoE folder, or full fine-tunes into a Mixtral folder, at
    `out` (see `MoeOptions`; `tasks`: one labelled task per input, for `router="trained"`)."""
    from cairn.methods.moe import MoeOptions, attach_experts, save_moe, train_router
    from cairn.models import load_model

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
    manifest = {"base_fingerprint": fingerprint()}
    if not all(adapters):
        from cairn.methods.mixtral import export_mixtral

        opts.check_for_mixtral()
        export_mixtral(folder, inputs, out, router=router, top_k=opts.top_k, shared=shared, seed=opts.seed, progress=progress, manifest={"base": base, **manifest})
        return out
    model, tokenizer = load_model(base)
    model = attach_experts(model, inputs, opts)
    if tasks:
        losses = train_router(model, tokenizer, [_task(t) for t in tasks], opts, progress=progress)
        manifest["router_losses"] = [round(x, 4) for x in losses]
    save_moe(model, inputs, opts, out, base=base, manifest=manifest)
    return out
