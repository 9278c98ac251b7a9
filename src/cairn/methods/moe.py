"""Mixing LoRA contributions into a mixture of experts (LoRA-MoE).

Every adapted linear layer becomes y = W·x + Σₖ gₖ(x) · sₖ·Bₖ·(Aₖ·x): the experts' deltas are
applied low-rank (two thin matmuls over the stacked A's and B's, never ΔW itself), weighted by
that layer's router. Routers (`MoeOptions.router`):

- `uniform`   every expert at weight 1/E (gateless mixing; `top_k` does not apply);
- `arrow`     zero-shot from the adapters: expert k's prototype vₖ is the top right-singular
              vector of its ΔW (from a QR of B and an SVD of the r x in matrix R·A); scores
              |cos(x, vₖ)| / T, softmax over the top k;
- `centroid`  from the routing statistics each contributor ships (methods/centroids.py: mean cₖ
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
              mixture of the tasks (fully-collaborative only), see `train_router`.

`granularity: sequence` (default) routes a whole prompt at once: a layer scores the mean of the
prompt's inputs to it, and generated tokens keep the prompt's routing (a contributor's expert is
one task, so one decision per prompt is both steadier and cheaper). `token` scores each token.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field, ValidationInfo, model_validator
from torch import nn

from cairn.errors import ConfigError, ModelError
from cairn.methods import centroids
from cairn.methods.routing import topk_weights
from cairn.validation import Strict, given

MANIFEST = "moe.json"


# Default softmax temperatures, in each router's units. Centroid distances (≈ 1 on an expert's own
# prompts) want nearly hard routing: on the quickstart's 4 packs the countries pack scored 0.48 at
# T = 0.1, 0.70 at 0.02 and 0.78 at 0.005 (its own adapter: 0.84), the other packs as their own
# adapters from 0.02 down. Arrow's |cos| failed to separate the packs at 0.1 and 0.02 alike.
TEMPERATURE = {"centroid": 0.005, "arrow": 0.1}


class MoeOptions(Strict):
    """How contributions are mixed; the `moe` strategy's and `cairn mix`'s options."""

    router: Literal["uniform", "arrow", "centroid", "trained", "random"] = "centroid"
    top_k: int = Field(2, ge=1, description="experts mixed per prompt (or token)")
    temperature: float | None = Field(None, gt=0, description="softmax temperature of the router scores; default per router (TEMPERATURE)")
    threshold: float = Field(2.0, gt=0, description="centroid: the distance at which the base model ties an expert")
    granularity: Literal["sequence", "token"] = "sequence"
    router_examples: int = Field(32, ge=1, description="trained: examples drawn from each task")
    router_epochs: int = Field(4, ge=1)
    router_lr: float = Field(1e-2, gt=0)
    balance: float = Field(0.01, ge=0, description="trained: weight of the load-balancing loss")
    seed: int = Field(0, description="trained and random: seed of the router's initial weights (trained: and of its examples)")

    # The routers that read each option; every other router ignores it, so setting it for one of
    # them is an error rather than a setting silently unused.
    READ_BY: ClassVar[dict[str, tuple[str, ...]]] = {
        "top_k": ("arrow", "centroid", "trained", "random"),  # uniform mixes every expert
        "temperature": ("arrow", "centroid"),  # trained and random routers' logits are used as they are
        "threshold": ("centroid",),
        "granularity": ("arrow", "centroid", "trained", "random"),  # uniform weights do not depend on the input
        "router_examples": ("trained",),
        "router_epochs": ("trained",),
        "router_lr": ("trained",),
        "balance": ("trained",),
        "seed": ("trained", "random"),
    }
    MIXTRAL_ROUTERS: ClassVar[tuple[str, ...]] = ("uniform", "centroid", "random")

    @model_validator(mode="after")
    def _applies(self, info: ValidationInfo):
        """An option this router does not read is an error (set ones only: defaults never trip it)."""
        problems, by_readers = [], {}
        for k in given(self, info):
            if k == "top_k" and self.router == "uniform":
                problems.append("top_k does not apply to router uniform, which mixes every expert at weight 1/E; drop top_k or choose another router")
            elif self.router not in self.READ_BY.get(k, (self.router,)):
                by_readers.setdefault(self.READ_BY[k], []).append(k)
        for readers, keys in by_readers.items():
            names = ", ".join(readers[:-1]) + " and " + readers[-1] if len(readers) > 1 else readers[0]
            many = len(keys) > 1
            problems.append(f"{', '.join(keys)} {'do' if many else 'does'} not apply to router {self.router}: only the {names} "
                            f"router{'s read' if len(readers) > 1 else ' reads'} {'them' if many else 'it'}")  # fmt: skip
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def check_for_mixtral(self) -> MoeOptions:
        """These options, checked for mixing full fine-tunes into a Mixtral model (`cairn mix` with
        full models; the `moe` strategy with `train: {method: fft}`): a Mixtral router is uniform,
        centroid or random, and reads neither `temperature`, `threshold` nor `granularity` (it
        routes each token), so any of them set is a ConfigError. Returns self."""
        if self.router not in self.MIXTRAL_ROUTERS:
            raise ConfigError(f"full fine-tunes are mixed into a Mixtral model, whose router is uniform, centroid or random; got router {self.router!r}")
        unread = [k for k in given(self) if k in ("temperature", "threshold", "granularity")]
        if unread:
            raise ConfigError(
                f"{', '.join(unread)} {'does' if len(unread) == 1 else 'do'} not apply to a Mixtral model (full fine-tunes mixed; its "
                f"{self.router} router routes every token by its own gate); drop {'it' if len(unread) == 1 else 'them'}, or mix LoRA adapters"
            )
        return self


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


class Router(nn.Module):
    """One layer's router: input -> mixture weights over its E experts (..., E)."""

    def __init__(self, opts: MoeOptions, n: int, width: int, context: RoutingContext, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.mode, self.n, self.top_k = opts.router, n, opts.top_k
        self.temperature, self.threshold = opts.temperature or TEMPERATURE.get(opts.router, 1.0), opts.threshold
        self.sequence = opts.granularity == "sequence"
        self.context = context
        self.cached: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None  # trained: the last scores, for the balancing loss
        for name, t in tensors.items():  # arrow: prototypes; centroid: means, inv_var
            self.register_buffer(name, t.float())
        if self.mode in ("trained", "random"):
            self.linear = nn.Linear(width, n)
            g = torch.Generator().manual_seed(opts.seed)
            with torch.no_grad():
                self.linear.weight.copy_(torch.randn(n, width, generator=g) * 0.02)  # trained: a start that breaks ties
                self.linear.bias.zero_()

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """Mixture weights for inputs x (..., width) -> (..., E)."""
        if self.mode == "uniform":
            return x.new_full((*x.shape[:-1], self.n), 1.0 / self.n)
        if self.mode == "arrow":
            cos = nn.functional.normalize(x, dim=-1) @ self.prototypes.T
            return topk_weights(cos.abs() / self.temperature, self.top_k)
        if self.mode == "centroid":
            if self.sequence and not self.context.surveying:
                d = self.context.distances()  # the survey's verdict, the same at every layer
            else:
                d = ((x.unsqueeze(-2) - self.means).pow(2) * self.inv_var).mean(-1)
                if self.context.surveying:
                    self.context.report(d)
                    return torch.zeros_like(d)  # the survey reads the base model alone
            null = d.new_full((*d.shape[:-1], 1), self.threshold)
            return topk_weights(-torch.cat([null, d], -1) / self.temperature, self.top_k)[..., 1:]
        self.logits = self.linear(x)
        return topk_weights(self.logits, self.top_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sequence or self.mode == "uniform":
            return self.weights(x)
        if self.context.surveying:
            return self.weights(centroids.pooled(x, self.context.mask)).unsqueeze(1)
        if self.context.prefill or self.cached is None or self.cached.shape[0] != x.shape[0]:
            mask = self.context.mask
            mask = mask if mask is not None and mask.shape[:2] == x.shape[:2] else None
            self.cached = self.weights(centroids.pooled(x, mask)).unsqueeze(1)
        return self.cached


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
    from cairn.methods.merge_models import read_lora

    out = {}
    for m, (a, b, s, transposed) in read_lora(folder).items():
        if transposed:
            raise ModelError(f"{folder}: fan_in_fan_out adapters (Conv1D layers) cannot be mixed; LoRA-MoE mixes nn.Linear layers")
        out[m] = (torch.from_numpy(a), torch.from_numpy(b), s)
    return out


def arrow_prototype(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The top right-singular vector of ΔW = B·A (unit length, sign arbitrary), from the r x in
    matrix R·A where B = Q·R: ΔW and R·A share right-singular vectors and singular values."""
    _, r = torch.linalg.qr(b.double())
    return torch.linalg.svd(r @ a.double(), full_matrices=False).Vh[0].float()


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
    adapter folder)."""
    adapters = [_read_adapter(Path(e)) for e in experts]
    if opts.router == "centroid" and statistics is None:
        statistics = [centroids.load(e) for e in experts]
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
        router = Router(opts, len(experts), layer.in_features, context, _router_tensors(opts, module, a, b, statistics, experts))
        parent, _, leaf = module.rpartition(".")
        setattr(model.get_submodule(parent), leaf, LoraExperts(layer, a, b, scale, router))
    model.get_decoder().register_forward_pre_hook(context.hook, with_kwargs=True)  # the decoder: training calls it directly
    model.reads_whole_prompt = opts.granularity == "sequence"  # generation must not split a prompt (no shared prefix cache)
    model.config.cairn_moe = {"experts": len(experts), **opts.model_dump()}  # enters the model's fingerprint
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _router_tensors(opts, module, a, b, statistics, experts) -> dict[str, torch.Tensor]:
    if opts.router == "arrow":
        return {"prototypes": torch.stack([arrow_prototype(a[k], b[k]) for k in range(a.shape[0])])}
    if opts.router != "centroid":
        return {}
    means, variances = [], []
    for k, stats in enumerate(statistics):
        if f"{module}.mean" not in stats:
            raise ModelError(f"{experts[k]}: its routing statistics lack module {module!r} (computed for another adapter?)")
        means.append(stats[f"{module}.mean"])
        variances.append(stats[f"{module}.var"])
    var = torch.stack(variances).mean(0)  # pooled over experts, as linear discriminant analysis pools
    floor = 1e-6 * var.mean() + 1e-12  # a dimension that never varied must not divide by 0
    return {"means": torch.stack(means), "inv_var": 1.0 / var.clamp_min(floor)}


def routers(model) -> dict[str, Router]:
    return {name.removesuffix(".router"): m for name, m in model.named_modules() if isinstance(m, Router)}


# --- the trained router -----------------------------------------------------------------------------


def train_router(model, tokenizer, tasks: list, opts: MoeOptions, *, progress: bool = False) -> list[float]:
    """Train the routers of a `trained` LoRA-MoE (experts and base frozen) on `router_examples`
    examples of each task: the answer loss plus `balance` x the Switch load-balancing loss
    (E · Σₖ fₖ·pₖ, fₖ the share of rows whose top choice is k, pₖ the mean router probability of
    k), averaged over layers. Returns the mean answer loss of each epoch."""
    import random

    from tqdm.auto import tqdm

    from cairn.data.batching import IGNORE, collate, encode
    from cairn.training import answer_loss

    rng = random.Random(opts.seed)
    examples = [ex for t in tasks for ex in rng.sample(list(t.train), min(opts.router_examples, len(t.train)))]
    layers = list(routers(model).values())
    params = [p for r in layers for p in r.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=opts.router_lr)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    context = layers[0].context
    losses = []
    model.train()
    for _ in tqdm(range(opts.router_epochs), desc="training the router", disable=not progress, leave=False):
        rng.shuffle(examples)
        total = 0.0
        for i in range(0, len(examples), 16):
            batch = collate([encode(ex, tokenizer) for ex in examples[i : i + 16]], pad)
            context.override = (batch["labels"] == IGNORE) & batch["attention_mask"].bool()
            try:
                loss, _ = answer_loss(model, batch)
            finally:
                context.override = None
            balance = 0.0
            for r in layers:
                probs = r.logits.reshape(-1, r.n).softmax(-1)
                share = nn.functional.one_hot(probs.argmax(-1), r.n).float().mean(0)
                balance = balance + r.n * (share * probs.mean(0)).sum()
            (loss + opts.balance * balance / len(layers)).backward()
            optimizer.step()
            optimizer.zero_grad()
            total += loss.item() * len(batch["input_ids"])
        losses.append(total / len(examples))
    for p in params:
        p.requires_grad_(False)
    model.eval()
    return losses


# --- saving and loading -------------------------------------------------------------------------------


def save_moe(model, experts: list[Path], opts: MoeOptions, out: Path, *, base: str, manifest: dict | None = None) -> None:
    """A LoRA-MoE folder: `moe.json` (base, options, experts), the expert adapters (with their
    routing statistics) under `experts/K/`, the routers' tensors in `router.safetensors`."""
    from safetensors.torch import save_file

    from cairn.io import atomic_dir
    from cairn.store import file_hashes, write_manifest

    with atomic_dir(Path(out)) as tmp:
        names = []
        for k, src in enumerate(experts):
            dst = tmp / "experts" / str(k)
            dst.mkdir(parents=True)
            for f in ("adapter_config.json", "adapter_model.safetensors", centroids.FILE):
                if (Path(src) / f).is_file():
                    shutil.copy2(Path(src) / f, dst / f)
            names.append(str(src))
        state = {f"{name}.{k}": v.contiguous() for name, r in routers(model).items() for k, v in r.state_dict().items()}
        save_file(state, tmp / "router.safetensors", metadata={"format": "pt"})
        (tmp / MANIFEST).write_text(json.dumps({"schema": 1, "base": base, "options": opts.model_dump(), "experts": names}, indent=2) + "\n")
        write_manifest(tmp, {"schema": 1, "kind": "moe", "base": base, **(manifest or {}), "files": file_hashes(tmp)})


def _info(folder: Path) -> tuple[dict, MoeOptions]:
    try:
        info = json.loads((folder / MANIFEST).read_text())
        return info, MoeOptions(**info["options"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
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
    model = attach_experts(base_model, experts, opts)
    state = load_file(folder / "router.safetensors")
    for name, r in routers(model).items():
        r.load_state_dict({k.removeprefix(f"{name}."): v for k, v in state.items() if k.startswith(f"{name}.")})
    return model

