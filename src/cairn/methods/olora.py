"""O-LoRA: each stage trains a new LoRA adapter kept orthogonal to the frozen earlier ones.

Stage s trains adapter `new` beside the stack of stages 1..s-1 (`prev`, frozen, active, not
merged) with loss = task loss + λ1 · O + λ2 · ‖new adapter‖₂ (Wang et al., 2023, orthogonality
against every earlier task's A, as the study ran it). O is by default the mean over adapted modules
of the mean entry of |A_new A_prevᵀ|, so λ1 means the same at any model size and rank; `raw: true`
keeps the paper's Σ_modules sum|A_new A_prevᵀ|, which on the bundled model (210 modules, r 16) is
≈ 54 000 times the mean and, at λ1 = 0.1, 7.5 times the task loss at the first step. The stages are then stored as one stacked PEFT adapter: A's concatenated by
rows and B's by columns, so its B·A is the sum of the stage deltas.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor

from cairn.options import OLoRAOptions, TrainConfig
from cairn.training import lora_config

PREV, NEW = "prev", "new"  # adapter names while a stage trains


def orthogonality_loss(a_new: list[Tensor], a_prev: list[Tensor], *, raw: bool = False) -> Tensor:
    """Mean over modules of mean(|A_new · A_prevᵀ|) (`raw`: the sum over modules of the sum): zero
    when every new row is orthogonal to every earlier one, i.e. the new adapter reads a subspace the
    earlier ones do not."""
    terms = [(new @ prev.T).abs() for new, prev in zip(a_new, a_prev, strict=True)]
    if not terms:
        return torch.zeros(())
    if raw:
        return torch.stack([t.sum() for t in terms]).sum()
    return torch.stack([t.mean() for t in terms]).mean()


def stack_lora(parts: list[tuple[Tensor, Tensor, float]], scale: float) -> tuple[Tensor, Tensor]:
    """One (A, B) from (A_i, B_i, scale_i) with scale · B·A = Σ scale_i · B_i·A_i: A's by rows,
    B's by columns, each B_i times scale_i / scale."""
    a = torch.cat([a for a, _, _ in parts], dim=0)
    b = torch.cat([b * (s / scale) for _, b, s in parts], dim=1)
    return a, b


def stacked_adapter(model, names: list[str]) -> tuple[object, dict[str, Tensor]]:
    """The `LoraConfig` and PEFT state dict of one adapter equal to the sum of `model`'s adapters
    `names`; it keeps the last adapter's scale (lora_alpha / r) with rank Σ r."""
    from peft.tuners.lora import LoraLayer

    last = model.peft_config[names[-1]]
    scale = last.lora_alpha / last.r
    state = {}
    for path, m in model.named_modules():
        if isinstance(m, LoraLayer) and names[-1] in m.lora_A:
            a, b = stack_lora([(m.lora_A[n].weight, m.lora_B[n].weight, m.scaling[n]) for n in names], scale)
            state[f"{path}.lora_A.weight"], state[f"{path}.lora_B.weight"] = a.detach().clone(), b.detach().clone()
    rank = sum(model.peft_config[n].r for n in names)
    return dataclasses.replace(last, r=rank, lora_alpha=scale * rank), state


def stack_stages(model, names: list[str]):
    """A fresh single-adapter PeftModel on `model`'s base holding its adapters `names` stacked."""
    from peft import get_peft_model, set_peft_model_state_dict

    config, state = stacked_adapter(model, names)
    stacked = get_peft_model(model.unload(), config)
    set_peft_model_state_dict(stacked, state)
    return stacked.eval()


def stage_model(base, prev: Path | None, cfg: TrainConfig, seed: int):
    """`base` with the frozen stacked adapter saved at `prev` (if any) and a fresh one, both active."""
    from peft import PeftModel, get_peft_model

    torch.manual_seed(seed)  # a different init per stage: equal inits would start A_new on A_prev
    if prev is None:
        return get_peft_model(base, lora_config(cfg, base), adapter_name=NEW)
    model = PeftModel.from_pretrained(base, str(prev), adapter_name=PREV)
    model.add_adapter(NEW, lora_config(cfg, base))
    model.base_model.set_adapter([PREV, NEW])
    return model


def penalty(model, opts: OLoRAOptions):
    """The `extra_loss` of a stage: λ1 · orthogonality to the earlier stages + λ2 · ‖new adapter‖₂."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and PREV in m.lora_A]
    a_new, a_prev = [m.lora_A[NEW].weight for m in layers], [m.lora_A[PREV].weight for m in layers]
    new = [p for name, p in model.named_parameters() if f".{NEW}." in name]

    def loss(_model) -> Tensor:
        total = opts.lambda1 * orthogonality_loss(a_new, a_prev, raw=opts.raw)
        if opts.lambda2:
            total = total + opts.lambda2 * torch.stack([p.norm() for p in new]).norm()
        return total

    return loss


def penalty_ratio(penalties: list[float], losses: list[float]) -> dict[str, float]:
    """The penalty over the task loss at a stage's first and last optimizer step, from each step's
    penalty and logged loss (task loss + penalty), as training records them (`TrainResult.extra_losses`,
    `losses`, kept across a resume). Exact: the penalty reads only weights, which change at optimizer
    steps, so all batches of a step share it."""
    def ratio(p: float, loss: float) -> float:
        return float(f"{p / max(loss - p, 1e-12):.4g}")

    return {"first": ratio(penalties[0], losses[0]), "last": ratio(penalties[-1], losses[-1])}
