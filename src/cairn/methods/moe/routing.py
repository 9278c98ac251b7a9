"""Routing: every router of Cairn's mixtures, LoRA-MoE and Mixtral export alike, and the pure math they share."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cairn.errors import ModelError
from cairn.methods.moe.statistics import pooled
from cairn.options import ROUTERS, TEMPERATURE, MoeOptions


def topk_weights(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Mixture weights over the last dimension (experts): the softmax of the `k` largest logits,
    zero elsewhere. Equals Mixtral's softmax-then-top-k-then-renormalise, computed in one step."""
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, top.indices, top.values.softmax(-1))


class RoutingContext:
    """What every router of one model shares: the prompt being prefilled, and for the `centroid`
    router the decision its survey of the prompt reached.

    Set by a pre-hook on the decoder's forward; a call whose input is as long as its mask is a
    prefill (or a training batch), a shorter one is a decoding step that keeps the routing."""

    def __init__(self, survey: bool = False):
        self.mask: torch.Tensor | None = None
        self.prefill = True
        self.override: torch.Tensor | None = None  # training: pool over the prompt tokens only
        self.survey = survey  # centroid routing: read the prompt with the experts off first
        self.surveying = False
        self.evidence: torch.Tensor | None = None  # the survey's distances, summed over routers
        self.reports = 0

    def hook(self, module, args, kwargs):
        if self.surveying:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask")
        self.prefill = mask is None or ids is None or mask.shape[1] == ids.shape[1]
        if not self.prefill:
            return
        self.mask = mask if self.override is None else self.override
        self.evidence, self.reports = None, 0
        if self.survey:  # one pass of the base model alone (no cache): every router reports
            self.surveying = True
            try:
                quiet = {k: None for k in ("cache", "past_key_values") if k in kwargs}  # the KV cache is the real pass's
                with torch.no_grad():
                    module(*args, **{**kwargs, **quiet, "use_cache": False})
            finally:
                self.surveying = False

    def report(self, d: torch.Tensor) -> None:
        self.evidence = d if self.evidence is None else self.evidence + d
        self.reports += 1

    def distances(self) -> torch.Tensor:
        """The survey's verdict: each expert's distance averaged over every adapted module."""
        return self.evidence / self.reports


def centroid_distances(x: torch.Tensor, means: torch.Tensor, inv_var: torch.Tensor) -> torch.Tensor:
    """(..., width) -> (..., E): each expert's mean over dimensions of (x − cₖ)²/σ̄², ≈ 1 on its own prompts."""
    return ((x.unsqueeze(-2) - means).pow(2) * inv_var).mean(-1)


def pooled_variance_inverse(variances: list[torch.Tensor]) -> torch.Tensor:
    """1/σ̄² of the experts' pooled variance (as linear discriminant analysis pools it), floored so
    that a dimension that never varied does not divide by 0."""
    var = torch.stack(variances).mean(0)
    return 1.0 / var.clamp_min(1e-6 * var.mean() + 1e-12)


class Router(nn.Module):
    """One layer's router: its inputs -> mixture weights over its E experts (..., E).

    A subclass gives `weights(x)` for inputs x (..., width), and `tensors(...)` for what it is
    built from; this class routes a whole prompt at once (`granularity: sequence`: the weights of
    the mean of the prompt's inputs, kept while the prompt's answer is generated) or each token."""

    def __init__(self, opts: MoeOptions, n: int, width: int, context: RoutingContext, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.n, self.top_k, self.temperature = n, opts.top_k, opts.router_temperature()
        self.sequence = opts.granularity == "sequence"
        self.context = context
        self.cached: torch.Tensor | None = None
        for name, t in tensors.items():
            self.register_buffer(name, t.float())

    @staticmethod
    def tensors(module: str, a: torch.Tensor, b: torch.Tensor, statistics: list[dict] | None, experts: list) -> dict[str, torch.Tensor]:
        """The buffers this router of `module` is built from: its experts' stacked A (E, r, in) and
        B (E, out, r), their routing statistics, their folders (for messages)."""
        return {}

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sequence:
            return self.weights(x)
        if self.context.surveying:
            return self.weights(pooled(x, self.context.mask)).unsqueeze(1)
        if self.context.prefill or self.cached is None or self.cached.shape[0] != x.shape[0]:
            mask = self.context.mask
            mask = mask if mask is not None and mask.shape[:2] == x.shape[:2] else None
            self.cached = self.weights(pooled(x, mask)).unsqueeze(1)
        return self.cached


class UniformRouter(Router):
    """Every expert at weight 1/E: gateless mixing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weights(x)  # the same for every input: nothing to pool

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_full((*x.shape[:-1], self.n), 1.0 / self.n)


class CentroidRouter(Router):
    """From each contributor's routing statistics: −dₖ/T with the base model as a null expert at
    −`threshold`/T; routing by prompt, it routes by the survey's distances averaged over layers."""

    def __init__(self, opts: MoeOptions, n: int, width: int, context: RoutingContext, tensors: dict[str, torch.Tensor]):
        super().__init__(opts, n, width, context, tensors)
        self.threshold = opts.threshold

    @staticmethod
    def tensors(module, a, b, statistics, experts):
        for k, stats in enumerate(statistics):
            if f"{module}.mean" not in stats:
                raise ModelError(f"{experts[k]}: its routing statistics lack module {module!r} (computed for another adapter?)")
        return {"means": torch.stack([s[f"{module}.mean"] for s in statistics]), "inv_var": pooled_variance_inverse([s[f"{module}.var"] for s in statistics])}

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence and not self.context.surveying:
            d = self.context.distances()  # the survey's verdict, the same at every layer
        else:
            d = centroid_distances(x, self.means, self.inv_var)
            if self.context.surveying:
                self.context.report(d)
                return torch.zeros_like(d)  # the survey reads the base model alone
        null = d.new_full((*d.shape[:-1], 1), self.threshold)
        return topk_weights(-torch.cat([null, d], -1) / self.temperature, self.top_k)[..., 1:]


class LinearRouter(Router):
    """A linear gate per layer (`trained`: trained by router_training; `random`: seeded N(0, 0.02²)),
    its logits used as they are."""

    def __init__(self, opts: MoeOptions, n: int, width: int, context: RoutingContext, tensors: dict[str, torch.Tensor]):
        super().__init__(opts, n, width, context, tensors)
        self.logits: torch.Tensor | None = None  # the last scores, for the balancing loss
        self.linear = nn.Linear(width, n)
        g = torch.Generator().manual_seed(opts.seed)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(n, width, generator=g) * 0.02)  # trained: a start that breaks ties
            self.linear.bias.zero_()

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        self.logits = self.linear(x)
        return topk_weights(self.logits, self.top_k)


# MoeOptions.router -> its class (cairn.options.ROUTERS names them, and `arrow`: PEFT's, methods/moe/arrow.py).
PEFT_ROUTERS = ("arrow",)
ROUTER_CLASSES: dict[str, type[Router]] = {
    "uniform": UniformRouter,
    "centroid": CentroidRouter,
    "trained": LinearRouter,
    "random": LinearRouter,
}
if ROUTER_CLASSES.keys() | set(PEFT_ROUTERS) != set(ROUTERS):
    raise ImportError(f"cairn.methods.moe.routing.ROUTER_CLASSES {sorted(ROUTER_CLASSES)} and PEFT_ROUTERS {PEFT_ROUTERS} must name cairn.options.ROUTERS {sorted(ROUTERS)}")


def routers(model) -> dict[str, Router]:
    return {name.removesuffix(".router"): m for name, m in model.named_modules() if isinstance(m, Router)}


# --- Mixtral's gates (numpy): the routers of an exported Mixtral model -------------------------


def centroid_router(centroids: np.ndarray, temperature: float = TEMPERATURE["mixtral"]["centroid"]) -> np.ndarray:
    """Gate rows (experts x hidden) from the experts' centroids (experts x hidden) of one layer.

    The centroids are centred on their mean m across experts and the direction of m is projected
    out: d_k = P(c_k − m) with P = I − m mᵀ/‖m‖². The gate has no bias, so without the projection
    the common component every hidden state carries would add a fixed m·d_k to expert k's logit on
    every token, outweighing the differences that matter. Row k is d_k/‖d_k‖ / (temperature · r),
    r the root-mean-square of the ‖d_k‖ (the centroids' spread), so logits are measured in units of
    that spread: a hidden state at c_k scores ‖d_k‖/(temperature · r) ≈ 1/temperature for k and,
    by Cauchy–Schwarz, less for every other expert (strictly, unless two d's point the same way).
    With two experts and temperature 1 it gets top-2 weight σ(2) ≈ 0.88 at its own centroid;
    lower temperatures route harder, higher ones approach the uniform mixture. Identical centroids
    (one expert, or identical inputs) give zero rows: all experts equal.
    """
    if not temperature > 0:
        raise ModelError(f"router temperature must be positive, got {temperature}")
    c = np.asarray(centroids, np.float64)
    mean = c.mean(axis=0)
    d = c - mean
    mean2 = float(mean @ mean)
    if mean2 > 0:
        d -= np.outer(d @ mean / mean2, mean)
    lengths = np.linalg.norm(d, axis=1)
    spread = float(np.sqrt(np.mean(lengths**2)))
    rows = np.zeros_like(d)
    keep = lengths > 1e-6 * spread
    if spread > 0:
        rows[keep] = d[keep] / lengths[keep, None] / (temperature * spread)
    return rows.astype(np.float32)


def random_router(n_layers: int, n_experts: int, hidden: int, std: float, seed: int) -> np.ndarray:
    """(layers, experts, hidden) gate rows drawn from N(0, std²) with a seeded generator."""
    return (np.random.default_rng(seed).standard_normal((n_layers, n_experts, hidden)) * std).astype(np.float32)
