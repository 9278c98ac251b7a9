"""Mixing LoRA contributions into a mixture of experts (LoRA-MoE).

Every adapted linear layer becomes y = W·x + Σₖ gₖ(x) · sₖ·Bₖ·(Aₖ·x): the experts' deltas are
applied low-rank (two thin matmuls over the stacked A's and B's, never ΔW itself), weighted by
that layer's router. Routers (`MoeOptions.router`; each a class of methods/moe/routing.py):

- `uniform`   every expert at weight 1/E (gateless mixing; `top_k` does not apply);
- `arrow`     PEFT's Arrow (methods/moe/arrow.py), zero-shot from the adapters, per token: expert
              k's prototype vₖ is the top right-singular vector of its ΔW; a token scores
              |x·vₖ| / T, softmax over the top k; optionally GenKnowSub (`general`). The mixture
              is PEFT's model (a PeftModel), not this module's layers;
- `centroid`  from the routing statistics each contributor ships (methods/moe/statistics.py: mean cₖ
              and per-dimension variance σₖ² of its prompts' inputs to the layer); expert k scores
              −dₖ/T with dₖ(x) = mean over dimensions of (x − cₖ)²/σ̄² (≈ 1 on its own prompts),
              σ̄² the experts' pooled variance (as linear discriminant analysis pools it: measured
              on the quickstart packs, it routes 94% of the countries pack's test prompts right
              where each expert's own variance routes 50%; the other packs 100% either way),
              and the base model itself competes as a null expert scoring −`threshold`/T, so a
              prompt unlike every contributor's is left to the base. The statistics describe how
              the base model reads each contributor's prompts, and a prompt is routed the same
              way: a survey pass of the base model alone (experts off, no cache) collects dₖ at
              every adapted module and the mixture uses their mean at every layer. One module's
              distances separate tasks weakly; their mean does (measured on the quickstart packs:
              own-pack test prompts 1.0–1.2, the general probe 5.6, each on average);
- `trained`   a linear router per layer, trained with the experts frozen on a small labelled
              mixture of the tasks (fully-collaborative only), see methods/moe/router_training.py;
- `random`    the same linear router at its seeded initialisation, untrained (a control).

`granularity: sequence` (default) routes a whole prompt at once: a layer scores the mean of the
prompt's inputs to it, and generated tokens keep the prompt's routing (a contributor's expert is
one task, so one decision per prompt is both steadier and cheaper). `token` scores each token.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from cairn.errors import ModelError
from cairn.io import atomic_dir, read_json_object
from cairn.manifest import contribution_manifest, tasks_of
from cairn.methods.moe.arrow import attach_arrow
from cairn.methods.moe.statistics import FILE as STATISTICS_FILE
from cairn.methods.moe.statistics import load as load_statistics
from cairn.methods.moe.routing import ROUTER_CLASSES, Router, RoutingContext, routers
from cairn.options import MoeOptions
from cairn.weights.adapters import read_lora

MANIFEST = "moe.json"
GENERAL = "general"  # GenKnowSub's general adapter, when one was given


class LoraExperts(nn.Module):
    """A linear layer plus its experts' low-rank deltas, mixed by `router`."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, router: Router):
        super().__init__()
        self.base, self.router = base, router
        self.n, self.rank = scale.numel(), a.shape[1]
        self.register_buffer("a", a.reshape(-1, a.shape[-1]).contiguous())  # (E·r, in)
        self.register_buffer("b", b.permute(0, 2, 1).reshape(-1, b.shape[1]).contiguous())  # (E·r, out)
        self.register_buffer("scale", scale.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.router(x) * self.scale  # (..., E), broadcast over tokens for sequence routing
        if self.router.context.surveying:
            return self.base(x)
        h = (x @ self.a.T).unflatten(-1, (self.n, self.rank))  # (..., E, r)
        return self.base(x) + (h * g.unsqueeze(-1)).flatten(-2) @ self.b


# --- building -------------------------------------------------------------------------------------


def _read_adapter(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module -> (A, B, scale) of a PEFT LoRA adapter, B·A laid out as the module's (out, in)."""
    out = {}
    for m, (a, b, s, transposed) in read_lora(folder).items():
        if transposed:
            raise ModelError(f"{folder}: fan_in_fan_out adapters (Conv1D layers) cannot be mixed; LoRA-MoE mixes nn.Linear layers")
        out[m] = (torch.from_numpy(a), torch.from_numpy(b), s)
    return out


def _stack(parts: list[tuple[torch.Tensor, torch.Tensor, float] | None], width_in: int, width_out: int):
    """Stacked A (E, r, in), B (E, out, r), scales (E,); experts without this module (or of lower
    rank) are padded with zeros, which adds nothing to the output."""
    rank = max(p[0].shape[0] for p in parts if p is not None)
    a, b = torch.zeros(len(parts), rank, width_in), torch.zeros(len(parts), width_out, rank)
    scale = torch.zeros(len(parts))
    for k, p in enumerate(parts):
        if p is not None:
            r = p[0].shape[0]
            a[k, :r], b[k, :, :r], scale[k] = p[0], p[1], p[2]
    return a, b, scale


def attach_experts(model, experts: list[Path], opts: MoeOptions, statistics: list[dict[str, torch.Tensor]] | None = None):
    """Turn `model` (the base, modified in place) into the LoRA-MoE of the adapters `experts`.

    `statistics`: each expert's routing statistics (centroid router; default: read from each
    adapter folder). Router `arrow` returns PEFT's Arrow model instead (methods/moe/arrow.py)."""
    if opts.router == "arrow":
        return attach_arrow(model, experts, opts)
    adapters = [_read_adapter(Path(e)) for e in experts]
    if opts.router == "centroid" and statistics is None:
        statistics = [load_statistics(e) for e in experts]
    context = RoutingContext(survey=opts.router == "centroid" and opts.granularity == "sequence")
    modules = sorted({m for ad in adapters for m in ad})
    for module in modules:
        try:
            layer = model.get_submodule(module)
        except AttributeError as exc:
            raise ModelError(f"adapter module {module!r} is not in the base model: were the experts trained on this base?") from exc
        if not isinstance(layer, nn.Linear):
            raise ModelError(f"adapter module {module!r} is a {type(layer).__name__}; LoRA-MoE mixes linear layers only")
        parts = [ad.get(module) for ad in adapters]
        for k, p in enumerate(parts):
            if p is not None and (p[0].shape[1], p[1].shape[0]) != (layer.in_features, layer.out_features):
                raise ModelError(f"{experts[k]}: module {module!r} has shape {tuple(p[1].shape)}x{tuple(p[0].shape)}, the base layer is {layer.out_features}x{layer.in_features}")
        a, b, scale = _stack(parts, layer.in_features, layer.out_features)
        kind = ROUTER_CLASSES[opts.router]
        router = kind(opts, len(experts), layer.in_features, context, kind.tensors(module, a, b, statistics, experts))
        parent, _, leaf = module.rpartition(".")
        setattr(model.get_submodule(parent), leaf, LoraExperts(layer, a, b, scale, router))
    model.get_decoder().register_forward_pre_hook(context.hook, with_kwargs=True)  # the decoder: training calls it directly
    model.reads_whole_prompt = opts.granularity == "sequence"  # generation must not split a prompt (no shared prefix cache)
    model.config.cairn_moe = {"experts": len(experts), **opts.model_dump()}  # enters the model's fingerprint
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --- saving and loading -------------------------------------------------------------------------------


def save_moe(model, experts: list[Path], opts: MoeOptions, out: Path, *, made_from: dict, details: dict | None = None) -> dict:
    """A LoRA-MoE folder: `moe.json` (base, options, experts), the expert adapters (with their
    routing statistics) under `experts/K/`, the routers' tensors in `router.safetensors` (none for
    `arrow`, whose router PEFT rebuilds from the experts), GenKnowSub's general adapter given as a
    folder under `general/`, and its manifest (`made_from`: base, base_fingerprint; `details`: e.g. a trained router's losses), which
    it returns."""
    from safetensors.torch import save_file

    with atomic_dir(Path(out)) as tmp:
        names = []
        for k, src in enumerate(experts):
            dst = tmp / "experts" / str(k)
            dst.mkdir(parents=True)
            for f in ("adapter_config.json", "adapter_model.safetensors", STATISTICS_FILE):
                if (Path(src) / f).is_file():
                    shutil.copy2(Path(src) / f, dst / f)
            names.append(str(src))
        if opts.general not in (None, "mean"):
            (tmp / GENERAL).mkdir()
            for f in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copy2(Path(opts.general) / f, tmp / GENERAL / f)
        if opts.router != "arrow":
            state = {f"{name}.{k}": v.contiguous() for name, r in routers(model).items() for k, v in r.state_dict().items()}
            save_file(state, tmp / "router.safetensors", metadata={"format": "pt"})
        (tmp / MANIFEST).write_text(json.dumps({"schema": 1, "base": made_from["base"], "options": opts.model_dump(), "experts": names}, indent=2) + "\n")
        mix = {"router": opts.router, "options": opts.model_dump(), "experts": names, **(details or {})}
        return contribution_manifest(tmp, "mix", mix, kind="moe", task=tasks_of(experts), method=f"moe-{opts.router}", made_from=made_from)


def _info(folder: Path) -> tuple[dict, MoeOptions]:
    info = read_json_object(folder / MANIFEST, "a Cairn MoE manifest", ModelError)
    try:
        return info, MoeOptions(**info["options"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{folder}/{MANIFEST}: not a Cairn MoE manifest ({exc})") from exc


def moe_base(folder: Path) -> str:
    """The base-model spec a saved LoRA-MoE was built on."""
    return str(_info(Path(folder))[0].get("base"))


def load_moe(folder: Path, base_model):
    """The LoRA-MoE saved at `folder`, built on `base_model` (its base, loaded by the caller)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    _, opts = _info(folder)
    experts = sorted((p for p in (folder / "experts").iterdir() if p.is_dir()), key=lambda p: int(p.name))
    if (folder / GENERAL).is_dir():
        opts = opts.model_copy(update={"general": str(folder / GENERAL)})
    model = attach_experts(base_model, experts, opts)
    if opts.router == "arrow":
        return model
    state = load_file(folder / "router.safetensors")
    for name, r in routers(model).items():
        r.load_state_dict({k.removeprefix(f"{name}."): v for k, v in state.items() if k.startswith(f"{name}.")})
    return model

