"""Model merging as pure functions over the tensors of one parameter, with mergekit's semantics.

Every method takes the base tensor, the input models' tensors θᵢ (same shape) and their weights
wᵢ, and returns the merged tensor in the base's dtype. With task vectors τᵢ = θᵢ − base:

- `average`          Σ wᵢ θᵢ / Σ wᵢ (mergekit `linear`; `normalize: false` gives Σ wᵢ θᵢ).
- `task_arithmetic`  base + λ Σ wᵢ τᵢ (divided by Σ wᵢ with `normalize: true`).
- `ties`             each τᵢ keeps its top-`density` entries by magnitude; per entry the sign with
                     the larger total weighted mass is elected; the agreeing entries are summed and
                     divided by the sum of their weights (`normalize`, default on); then λ.
- `dare_linear`      each entry of τᵢ is dropped with probability 1 − `density` and survivors are
                     rescaled by 1/`density` (seeded); then as `task_arithmetic`.
- `dare_ties`        the same drop-and-rescale, then TIES's sign election and sum.

Defaults follow mergekit (`normalize` on for `average` and `ties`, off otherwise; λ = 1;
`density` = 1). One difference: for DARE, mergekit rescales survivors to keep each task
vector's L1 norm, where Cairn rescales by 1/`density` as in the DARE paper (equal in expectation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from pydantic import ConfigDict, Field

from cairn.validation import Strict

_EXACT_LIMIT = 1 << 20  # below this many entries, select with one kthvalue over the whole tensor


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a 1-D tensor (exact).

    A full selection over a 28 M-entry embedding takes ~0.6 s on two cores; instead a sample
    brackets the answer, one comparison pass counts what lies above the bracket, and the exact
    selection runs on the few entries inside it. Falls back to a full selection if the bracket
    misses (it cannot give a wrong answer, only a slower one).
    """
    n = values.numel()
    if n <= _EXACT_LIMIT:
        return torch.kthvalue(values, n - k + 1).values
    gen = torch.Generator().manual_seed(n)
    sample = values[torch.randint(n, (1 << 16,), generator=gen)].sort().values
    q = (n - k) / n  # fraction of entries below the answer
    m = sample.numel()
    lo = sample[max(0, int((q - 0.01) * m))]
    hi = sample[min(m - 1, int((q + 0.01) * m) + 1)]
    above = int((values > hi).sum())
    band = values[(values >= lo) & (values <= hi)]
    rank = k - above  # entries above the band outrank it, entries below are outranked by it
    if 1 <= rank <= band.numel():
        return torch.kthvalue(band, band.numel() - rank + 1).values
    return torch.kthvalue(values, n - k + 1).values


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the `max(1, int(density * n))` entries of largest magnitude (ties at the
    threshold go to the lowest indices), as mergekit's `magnitude` sparsification counts them."""
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0 or n == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = max(1, int(density * n))
    mags = delta.abs().reshape(-1).float()
    threshold = kth_largest(mags, k)
    mask = mags > threshold
    short = k - int(mask.sum())
    if short > 0:
        mask[(mags == threshold).nonzero().squeeze(1)[:short]] = True
    return mask.view(delta.shape)


def random_mask(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability `density` (DARE's drop)."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    return torch.rand(delta.shape, generator=generator) < density


def _combine(base, tensors, weights, *, sparsify, elect: bool, normalize: bool, lambda_: float):
    """The generalized task-arithmetic merge: sparsify each τᵢ, weight, optionally elect signs
    (TIES), sum, optionally divide by the weight that contributed, scale by λ, add to base."""
    work = torch.float32 if base.dtype in (torch.float16, torch.bfloat16) else base.dtype
    b = base.to(work)
    deltas = torch.empty((len(tensors), *base.shape), dtype=work)
    for i, t in enumerate(tensors):
        torch.sub(t.to(work), b, out=deltas[i])
        if sparsify is not None:
            deltas[i] = sparsify(deltas[i], i)
    w = torch.tensor(weights, dtype=work).reshape(-1, *([1] * base.dim()))
    deltas.mul_(w)
    if elect:
        majority = torch.where(deltas.sum(0) >= 0, 1.0, -1.0).to(work)
        mask = deltas.sign() == majority
        mixed = (deltas * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(0)
        divisor = w.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return (b + mixed).to(base.dtype)


def average(base, tensors, weights, *, normalize: bool = True, **_):
    """Σ wᵢ θᵢ (/ Σ wᵢ): the weighted mean of the inputs; the base is not an input."""
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    out = torch.zeros(base.shape, dtype=work)
    for t, w in zip(tensors, weights):
        out.add_(t.to(work), alpha=w)
    if normalize:
        out.div_(sum(weights))
    return out.to(base.dtype)


def task_arithmetic(base, tensors, weights, *, lambda_: float = 1.0, normalize: bool = False, **_):
    return _combine(base, tensors, weights, sparsify=None, elect=False, normalize=normalize, lambda_=lambda_)


def ties(base, tensors, weights, *, density: float = 1.0, lambda_: float = 1.0, normalize: bool = True, **_):
    keep = lambda d, i: d * magnitude_mask(d, density)  # noqa: E731
    return _combine(base, tensors, weights, sparsify=keep, elect=True, normalize=normalize, lambda_=lambda_)


def _dare(generators, density):
    return lambda d, i: d * random_mask(d, density, generators[i]) / density


def dare_linear(base, tensors, weights, *, density=1.0, lambda_=1.0, normalize=False, generators=(), **_):
    sparsify = _dare(generators, density) if density < 1 else None
    return _combine(base, tensors, weights, sparsify=sparsify, elect=False, normalize=normalize, lambda_=lambda_)


def dare_ties(base, tensors, weights, *, density=1.0, lambda_=1.0, normalize=False, generators=(), **_):
    sparsify = _dare(generators, density) if density < 1 else None
    return _combine(base, tensors, weights, sparsify=sparsify, elect=True, normalize=normalize, lambda_=lambda_)


@dataclass(frozen=True)
class MergeMethod:
    fn: Callable[..., torch.Tensor]
    uses: frozenset[str]  # which of density / lambda / seed the method reads
    normalize: bool  # mergekit's default


METHODS: dict[str, MergeMethod] = {
    "average": MergeMethod(average, frozenset(), True),
    "task_arithmetic": MergeMethod(task_arithmetic, frozenset({"lambda"}), False),
    "ties": MergeMethod(ties, frozenset({"density", "lambda"}), True),
    "dare_linear": MergeMethod(dare_linear, frozenset({"density", "lambda", "seed"}), False),
    "dare_ties": MergeMethod(dare_ties, frozenset({"density", "lambda", "seed"}), False),
}


class MergeOptions(Strict):
    """A merge's method and parameters (`lambda` in YAML and on the command line)."""

    model_config = ConfigDict(populate_by_name=True)

    method: Literal[tuple(METHODS)] = "ties"  # type: ignore[valid-type]
    density: float = Field(1.0, gt=0, le=1, description="fraction of each task vector kept (ties, dare_*)")
    lambda_: float = Field(1.0, alias="lambda", description="scale of the merged task vector")
    normalize: bool | None = Field(None, description="divide by the summed weights; default: the method's (mergekit's)")
    seed: int = Field(0, description="seed of DARE's random drop")

    def kwargs(self) -> dict:
        spec = METHODS[self.method]
        return {"density": self.density, "lambda_": self.lambda_, "normalize": spec.normalize if self.normalize is None else self.normalize}


def generators_for(seed: int, name: str, n: int) -> list[torch.Generator]:
    """One generator per input for parameter `name`, so DARE's drop does not depend on tensor order."""
    import hashlib

    out = []
    for i in range(n):
        digest = hashlib.sha256(f"{seed}:{name}:{i}".encode()).digest()
        out.append(torch.Generator().manual_seed(int.from_bytes(digest[:8], "little")))
    return out


def merge_tensor(opts: MergeOptions, name: str, base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Merge one parameter. Non-floating tensors (buffers) are taken from the base."""
    if not base.is_floating_point():
        return base.clone()
    gens = generators_for(opts.seed, name, len(tensors)) if "seed" in METHODS[opts.method].uses else ()
    return METHODS[opts.method].fn(base, tensors, weights, generators=gens, **opts.kwargs())
