"""The `merge` strategy: stage s is the merge of tasks 1..s's contributions, each trained from the
base on its own task (the contributions the `moe` strategy reuses). Semi-collaborative: a
contribution is all that outlives its task's data.

A merged model is not kept once loaded: it is a whole model on disk (0.5 GB for the bundled one,
16 GB at 8B, per stage and strategy, so a sweep's cache once filled a disk), and merging again from
the cached contributions takes seconds. Its scores stay cached: a merge is deterministic, so the
model it rebuilds has the same fingerprint. `cairn merge` writes a merged model to keep."""

from __future__ import annotations

import shutil
from typing import Iterator

from transformers import AutoModelForCausalLM

from cairn.distributed import barrier, is_main, main_writes
from cairn.manifest import read_manifest
from cairn.methods.merge.streaming import merge_models
from cairn.models import fingerprint, resolve_folder
from cairn.options import MergeOptions, TrainConfig
from cairn.workspace import Workspace


def run(model, stream, opts: MergeOptions, cfg: TrainConfig, work: Workspace) -> Iterator:
    base_dir = resolve_folder(work.base)
    made_from = {"base": work.base, "base_fingerprint": fingerprint(model)}
    contributions = []
    for task in stream:
        contributions.append(work.contribution(model, task, cfg))
        out = work.folder("merges", [c.name for c in contributions], opts.model_dump())
        # The check is the main process's too: another one could see the merge half-written.
        main_writes(lambda: read_manifest(out) is not None or merge_models(base_dir, contributions, out, opts, progress=work.progress, made_from=made_from))
        merged = AutoModelForCausalLM.from_pretrained(out).eval()
        barrier()  # every process has loaded it before it goes
        if is_main():
            shutil.rmtree(out)
        yield merged
