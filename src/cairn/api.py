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

from pathlib import Path

from cairn.errors import ConfigError
from cairn.models import DEFAULT_BASE


def _task(task, tokenizer=None, chat_template: bool = False):
    from cairn.data import load_task
    from cairn.data.chat import as_chat

    task = load_task(task) if isinstance(task, (str, Path)) else task
    return as_chat(task, tokenizer) if chat_template else task


def run(config=None, out: str | Path | None = None, *, progress: bool = True, log=print) -> dict:
    """Run an experiment (a YAML path, a dict, an `ExperimentConfig`, or None for the
    quickstart), write its report into `out` (default: the config's) and return the results."""
    from cairn.config import quickstart
    from cairn.experiment import run_experiment
    from cairn.report import write_report

    cfg = quickstart() if config is None else _config(config)
    out = Path(out or cfg.out_dir())
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
    from cairn.sweep import run_sweep, sweep_spec

    cfg = _config(config)
    return run_sweep(cfg, sweep_spec(cfg, grid=grid, seeds=seeds, orders=orders), Path(out) if out else None, progress=progress, log=log)


def train(task, out: str | Path, *, base: str = DEFAULT_BASE, chat_template: bool = False, progress: bool = True, **options) -> dict:
    """Train a contribution (LoRA by default; `method="fft"` for full fine-tuning; any
    `TrainConfig` field as a keyword) on `task` from `base`; save it at `out` and return its manifest."""
    from cairn.models import load_model
    from cairn.training import TrainConfig, train_contribution

    task = _task(task, load_model(base)[1] if chat_template else None, chat_template)
    return train_contribution(base, task, TrainConfig(**options), out, progress=progress)


def evaluate(model, task, *, split: str = "test", chat_template: bool = False, batch_size: int = 32, progress: bool = False):
    """Score `model` (a spec, or a loaded (model, tokenizer) pair) on `task`; returns the
    `EvalResult` (score and per-example predictions)."""
    from cairn.evaluation import evaluate_task
    from cairn.models import load_model

    model, tokenizer = model if isinstance(model, tuple) else load_model(str(model))
    return evaluate_task(model, tokenizer, _task(task, tokenizer, chat_template), split=split, batch_size=batch_size, progress=progress)


def merge(inputs: list, out: str | Path, *, base: str, method: str = "ties", weights: list[float] | None = None, adapter_rank: int | None = None, progress: bool = True, **options) -> dict:
    """Merge HF folders and/or PEFT adapters of `base` (see `MergeOptions`: density, lambda,
    normalize, seed) into `out`; returns the merge's statistics."""
    from cairn.methods.merge_models import merge_models
    from cairn.methods.merging import MergeOptions
    from cairn.models import resolve_folder

    opts = MergeOptions(method=method, **options)
    return merge_models(resolve_folder(base), list(inputs), out, opts, weights=weights, adapter_rank=adapter_rank, progress=progress, manifest={"base": base})


def mix(inputs: list, out: str | Path, *, base: str, router: str = "centroid", top_k: int = 2, tasks: list | None = None, shared: str = "base", progress: bool = True, **options) -> Path:
    """Mix LoRA adapters into a LoRA-MoE folder, or full fine-tunes into a Mixtral folder, at
    `out` (see `MoeOptions`; `tasks`: one labelled task per input, for `router="trained"`)."""
    from cairn.methods.moe import MoeOptions, attach_experts, save_moe, train_router
    from cairn.models import load_model, resolve_folder

    inputs = [Path(p) for p in inputs]
    opts = MoeOptions(router=router, top_k=top_k, **options)
    adapters = [(p / "adapter_config.json").is_file() for p in inputs]
    if any(adapters) and not all(adapters):
        raise ConfigError("inputs mix adapters and full models: a mixture is made of LoRA adapters (LoRA-MoE) or of full fine-tunes (Mixtral), not both")
    if (router == "trained") != bool(tasks):
        raise ConfigError("tasks (--tasks) go with router 'trained' (and only with it): one labelled task per input, to train the router on")
    if tasks and len(tasks) != len(inputs):
        raise ConfigError(f"{len(tasks)} tasks for {len(inputs)} inputs: give one task per input")
    if not all(adapters):
        from cairn.methods.mixtral import export_mixtral

        if router not in ("uniform", "centroid", "random"):
            raise ConfigError(f"full fine-tunes are mixed into a Mixtral model, whose router is uniform, centroid or random; got {router!r}")
        export_mixtral(resolve_folder(base), inputs, out, router=router, top_k=top_k, shared=shared, progress=progress)
        return Path(out)
    model, tokenizer = load_model(base)
    model = attach_experts(model, inputs, opts)
    if tasks:
        losses = train_router(model, tokenizer, [_task(t) for t in tasks], opts, progress=progress)
        opts_note = {"router_losses": [round(x, 4) for x in losses]}
    else:
        opts_note = {}
    save_moe(model, inputs, opts, Path(out), base=base, manifest=opts_note)
    return Path(out)
