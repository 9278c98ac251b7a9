"""Model merging as pure functions over the tensors of one parameter, with mergekit's semantics.

Every method takes the base tensor, the input models' tensors θᵢ (numpy arrays of one shape) and
their weights wᵢ, and returns the merged tensor in float32 (float64 for a float64 base). With
task vectors τᵢ = θᵢ − base:

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

from typing import Callable

import numpy as np

from cairn.methods.merge import kernels as K
from cairn.options import MERGE_METHODS, MergeOptions

_SAMPLE = 1 << 12
_EXACT = 1 << 16  # smaller tensors select over all their entries
_MARGIN = 0.03  # half-width of the sampled bracket, as a quantile: 3.8 standard errors at 4096 samples


def _work(base: np.ndarray) -> type:
    """The precision a merge computes in: float32, or float64 for a float64 model."""
    return np.float64 if base.dtype == np.float64 else np.float32


def _flat(a: np.ndarray, work: type) -> np.ndarray:
    """A contiguous 1-D array in `work` precision (a copy only when it must be)."""
    return np.ascontiguousarray(a, work).reshape(-1)


def magnitude_threshold(base, theta, density: float) -> tuple[float, int]:
    """(t, cut) such that TIES keeps the entries of τ = θ − base with |τ| > t, plus those with
    |τ| == t at flat index <= cut: exactly k = max(1, int(density * n)) entries, as mergekit's
    `magnitude` counts them (of entries tied at t it keeps the lowest indices, where mergekit's
    unstable sort picks arbitrarily).

    Exact without sorting (~1.5 ns per entry on these cores): a random sample brackets t, one
    pass counts the entries above the bracket and gathers those inside, and a bucket selection
    finds t in that band; if the sample missed, the band is everything on t's side of it.
    """
    work = _work(base)
    b, th = _flat(base, work), _flat(theta, work)
    n = b.size
    k = max(1, int(density * n))
    lo, hi = -np.inf, np.inf
    if n > _EXACT:
        lo, hi = K.sample_bracket(th, b, (n - k) / n, _SAMPLE, _MARGIN)
    above, values, where = K.band_split(th, b, lo, hi)
    rank = k - int(above)  # entries above the band outrank all of it, entries below it none
    if rank <= 0:  # the sample missed: t lies above the bracket
        above, values, where = K.band_split(th, b, hi, np.inf)
        rank = k
    elif rank > values.size:  # or below it
        _, values, where = K.band_split(th, b, -np.inf, hi)
    t, cut = K.threshold_in_band(values, where, rank)
    return float(t), int(cut)


def _combine(base, tensors, weights, *, mode=0, density=1.0, seed=0, elect: bool, normalize: bool, lambda_: float):
    """The generalized task-arithmetic merge (see kernels.combine): sparsify each τᵢ
    (mode 1 TIES magnitude, mode 2 DARE drop), weight, optionally elect signs, sum, optionally
    divide by the weight that contributed, scale by λ, add to the base."""
    work = _work(base)
    b = _flat(base, work)
    thetas = tuple(_flat(t, work) for t in tensors)
    thresholds, cuts = np.zeros(len(tensors), work), np.full(len(tensors), -1, np.int64)
    if mode == 1:
        for i, t in enumerate(thetas):
            thresholds[i], cuts[i] = magnitude_threshold(b, t, density)
    out = np.empty_like(b)
    K.combine(out, b, thetas, np.asarray(weights, work), mode, thresholds, cuts, work(density), np.uint64(seed),
              elect, normalize, work(lambda_))  # fmt: skip
    return out.reshape(base.shape)


def average(base, tensors, weights, *, normalize: bool = True, **_):
    """Σ wᵢ θᵢ (/ Σ wᵢ): the weighted mean of the inputs; the base is not an input (it is the
    combine over a zero base, which sums in the same order mergekit does)."""
    return _combine(np.zeros(base.shape, _work(base)), tensors, weights, elect=False, normalize=normalize, lambda_=1.0)


def task_arithmetic(base, tensors, weights, *, lambda_: float = 1.0, normalize: bool = False, **_):
    return _combine(base, tensors, weights, elect=False, normalize=normalize, lambda_=lambda_)


def ties(base, tensors, weights, *, density: float = 1.0, lambda_: float = 1.0, normalize: bool = True, **_):
    return _combine(base, tensors, weights, mode=1 if density < 1 else 0, density=density, elect=True, normalize=normalize, lambda_=lambda_)


def dare_linear(base, tensors, weights, *, density=1.0, lambda_=1.0, normalize=False, seed=0, **_):
    return _combine(base, tensors, weights, mode=2 if density < 1 else 0, density=density, seed=seed, elect=False, normalize=normalize, lambda_=lambda_)


def dare_ties(base, tensors, weights, *, density=1.0, lambda_=1.0, normalize=False, seed=0, **_):
    return _combine(base, tensors, weights, mode=2 if density < 1 else 0, density=density, seed=seed, elect=True, normalize=normalize, lambda_=lambda_)


# Each merge method's math; its parameters (which it reads, its `normalize` default) are its row of
# `cairn.options.MERGE_METHODS`, so that options validate without this module.
METHODS: dict[str, Callable[..., np.ndarray]] = {
    "average": average,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
}
if METHODS.keys() != MERGE_METHODS.keys():
    raise ImportError(f"cairn.methods.merge.methods.METHODS {sorted(METHODS)} and cairn.options.MERGE_METHODS {sorted(MERGE_METHODS)} must name the same methods")


def seed_for(seed: int, name: str) -> int:
    """DARE's seed for parameter `name`: different parameters drop independently."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def merge_tensor(opts: MergeOptions, name: str, base: np.ndarray, tensors: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Merge one parameter (float32, or float64 for a float64 base). Non-float tensors
    (buffers) are taken from the base."""
    if base.dtype.kind != "f":
        return base.copy()
    return METHODS[opts.method](base, tensors, weights, seed=seed_for(opts.seed, name), **opts.kwargs())
