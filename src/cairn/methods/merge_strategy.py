"""The `merge` strategy: stage s is the merge of tasks 1..s's contributions, each trained from the
base on its own task (the contributions the `moe` strategy reuses). Semi-collaborative: a
contribution is all that outlives its task's data."""

from __future__ import annotations

from typing import Iterator

from cairn.distributed import main_writes
from cairn.methods.merge_models import merge_models
from cairn.methods.merging import MergeOptions
from cairn.models import resolve_folder
from cairn.store import read_manifest
from cairn.strategies import register


@register("merge", MergeOptions)
def merge(model, stream, opts: MergeOptions, cfg, work) -> Iterator:
    from transformers import AutoModelForCausalLM

    base_dir = resolve_folder(work.base)
    contributions = []
    for task in stream:
        contributions.append(work.contribution(model, task, cfg))
        out = work.folder("merges", [c.name for c in contributions], opts.model_dump())
        # The check is the main process's too: another one could see the merge half-written.
        main_writes(lambda: read_manifest(out) is not None or merge_models(base_dir, contributions, out, opts, progress=work.progress))
        yield AutoModelForCausalLM.from_pretrained(out).eval()
