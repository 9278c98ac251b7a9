"""The `opcm` strategy: per-task contributions from the base (as `merge`), merged continually by
orthogonal projection (methods/opcm.py); semi-collaborative."""

from __future__ import annotations

import copy
from typing import Iterator

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from cairn.methods.opcm import ContinualMerge
from cairn.options import OPCMOptions, TrainConfig
from cairn.workspace import Workspace


def run(model, stream, opts: OPCMOptions, cfg: TrainConfig, work: Workspace) -> Iterator:
    """Stage s: the contribution of task s, trained from the base (shared with `merge` and `moe`
    through the cache), folded into the running merge, which alone outlives it; yields θ_base + the
    merged task vector. LoRA contributions are merged into full weights first (their ΔW = scale·B·A)."""
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    weights = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    linear = {name for name in base if name in weights}
    merging = ContinualMerge(opts.alpha)
    names = []
    for task in stream:
        folder = work.contribution(model, task, cfg)
        names.append(folder.name)
        work.note(contributions=list(names))
        if (folder / "adapter_config.json").is_file():
            tuned = PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).merge_and_unload()
        else:
            tuned = AutoModelForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            tau = {name: p.detach().float() - base[name].float() for name, p in tuned.named_parameters()}
            del tuned
            merged_tv = merging.add(tau, linear)
            merged = copy.deepcopy(model)
            for name, p in merged.named_parameters():
                p.copy_(base[name] + merged_tv[name].to(p.dtype))
        work.note(opcm_scale=round(merging.scale, 6))
        yield merged.eval()
