"""The `arrow` router: PEFT's Arrow (`peft.create_arrow_model`), with PEFT's GenKnowSub.

PEFT loads every expert adapter on the base and adds an `arrow_router` adapter whose layers route
each token: expert k's prototype vₖ is the top right-singular vector of its ΔWₖ = Bₖ·Aₖ (power
iteration from a seeded start: `MoeOptions.seed`), a token x scores |x·vₖ| (the raw dot product,
not the cosine), and the `top_k` best are mixed with softmax(score / T). Per token only, so
`granularity: sequence` is refused (MoeOptions).

GenKnowSub (`MoeOptions.general`): PEFT subtracts the mean general adapter from each expert's
factors, Aₖ ← Aₖ − mean(A_g), Bₖ ← Bₖ − mean(B_g) (factor-wise, not ΔW-wise), before it builds
the prototypes; the subtracted experts are also the ones mixed. `general: mean` takes the experts
themselves as the general adapters; a path names one adapter (e.g. trained on probe or replay
data). With a single expert and `general: mean` the expert is zero: the mixture is the base.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cairn.errors import ModelError
from cairn.options import MoeOptions


def general_adapters(experts: list[Path], general: str | None) -> list[str]:
    """The adapters PEFT's GenKnowSub averages: none, the experts (`mean`), or the one folder given."""
    if general is None:
        return []
    if general == "mean":
        return [str(e) for e in experts]
    if not (Path(general) / "adapter_config.json").is_file():
        raise ModelError(f"general: {general} is not a LoRA adapter folder (no adapter_config.json); give 'mean' or an adapter's folder")
    return [str(general)]


def attach_arrow(model, experts: list[Path], opts: MoeOptions):
    """PEFT's Arrow model over `model` (the base, modified in place) and the adapters `experts`:
    a PeftModel whose active adapter `arrow_router` routes each token among them."""
    from peft import ArrowConfig, create_arrow_model

    general = general_adapters(experts, opts.general)
    config = ArrowConfig(top_k=min(opts.top_k, len(experts)), router_temperature=opts.router_temperature(), use_gks=bool(general), rng_seed=opts.seed)
    try:
        mixed = create_arrow_model(model, [str(e) for e in experts], config, general_adapter_paths=general or None)
    except (ValueError, TypeError) as exc:  # PEFT's own checks: one rank, one set of linear modules
        names = ", ".join(map(str, [*experts, *([] if opts.general == "mean" else general)]))
        raise ModelError(f"router arrow (PEFT's Arrow) cannot mix {names}: {exc}") from exc
    mixed.reads_whole_prompt = False  # routes each token: generation may share a prefix
    mixed.config.cairn_moe = {"experts": len(experts), **opts.model_dump()}  # enters the model's fingerprint
    for p in mixed.parameters():
        p.requires_grad_(False)
    return mixed


def arrow_layers(model) -> dict[str, torch.nn.Module]:
    """module name (the base model's) -> PEFT's ArrowLoraLinearLayer routing it, for every layer Arrow routes."""
    return {name.removeprefix("base_model.model.").removesuffix(".lora_arrow.arrow_router"): m for name, m in model.named_modules() if name.endswith("lora_arrow.arrow_router")}


def arrow_weights(layer, x: torch.Tensor) -> torch.Tensor:
    """(..., in) -> (..., E): the mixture weights PEFT's ArrowLoraLinearLayer `layer` gives the
    tokens x (its prototypes built, i.e. after a forward pass): softmax over the top k of |x·vₖ| / T."""
    sim = (x.to(layer.prototypes.dtype) @ layer.prototypes.T).abs()
    top = sim.topk(layer.top_k, dim=-1)
    return torch.zeros_like(sim).scatter(-1, top.indices, (top.values / layer.temperature).softmax(-1))
