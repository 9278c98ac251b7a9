"""Why a mixture routes as it does: how alike its experts' arrow prototypes are, and how often
each expert's own prompts are routed to it."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from cairn.data.batching import left_padded, pad_id
from cairn.errors import DataError, ModelError
from cairn.methods.moe.arrow import arrow_layers, arrow_weights, general_adapters
from cairn.methods.moe.routing import routers
from cairn.weights.adapters import read_lora


def arrow_prototype(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The top right-singular vector of ΔW = B·A (unit length, sign arbitrary), from the r x in
    matrix R·A where B = Q·R: ΔW and R·A share right-singular vectors and singular values (what
    PEFT's Arrow approximates by power iteration)."""
    _, r = torch.linalg.qr(b.double())
    return torch.linalg.svd(r @ a.double(), full_matrices=False).Vh[0].float()


def _factors(folder) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {m: (torch.from_numpy(a), torch.from_numpy(b)) for m, (a, b, _s, _t) in read_lora(folder).items()}


def prototypes(experts: list[Path], general: str | None = None) -> dict[str, torch.Tensor]:
    """module -> (E, in): each expert's arrow prototype, for the modules every expert adapts;
    with `general` (MoeOptions.general), after PEFT's GenKnowSub (Aₖ − mean A_g, Bₖ − mean B_g)."""
    adapters = [_factors(e) for e in experts]
    mean = [_factors(g) for g in general_adapters(experts, general)]
    out = {}
    for module in sorted(set.intersection(*(set(a) for a in adapters))):
        parts = [ad[module] for ad in adapters]
        if mean:
            a_g = torch.stack([g[module][0] for g in mean]).mean(0)
            b_g = torch.stack([g[module][1] for g in mean]).mean(0)
            parts = [(a - a_g, b - b_g) for a, b in parts]
        out[module] = torch.stack([arrow_prototype(a, b) for a, b in parts])
    return out


def prototype_similarity(experts: list[Path], general: str | None = None) -> dict:
    """How parallel the experts' prototypes are, |cos| over every pair of experts at every module
    they all adapt: `mean_abs_cos`, `share_above_0.5` (of module-pairs) and `by_layer` (layer index,
    from `layers.N.` in the module name, -> mean |cos| over its modules' pairs). Near-parallel
    prototypes give every expert the same arrow score: routing cannot tell the tasks apart."""
    if len(experts) < 2:
        raise ModelError(f"prototype similarity compares experts; got {len(experts)}")
    protos = prototypes(experts, general)
    if not protos:
        raise ModelError(f"experts {', '.join(map(str, experts))} adapt no module in common")
    pairs = torch.triu_indices(len(experts), len(experts), offset=1)
    cos = {m: (v @ v.T).abs()[pairs[0], pairs[1]] for m, v in protos.items()}  # prototypes are unit vectors
    every = torch.cat(list(cos.values()))
    layers: dict[str, list[torch.Tensor]] = {}
    for m, c in cos.items():
        found = re.search(r"layers\.(\d+)\.", m)
        layers.setdefault(found.group(1) if found else m, []).append(c)
    return {
        "mean_abs_cos": round(float(every.mean()), 4),
        "share_above_0.5": round(float((every > 0.5).double().mean()), 4),
        "by_layer": {k: round(float(torch.cat(v).mean()), 4) for k, v in sorted(layers.items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0, kv[0]))},
    }


def _weight_hooks(model, record):
    """Forward hooks that pass every routed layer's mixture weights (batch, length or 1, E) to
    `record`: Cairn's routers (the centroid survey's pass excluded) and PEFT's Arrow layers."""
    handles = []
    for r in routers(model).values():
        handles.append(r.register_forward_hook(lambda m, _a, out: None if m.context.surveying else record(out)))
    for layer in arrow_layers(model).values():
        handles.append(layer.register_forward_hook(lambda m, args, _out: record(arrow_weights(m, args[0]))))
    if not handles:
        raise ModelError("routing_accuracy needs a mixture (cairn.methods.moe.lora_moe.attach_experts or load_moe); this model routes nothing")
    return handles


@torch.no_grad()
def routing_accuracy(model, tokenizer, prompts_by_expert: list[list[str]], *, batch_size: int = 8, max_length: int = 512) -> list[float]:
    """For each expert k, the fraction of its prompts `prompts_by_expert[k]` that the mixture
    `model` routes to k: expert k's weight, averaged over every routed module and over the
    prompt's tokens (per-token routers; a prompt-level router gives one weight per prompt), is
    strictly the largest (ties, e.g. the uniform router, and prompts left to the base count as
    misses). One forward pass per batch over the prompts alone (left-padded, each cut to its last
    `max_length` tokens, as generation reads them); nothing is generated."""
    if any(not p for p in prompts_by_expert):
        raise DataError(f"routing_accuracy: expert {[k for k, p in enumerate(prompts_by_expert) if not p][0]} has no prompts")
    seen: list[torch.Tensor] = []
    mask_now: list[torch.Tensor] = []

    def record(w):
        m = mask_now[0] if w.shape[1] == mask_now[0].shape[1] else torch.ones(w.shape[:2], device=w.device)
        m = m.to(w.device, w.dtype).unsqueeze(-1)
        seen.append(((w * m).sum(1) / m.sum(1).clamp_min(1)).float().cpu())

    handles = _weight_hooks(model, record)
    device = next(model.parameters()).device
    pad, was_training = pad_id(tokenizer), model.training
    model.eval()
    try:
        accuracy = []
        for k, prompts in enumerate(prompts_by_expert):
            hits = 0
            for i in range(0, len(prompts), batch_size):
                encoded = [tokenizer(p, add_special_tokens=True)["input_ids"][-max_length:] for p in prompts[i : i + batch_size]]
                ids, mask = left_padded(encoded, pad)
                seen.clear()
                mask_now[:] = [mask.to(device)]
                model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=(mask.cumsum(-1) - 1).clamp_min(0).to(device))
                w = torch.stack(seen).mean(0)  # (batch, E)
                if w.shape[-1] != len(prompts_by_expert):
                    raise ModelError(f"routing_accuracy: the mixture has {w.shape[-1]} experts, prompts were given for {len(prompts_by_expert)}")
                others = torch.cat([w[:, :k], w[:, k + 1 :]], -1)
                hits += int((w[:, k] > (others.max(-1).values if others.numel() else 0)).sum())
            accuracy.append(hits / len(prompts))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return accuracy
