"""The `moe` strategy: stage s mixes the contributions of tasks 1..s, each trained independently
from the base (the same contributions `merge` reuses). LoRA contributions become a LoRA-MoE;
full fine-tunes become a Mixtral model. Semi-collaborative unless the router is `trained`.
From the second LoRA stage on, the stage row notes how parallel the experts' arrow prototypes are
(`prototypes`: methods/moe/diagnostics.prototype_similarity), which bounds what arrow can route."""

from __future__ import annotations

import copy
from typing import Iterator

from transformers import AutoModelForCausalLM

from cairn.distributed import main_writes
from cairn.errors import ConfigError
from cairn.manifest import read_manifest
from cairn.methods.moe import statistics
from cairn.methods.moe.diagnostics import prototype_similarity
from cairn.methods.moe.lora_moe import attach_experts
from cairn.methods.moe.mixtral import export_mixtral
from cairn.methods.moe.router_training import train_router
from cairn.models import fingerprint, resolve_folder
from cairn.options import MoeOptions, TrainConfig
from cairn.weights.adapters import read_lora
from cairn.workspace import Workspace


def routing_statistics(work: Workspace, model, contribution, task) -> dict:
    """The statistics shipped with `contribution` or, for one saved without them, computed now
    from its own task's prompts (the stage still holds that task's data) and cached."""
    if (contribution / statistics.FILE).is_file():
        return statistics.load(contribution)
    folder = work.folder("centroids", contribution.name, "read by the base")

    def compute():
        if not (folder / statistics.FILE).is_file():
            stats = statistics.input_statistics(model, work.tokenizer, [ex.prompt for ex in task.train], sorted(read_lora(contribution)))
            folder.mkdir(parents=True, exist_ok=True)
            statistics.save(stats, folder, len(task.train))

    main_writes(compute)
    return statistics.load(folder)


def run(model, stream, opts: MoeOptions, cfg: TrainConfig, work: Workspace) -> Iterator:
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
        work.note(contributions=[e.name for e in experts])
        if len(experts) > 1:
            work.note(prototypes=prototype_similarity(experts, opts.general))
        mixed = attach_experts(copy.deepcopy(model), experts, opts, stats or None)
        if trained:
            losses = train_router(mixed, work.tokenizer, [*earlier, task], opts, progress=work.progress)
            work.note(router_losses=[round(x, 4) for x in losses])
        yield mixed


def _mixtral(model, stream, opts: MoeOptions, cfg: TrainConfig, work: Workspace) -> Iterator:
    opts.check_for_mixtral()
    base_dir = resolve_folder(work.base)
    made_from = {"base": work.base, "base_fingerprint": fingerprint(model)}
    experts = []
    for task in stream:
        experts.append(work.contribution(model, task, cfg))
        work.note(contributions=[e.name for e in experts])
        if opts.router == "centroid" and not (experts[-1] / statistics.FILE).is_file():
            raise ConfigError(f"{experts[-1]} has no routing statistics; retrain it with this version of Cairn")
        out = work.folder("mixtral", [e.name for e in experts], opts.model_dump())
        main_writes(
            lambda: read_manifest(out) is not None
            or export_mixtral(base_dir, experts, out, router=opts.router, top_k=min(opts.top_k, len(experts)), seed=opts.seed, progress=work.progress, made_from=made_from)
        )
        yield AutoModelForCausalLM.from_pretrained(out).eval()
