"""The `moe` strategy: stage s mixes the contributions of tasks 1..s, each trained independently
from the base (the same contributions `merge` reuses). LoRA contributions become a LoRA-MoE;
full fine-tunes become a Mixtral model. Semi-collaborative unless the router is `trained`."""

from __future__ import annotations

import copy
from typing import Iterator

from cairn.distributed import main_writes
from cairn.errors import ConfigError
from cairn.methods import centroids
from cairn.methods.moe import MoeOptions, attach_experts, train_router
from cairn.store import read_manifest
from cairn.strategies import register


def routing_statistics(work, model, contribution, task) -> dict:
    """The statistics shipped with `contribution` or, for one saved without them, computed now
    from its own task's prompts (the stage still holds that task's data) and cached."""
    if (contribution / centroids.FILE).is_file():
        return centroids.load(contribution)
    from cairn.methods.merge_models import read_lora

    folder = work.folder("centroids", contribution.name, "read by the base")

    def compute():
        if not (folder / centroids.FILE).is_file():
            stats = centroids.input_statistics(model, work.tokenizer, [ex.prompt for ex in task.train], sorted(read_lora(contribution)))
            folder.mkdir(parents=True, exist_ok=True)
            centroids.save(stats, folder, len(task.train))

    main_writes(compute)
    return centroids.load(folder)


def _fits(opts: MoeOptions, cfg) -> None:
    """Full fine-tunes are mixed into a Mixtral model, which has fewer routers and options."""
    if cfg.method == "fft":
        opts.check_for_mixtral()


@register("moe", MoeOptions, needs_history=lambda opts: opts.router == "trained", fits=_fits)
def moe(model, stream, opts: MoeOptions, cfg, work) -> Iterator:
    if cfg.method == "fft":
        yield from _mixtral(model, stream, opts, cfg, work)
        return
    trained = opts.router == "trained"
    experts, stats = [], []
    for item in stream:
        task, earlier = item if trained else (item, [])
        experts.append(work.contribution(model, task, cfg))
        if opts.router == "centroid":
            stats.append(routing_statistics(work, model, experts[-1], task))
        mixed = attach_experts(copy.deepcopy(model), experts, opts, stats or None)
        if trained:
            losses = train_router(mixed, work.tokenizer, [*earlier, task], opts, progress=work.progress)
            work.note(router_losses=[round(x, 4) for x in losses])
        yield mixed


def _mixtral(model, stream, opts: MoeOptions, cfg, work) -> Iterator:
    from transformers import AutoModelForCausalLM

    from cairn.methods.mixtral import export_mixtral
    from cairn.models import resolve_folder

    opts.check_for_mixtral()
    base_dir = resolve_folder(work.base)
    experts = []
    for task in stream:
        experts.append(work.contribution(model, task, cfg))
        if opts.router == "centroid" and not (experts[-1] / centroids.FILE).is_file():
            raise ConfigError(f"{experts[-1]} has no routing statistics; retrain it with this version of Cairn")
        out = work.folder("mixtral", [e.name for e in experts], opts.model_dump())
        main_writes(
            lambda: read_manifest(out) is not None
            or export_mixtral(base_dir, experts, out, router=opts.router, top_k=min(opts.top_k, len(experts)), seed=opts.seed, progress=work.progress)
        )
        yield AutoModelForCausalLM.from_pretrained(out).eval()
