"""The `merge` strategy: stage s is the merge of tasks 1..s's contributions, each trained from the
base on its own task (the contributions the `moe` strategy reuses). Semi-collaborative: a
contribution is all that outlives its task's data.

A merged model is not kept once loaded: it is a whole model on disk (0.5 GB for the bundled one,
16 GB at 8B, per stage and strategy, so a sweep's cache once filled a disk), and merging again from
the cached contributions takes seconds. Its scores stay cached: a merge is deterministic, so the
model it rebuilds has the same fingerprint. `cairn merge` writes a merged model to keep.

With `combine: factors` a stage is the base with the merged adapter (a PeftModel). Each stage row
records its contributions and, for LoRA ones, their interference (methods/merge/interference.py)."""

from __future__ import annotations

import shutil
from typing import Iterator

from peft import PeftModel
from transformers import AutoModelForCausalLM

from cairn.distributed import barrier, is_main, main_writes
from cairn.manifest import read_manifest
from cairn.methods.merge.interference import interference
from cairn.methods.merge.streaming import merge_models
from cairn.models import fingerprint, resolve_folder
from cairn.options import MergeOptions, TrainConfig
from cairn.weights.adapters import read_lora
from cairn.workspace import Workspace


# Methods that merge two inputs or more (as mergekit's): at stage 1 the merge of the one
# contribution is that contribution (its average), so that a stream's first stage has a model.
PAIRS = ("model_stock", "nuslerp")


def run(model, stream, opts: MergeOptions, cfg: TrainConfig, work: Workspace) -> Iterator:
    base_dir = resolve_folder(work.base)
    made_from = {"base": work.base, "base_fingerprint": fingerprint(model)}
    contributions = []
    for task in stream:
        contributions.append(work.contribution(model, task, cfg))
        work.note(contributions=[c.name for c in contributions])
        if all((c / "adapter_config.json").is_file() for c in contributions):
            work.note(interference=interference([read_lora(c) for c in contributions]))
        out = work.folder("merges", [c.name for c in contributions], opts.model_dump())
        # The check is the main process's too: another one could see the merge half-written.
        stage_opts = MergeOptions(method="average") if len(contributions) == 1 and opts.method in PAIRS else opts
        if stage_opts is not opts:
            work.note(merged_as="average: one contribution")
        main_writes(lambda: read_manifest(out) is not None or merge_models(base_dir, contributions, out, stage_opts, progress=work.progress, made_from=made_from))
        if opts.combine == "factors":
            merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(out)).eval()
        else:
            merged = AutoModelForCausalLM.from_pretrained(out).eval()
        barrier()  # every process has loaded it before it goes
        if is_main():
            shutil.rmtree(out)
        yield merged
