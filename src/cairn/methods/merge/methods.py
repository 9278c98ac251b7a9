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
- `breadcrumbs`      Model Breadcrumbs (Davari & Belilovsky, arXiv:2312.06795): of each τᵢ's n
                     entries ranked by |τᵢ|, the top m = int(`gamma` n) (outliers) are dropped and
                     the k = int(`density` n) next kept, the rest dropped (m shrinks to n − k where
                     m + k > n; no rescale); then as `task_arithmetic`. At `density` 1 nothing is
                     dropped (`gamma` then has no effect, as in mergekit).
- `breadcrumbs_ties` the same masks, then TIES's sign election and sum.
- `model_stock`      Model Stock (Jang et al., arXiv:2403.19522): with N inputs and cos the mean
                     over pairs i < j of cos(τᵢ, τⱼ) (over the whole tensor, or per output row with
                     `filter_wise`; a norm product below 1e-6 counts as 1e-6), t = N cos / (1 + (N − 1) cos)
                     (t = 0, the base, where |1 + (N − 1) cos| < 1e-6) and the merge is
                     t · (Σ θᵢ / N) + (1 − t) · base. Needs N >= 2; reads no weights.
- `slerp`            spherical interpolation of the base (`t` = 0) and one input θ (`t` = 1), each
                     flattened: with ω the angle between them, (sin((1 − t) ω) base + sin(t ω) θ) / sin ω;
                     where |cos ω| > 0.9995, the linear (1 − t) base + t θ. Reads no weights.
- `della`            DELLA-Merging (Deep et al., arXiv:2406.11617), MagPrune as mergekit implements it:
                     in each row of τᵢ along axis 1 (a 1-D τᵢ is one row) of m entries, the entry of
                     magnitude rank r (1 = smallest) is kept with probability
                     p = `density` − `epsilon` + 2 `epsilon` (r − 1) / (m − 1) (so the mean is `density`),
                     then the kept τᵢ is rescaled by ‖τᵢ‖₁ / ‖kept τᵢ‖₁ over the tensor (mergekit's
                     default `rescale`); then TIES's sign election and sum (normalize default on).
                     Needs 0 < `density` ± `epsilon` < 1 below `density` 1. Seeded: the draw of each
                     entry is a function of (`seed`, parameter, input, entry) alone.
- `della_linear`     the same pruning and rescale, then as `task_arithmetic` (normalize default off).
- `sce`              SCE (Wan et al., FuseChat, arXiv:2408.07990): select the k = int(`select_topk` · nnz)
                     entries of largest variance across the τᵢ (population variance; nnz its non-zero
                     count; k in float32 as mergekit counts it) and zero the rest in every τᵢ;
                     per-tensor weights wᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²) (1/N where that sum is below
                     1e-6); eᵢ = [sign τᵢ = sign Σⱼ τⱼ] (≥ 0 counting as +); the merge is
                     base + Σ wᵢ eᵢ τᵢ / max(Σ wᵢ eᵢ, 1e-6). Reads no weights.
- `karcher`          the Karcher (Riemannian) mean of the inputs on the unit sphere (Karcher 1977;
                     mergekit cites arXiv:2603.04972): with uᵢ = θᵢ / ‖θᵢ‖ (over the flattened tensor;
                     inputs of norm ≤ `tol` left out), start from the normalized mean of the uᵢ and
                     repeat at most `max_iter` times: θᵢ = arccos(u · uᵢ),
                     T = Σ (1/N) θᵢ / sin θᵢ (uᵢ − (u · uᵢ) u) over θᵢ ≥ `tol`, stop once ‖T‖ < `tol`,
                     else u ← cos‖T‖ u + sin‖T‖ T / ‖T‖, renormalized; the merge is (Σ ‖θᵢ‖ / N) u.
                     The base only gives the shape (as for `average`). Reads no weights.
- `nuslerp`          mergekit's NuSLERP: base + the spherical interpolation of the two task vectors
                     τ₁, τ₂ at t = w₂ / (w₁ + w₂) (0.5 where |w₁ + w₂| < 1e-6): with
                     cos ω = τ₁ · τ₂ / (max(‖τ₁‖, 1e-7) max(‖τ₂‖, 1e-7)),
                     (sin((1 − t) ω) τ₁ + sin(t ω) τ₂) / sin ω, or (1 − t) τ₁ + t τ₂ where
                     1 − cos² ω ≤ 1e-16; over the flattened tensor (`nuslerp_flatten`, default), else
                     per row (per column with `nuslerp_row_wise`). Exactly two inputs.

Defaults follow mergekit (`normalize` on for `average`, `ties` and `della`, off otherwise; λ = 1;
`density` = 1; `gamma` = 0.01; `epsilon` = 0.15; `select_topk` = 1; `max_iter` = 10; `tol` = 1e-5;
`nuslerp_flatten` on; `filter_wise` off; `t` required). The newer methods were checked against
mergekit 0.1.5's `sparsify.magnitude_outliers` and `della_magprune`, `model_stock`, `slerp`, `sce`,
`karcher` and `nuslerp` (bench/merge.py).
Differences: for DARE, mergekit rescales survivors to keep each task vector's L1 norm, where Cairn
rescales by 1/`density` as in the DARE paper (equal in expectation); of entries tied in |τ| Cairn
keeps the lowest indices, mergekit's unstable sort any. (mergekit 0.1.4's breadcrumbs kept no entry
where int(`gamma` n) is 0; 0.1.5, like Cairn, then keeps the top k: the plain magnitude pruning.)
DELLA draws from its own counter-based generator, not torch's global one, so it equals mergekit in
distribution (kept fraction per rank, rescale), not entry by entry; ranks of tied magnitudes go to
the lower index. SCE's selection of entries tied at the k-th variance keeps the lowest indices
(mergekit's `topk` any). Karcher runs on the coefficients of the iterate over the unit inputs (its
dot products from their float64 Gram matrix) where mergekit updates whole float32 tensors: the same
iteration, more exactly. Cairn's nuslerp needs the base (the `merge` strategy always has one);
mergekit's nuslerp of two models without a base_model is not offered.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from cairn.errors import ConfigError
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
    return top_threshold(base, theta, max(1, int(density * np.asarray(base).size)))


def top_threshold(base, theta, k: int) -> tuple[float, int]:
    """`magnitude_threshold` for exactly k entries (1 <= k <= n)."""
    work = _work(base)
    b, th = _flat(base, work), _flat(theta, work)
    n = b.size
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


def _top_mask(b: np.ndarray, th: np.ndarray, k: int) -> np.ndarray:
    """The entries (flat, boolean) of the k largest |th − b|, ties to the lower indices."""
    if k <= 0:
        return np.zeros(b.size, bool)
    if k >= b.size:
        return np.ones(b.size, bool)
    t, cut = top_threshold(b, th, k)
    mags = np.abs(th - b)
    keep = mags > t
    tied = np.flatnonzero(mags == t)
    keep[tied[tied <= cut]] = True
    return keep


def breadcrumbs_mask(base, theta, density: float, gamma: float) -> np.ndarray:
    """Breadcrumbs' kept entries of τ = θ − base (flat, boolean): drop the int(gamma n) largest
    |τ| (fewer where they and the k = int(density n) kept would exceed n), keep the k next."""
    work = _work(base)
    b, th = _flat(base, work), _flat(theta, work)
    n = b.size
    if density >= 1:
        return np.ones(n, bool)
    k, top = int(density * n), int(gamma * n)
    top = min(top, n - k)
    return _top_mask(b, th, top + k) & ~_top_mask(b, th, top)


def _breadcrumbs(base, tensors, weights, *, density, gamma, lambda_, normalize, elect):
    work = _work(base)
    b = _flat(base, work)
    if density < 1:  # a dropped entry's θ becomes the base's: its τ is exactly 0, a kept one's unchanged
        tensors = [np.where(breadcrumbs_mask(b, th, density, gamma), th, b) for th in (_flat(t, work) for t in tensors)]
    return _combine(base, tensors, weights, elect=elect, normalize=normalize, lambda_=lambda_)


def breadcrumbs(base, tensors, weights, *, density=1.0, gamma=0.01, lambda_=1.0, normalize=False, **_):
    return _breadcrumbs(base, tensors, weights, density=density, gamma=gamma, lambda_=lambda_, normalize=normalize, elect=False)


def breadcrumbs_ties(base, tensors, weights, *, density=1.0, gamma=0.01, lambda_=1.0, normalize=False, **_):
    return _breadcrumbs(base, tensors, weights, density=density, gamma=gamma, lambda_=lambda_, normalize=normalize, elect=True)


def _unweighted(method: str, weights) -> None:
    if len(set(weights)) > 1:
        raise ConfigError(f"{method} reads no weights (as mergekit's); got {list(weights)}: drop them")


_BLOCK = 1 << 18  # entries per block of the float64 dot products


def _gram(rows_base: np.ndarray, rows: list[np.ndarray]) -> np.ndarray:
    """G[r, i, j] = Σ_c τᵢ[r, c] τⱼ[r, c] with τᵢ = rows[i] − rows_base, summed in float64 by blocks."""
    r, c = rows_base.shape
    g = np.zeros((r, len(rows), len(rows)))
    rb, cb = max(1, _BLOCK // c), min(c, _BLOCK)
    for r0 in range(0, r, rb):
        for c0 in range(0, c, cb):
            b = rows_base[r0:r0 + rb, c0:c0 + cb].astype(np.float64)
            taus = np.stack([x[r0:r0 + rb, c0:c0 + cb] - b for x in rows], axis=1)  # (rows, N, cols)
            g[r0:r0 + rb] += taus @ taus.transpose(0, 2, 1)
    return g


def model_stock(base, tensors, weights, *, filter_wise: bool = False, **_):
    """t · mean(θᵢ) + (1 − t) · base with t = N cos / (1 + (N − 1) cos), cos the mean pairwise
    cosine of the task vectors (per tensor, or per output row with `filter_wise`)."""
    _unweighted("model_stock", weights)
    n = len(tensors)
    if n < 2:
        raise ConfigError(f"model_stock needs at least 2 inputs besides the base (as mergekit's), got {n}")
    work = _work(base)
    shape = np.shape(base)
    rows = (-1, shape[-1]) if filter_wise and len(shape) >= 2 else (1, -1)
    b = np.ascontiguousarray(base, work).reshape(rows)
    xs = [np.ascontiguousarray(t, work).reshape(rows) for t in tensors]
    g = _gram(b, xs)
    norms = np.sqrt(np.einsum("rii->ri", g))
    cos = [np.clip(g[:, i, j] / np.maximum(norms[:, i] * norms[:, j], 1e-6), -1, 1) for i in range(n) for j in range(i + 1, n)]
    c = np.mean(cos, axis=0)
    denominator = 1 + (n - 1) * c
    singular = np.abs(denominator) < 1e-6  # no finite ratio: the base, as mergekit 0.1.5
    t = np.where(singular, 0.0, n * c / np.where(singular, 1.0, denominator)).astype(work)[:, None]
    avg = xs[0].copy()
    for x in xs[1:]:
        avg += x
    avg /= work(n)
    return (t * avg + (1 - t) * b).reshape(shape)


def slerp(base, tensors, weights, *, t: float | None = None, **_):
    """Spherical interpolation from the base (t = 0) to the one input (t = 1), mergekit's."""
    _unweighted("slerp", weights)
    if len(tensors) != 1:
        raise ConfigError(f"slerp interpolates the base and one input (as mergekit's), got {len(tensors)} inputs")
    if t is None:
        raise ConfigError("slerp needs t")
    work = _work(base)
    v0, v1 = np.asarray(base, work), np.asarray(tensors[0], work)
    n0, n1 = (float(np.sqrt(np.dot(_flat(v, np.float64), _flat(v, np.float64)))) for v in (v0, v1))
    dot = float(np.dot(_flat(v0, np.float64), _flat(v1, np.float64))) / ((n0 if n0 > 1e-8 else 1.0) * (n1 if n1 > 1e-8 else 1.0))
    if abs(dot) > 0.9995:  # nearly colinear: the linear interpolation
        s0, s1 = 1 - t, t
    else:
        omega = np.arccos(dot)
        s0, s1 = np.sin((1 - t) * omega) / np.sin(omega), np.sin(t * omega) / np.sin(omega)
    return (work(s0) * v0 + work(s1) * v1).astype(work, copy=False)


def _rows_axis1(a: np.ndarray) -> np.ndarray:
    """`a` as rows along its axis 1 (mergekit's DELLA ranks along dim 1; a 1-D tensor is one row)."""
    if a.ndim < 2:
        return a.reshape(1, -1)
    return np.ascontiguousarray(np.moveaxis(a, 1, -1)).reshape(-1, a.shape[1])


def della_deltas(base, theta, density: float, epsilon: float, seed: int, i: int) -> np.ndarray:
    """DELLA's pruned and rescaled task vector τ' of input i (shape of `base`): in each row along
    axis 1, the entry of magnitude rank r (1 = smallest of m, ties to the lower index) is kept with
    probability p = density − epsilon + 2 epsilon (r − 1) / (m − 1) (mergekit's `della_magprune`;
    p = density in a one-entry row, where mergekit divides 0 by 0), then τ' = kept τ · ‖τ‖₁ /
    ‖kept τ‖₁ over the whole tensor (mergekit's default `rescale`; none where either norm is below
    1e-7). Seeded by (seed, i, entry): the same seed drops the same entries."""
    work = _work(base)
    b, th = (np.asarray(a, work) for a in (base, theta))
    shape = b.shape
    tau = _rows_axis1(th) - _rows_axis1(b)
    # Each row's ranking by |τ|, ties to the lower column, as one sort of unique 64-bit keys: the
    # magnitude's float32 bits (ordered as the magnitudes are) above the column (~6x faster here
    # than a stable argsort, which a float64 merge uses; the kernel reads the column from the low bits).
    if work is np.float32:
        order = np.abs(tau).view(np.uint32).astype(np.uint64)
        order <<= np.uint64(32)
        order |= np.arange(tau.shape[1], dtype=np.uint64)
        order.sort(axis=1)
    else:
        order = np.argsort(np.abs(tau), axis=1, kind="stable").astype(np.uint64)
    out = np.empty(tau.size, work)
    l1 = K.della_prune(out, tau.reshape(-1), order.reshape(-1), tau.shape[1], np.float32(density - epsilon), np.float32(2 * epsilon), np.uint64(seed), i)
    del order
    before, after = l1.sum(axis=0)
    if before >= 1e-7 and after >= 1e-7:
        out *= work(before / after)
    out = out.reshape(tau.shape)
    if b.ndim > 2:  # back from rows along axis 1
        moved = shape[:1] + shape[2:] + shape[1:2]
        out = np.moveaxis(out.reshape(moved), -1, 1)
    return np.ascontiguousarray(out).reshape(shape)


def _della(base, tensors, weights, *, density, epsilon, lambda_, normalize, seed, elect):
    work = _work(base)
    b = _flat(base, work)
    if density < 1:
        taus = tuple(_flat(della_deltas(base, t, density, epsilon, seed, i), work) for i, t in enumerate(tensors))
    else:
        taus = tuple(_flat(t, work) - b for t in tensors)
    mixed = np.empty_like(b)  # the combine over a zero base: λ · the mixed task vector, added to the base once, as mergekit
    K.combine(mixed, np.zeros_like(b), taus, np.asarray(weights, work), 0, np.zeros(len(taus), work), np.full(len(taus), -1, np.int64),
              work(1), np.uint64(0), elect, normalize, work(lambda_))  # fmt: skip
    mixed += b
    return mixed.reshape(base.shape)


def della(base, tensors, weights, *, density=1.0, epsilon=0.15, lambda_=1.0, normalize=True, seed=0, **_):
    return _della(base, tensors, weights, density=density, epsilon=epsilon, lambda_=lambda_, normalize=normalize, seed=seed, elect=True)


def della_linear(base, tensors, weights, *, density=1.0, epsilon=0.15, lambda_=1.0, normalize=False, seed=0, **_):
    return _della(base, tensors, weights, density=density, epsilon=epsilon, lambda_=lambda_, normalize=normalize, seed=seed, elect=False)


def sce(base, tensors, weights, *, select_topk: float = 1.0, **_):
    """Select by variance, weight by each τᵢ's mean square, elect signs, average the agreeing."""
    _unweighted("sce", weights)
    work = _work(base)
    b = _flat(base, work)
    thetas = tuple(_flat(t, work) for t in tensors)
    n = b.size
    var, threshold, cut = np.empty(0, work), 0.0, -2  # cut -2: every entry selected
    if select_topk < 1:
        var = np.empty(n, work)
        K.input_variance(var, thetas, b)
        # k as mergekit counts it: its count of non-zero variances times select_topk, in float32
        k = int(np.float32(np.count_nonzero(var)) * np.float32(select_topk)) if work is np.float32 else int(np.count_nonzero(var) * select_topk)
        if k == 0:
            return np.asarray(base, work).copy()
        threshold, cut = top_threshold(np.zeros_like(var), var, k)
    squares = K.selected_squares(thetas, b, var, work(threshold), cut) / n
    total = float(squares.astype(work).sum())
    w = np.full(len(thetas), 1 / len(thetas)) if abs(total) < 1e-6 else squares / total
    out = np.empty_like(b)
    K.sce_combine(out, thetas, b, var, work(threshold), cut, w.astype(work))
    return out.reshape(base.shape)


def karcher(base, tensors, weights, *, max_iter: int = 10, tol: float = 1e-5, **_):
    """The Karcher mean of the inputs on the unit sphere, scaled by their mean norm. The base
    gives only the shape (as for `average`): list it among the inputs to include it.

    Every iterate stays in the span of the inputs' unit vectors, so it runs on coefficients over
    them and their Gram matrix (one float64 pass), and writes the tensor once."""
    _unweighted("karcher", weights)
    work = _work(base)
    xs = [_flat(t, work) for t in tensors]
    count = len(xs)
    if count == 1:
        return xs[0].copy().reshape(np.shape(base))
    gram = K.gram(tuple(xs))
    norms = np.sqrt(np.diag(gram))
    alpha = 1.0 / count
    valid = [i for i in range(count) if norms[i] > tol]
    coefs = np.zeros(count)
    if valid:
        g = gram[np.ix_(valid, valid)] / np.outer(norms[valid], norms[valid])  # the unit vectors' Gram matrix
        a = np.full(len(valid), 1.0 / len(valid))
        length = np.sqrt(max(a @ g @ a, 0.0))
        c = np.eye(len(valid))[0] if length < tol else a / length
        for _ in range(max_iter):
            dots = np.clip(g @ c, -1.0, 1.0)
            theta = np.arccos(dots)
            step = np.zeros_like(c)
            for j in range(len(valid)):
                if theta[j] >= tol:
                    k = a[j] * theta[j] / np.sin(theta[j])
                    step[j] += k
                    step -= k * dots[j] * c
            size = np.sqrt(max(step @ g @ step, 0.0))
            if size < tol:
                break
            c = np.cos(size) * c + np.sin(size) * step / size
            length = np.sqrt(max(c @ g @ c, 0.0))
            if length > tol:
                c = c / length
        scale = alpha * norms.sum()
        coefs[valid] = scale * c / norms[valid]
    out = np.empty(xs[0].size, work)
    K.weighted_sum(out, tuple(xs), coefs)  # (Σ ‖θᵢ‖ / N) u, u = Σ cᵢ θᵢ / ‖θᵢ‖: one pass
    return out.reshape(np.shape(base))


def nuslerp(base, tensors, weights, *, row_wise: bool = False, flatten: bool = True, **_):
    """base + the spherical interpolation of the two task vectors at t = w₂ / (w₁ + w₂)."""
    if len(tensors) != 2:
        raise ConfigError(f"nuslerp interpolates exactly 2 inputs besides the base (as mergekit's), got {len(tensors)}")
    total = float(weights[0]) + float(weights[1])
    t = 0.5 if abs(total) < 1e-6 else float(weights[1]) / total
    work = _work(base)
    b, x0, x1 = (np.asarray(a, work) for a in (base, tensors[0], tensors[1]))
    column_wise = row_wise and not flatten and b.ndim >= 2  # mergekit's row_wise transposes: each column is interpolated
    if column_wise:
        b, x0, x1 = (np.ascontiguousarray(np.moveaxis(a, 0, -1)) for a in (b, x0, x1))
    flat = [np.ascontiguousarray(a).reshape(-1) for a in (b, x0, x1)]
    n = flat[0].size
    if flatten or b.ndim < 2:
        sums = K.pair_sums(flat[1], flat[2], flat[0], K.BLOCK).sum(axis=0, keepdims=True)  # one group: the whole tensor
        cols = max(n, 1)
    else:
        cols = b.shape[-1]
        sums = K.pair_sums(flat[1], flat[2], flat[0], cols)
    n0, n1 = np.sqrt(sums[:, 0]), np.sqrt(sums[:, 1])
    cos = np.clip(sums[:, 2] / (np.maximum(n0, 1e-7) * np.maximum(n1, 1e-7)), -1, 1)
    colinear = 1 - cos**2 <= 1e-16
    theta = np.arccos(np.where(colinear, 0.0, cos))
    sin = np.where(colinear, 1.0, np.sin(theta))
    s0 = np.where(colinear, 1 - t, np.sin((1 - t) * theta) / sin).astype(work)
    s1 = np.where(colinear, t, np.sin(t * theta) / sin).astype(work)
    out = np.empty(n, work)
    K.interpolate(out, flat[1], flat[2], flat[0], s0, s1, cols)
    out = out.reshape(b.shape)
    if column_wise:
        out = np.ascontiguousarray(np.moveaxis(out, -1, 0))
    return out


# Each merge method's math; its parameters (which it reads, its `normalize` default) are its row of
# `cairn.options.MERGE_METHODS`, so that options validate without this module.
METHODS: dict[str, Callable[..., np.ndarray]] = {
    "average": average,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
    "breadcrumbs": breadcrumbs,
    "breadcrumbs_ties": breadcrumbs_ties,
    "model_stock": model_stock,
    "slerp": slerp,
    "della": della,
    "della_linear": della_linear,
    "sce": sce,
    "karcher": karcher,
    "nuslerp": nuslerp,
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
