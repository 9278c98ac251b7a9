"""The `magmax` strategy: sequential fine-tuning, each stage evaluated as the base plus the
largest-magnitude entries of the stages' task vectors (methods/magmax.py); semi-collaborative."""

from __future__ import annotations

import copy
from typing import Iterator

import torch

from cairn.methods.magmax import magmax_update
from cairn.options import MagMaxOptions, TrainConfig
from cairn.workspace import Workspace


def run(model, stream, opts: MagMaxOptions, cfg: TrainConfig, work: Workspace) -> Iterator:
    """The sequential chain is `sequential`'s (LoRA: each adapter merged, a fresh one per stage), so
    its stages are shared with it through the cache; stage s yields θ_base + λ · magmax(τ_1..τ_s),
    a copy, while the chain goes on from θ_s. Holds the base, the running selection and two models."""
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    selected: dict[str, torch.Tensor] = {}
    for task in stream:
        model = work.train(model, task, cfg)
        if cfg.method == "lora":
            model = model.merge_and_unload()
        with torch.no_grad():
            for name, p in model.named_parameters():
                tau = p.detach() - base[name]
                selected[name] = tau if name not in selected else magmax_update(selected[name], tau)
            merged = copy.deepcopy(model)
            for name, p in merged.named_parameters():
                p.copy_(base[name] + opts.lambda_ * selected[name])
        yield merged.eval()
