"""L2-SP: a penalty pulling the trained weights back to the base model's (the starting point).

Loss = task loss + λ · Σ_i ‖θ_i − θ_base,i‖² over the trained weights θ_i (Li, Grandvalet &
Davoine, "Explicit inductive bias for transfer learning with convolutional networks", ICML 2018,
their Ω = α/2 · ‖w − w⁰‖² with λ = α/2; the `l2` baseline EasyCL and the TRACE study list beside
EWC).

For LoRA the whole delta from the base is the adapter itself: one adapter is carried through all
stages, so over each adapted weight W = W_base + s·B·A (s = lora_alpha / r) and the penalty reduces
to λ · Σ_modules ‖s·B·A‖²_F. It is computed as s² · Σ (BᵀB ⊙ AAᵀ) (the trace identity
‖BA‖²_F = tr(BᵀB · AAᵀ)), from r × r products instead of the out × in delta.
"""

from __future__ import annotations

import torch
from torch import Tensor


def l2_sp(params: list[Tensor], anchors: list[Tensor]) -> Tensor:
    """Σ ‖θ − θ_base‖² over paired tensors (computed in float32)."""
    terms = [(p.float() - a.float()).pow(2).sum() for p, a in zip(params, anchors, strict=True)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def lora_delta_sq_norm(a: Tensor, b: Tensor, scale: float) -> Tensor:
    """‖scale · B·A‖²_F from the r × r products: scale² · Σ (BᵀB ⊙ AAᵀ)."""
    a, b = a.float(), b.float()
    return scale**2 * ((b.T @ b) * (a @ a.T)).sum()


def lora_l2_sp(factors: list[tuple[Tensor, Tensor, float]]) -> Tensor:
    """Σ_modules ‖scale·B·A‖²_F over (A, B, scale) triples: L2-SP of a model whose delta from the base is its adapter."""
    terms = [lora_delta_sq_norm(a, b, s) for a, b, s in factors]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def penalty(base, lam: float, method: str):
    """The `extra_loss` of an L2-SP stage: λ · Σ‖θ − θ_base‖², `base` the model the stream started
    from (FFT: its weights are copied now, before training moves them; LoRA: unused, the adapter is
    the delta). The trained model is read where training calls the term."""
    if method == "lora":
        from peft.tuners.lora import LoraLayer

        def lora_loss(model) -> Tensor:
            factors = []
            for m in model.modules():
                if isinstance(m, LoraLayer):
                    for name in m.active_adapters:
                        if name in m.lora_A:
                            factors.append((m.lora_A[name].weight, m.lora_B[name].weight, m.scaling[name]))
            return lam * lora_l2_sp(factors)

        return lora_loss
    anchors = {name: p.detach().clone() for name, p in base.named_parameters()}

    def fft_loss(model) -> Tensor:
        pairs = [(p, anchors[name]) for name, p in model.named_parameters() if p.requires_grad]
        return lam * l2_sp([p for p, _ in pairs], [a for _, a in pairs])

    return fft_loss
