"""Per-entry loops of the task-arithmetic merges, compiled with numba.

Written as loops because a merge is a handful of arithmetic per entry: as chains of tensor
operations the same work made ~15 passes over memory (and bool-tensor kernels are slow on CPU),
about 5x slower than one fused pass. Compiled once per machine (cached beside this file or in
NUMBA_CACHE_DIR); both cores work on disjoint blocks of entries.
"""

from __future__ import annotations

import os

# numba's default OpenMP threading layer shares torch's libgomp and leaves a pool thread spinning
# at a barrier after a kernel returns. In a process that goes on to use torch on one thread
# (OMP_NUM_THREADS=1, as parallel sweep workers run), that spin made every later training step up
# to ~9x slower. Workqueue threads sleep. Set in the environment as well as in numba.config: numba
# re-reads its config from the environment when a NUMBA_ variable changes, and children inherit it.
os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")

import numba  # noqa: E402
import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

numba.config.THREADING_LAYER = os.environ["NUMBA_THREADING_LAYER"]  # in case numba was imported first

BLOCK = 1 << 16  # entries per parallel block


@njit(cache=True, inline="always")
def _uniform(seed: np.uint64, i: np.uint64, j: np.uint64) -> float:
    """A uniform in [0, 1) from (seed, input, entry) alone (splitmix64): the drop of an entry
    does not depend on threads or on how the tensor is sliced."""
    z = seed ^ (i * np.uint64(0x9E3779B97F4A7C15)) ^ (j * np.uint64(0xBF58476D1CE4E5B9))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(cache=True, parallel=True, nogil=True)
def band_split(theta, base, lo, hi):
    """One pass: (entries with |θ − base| > hi, the magnitudes inside [lo, hi], their flat
    indices), the last two in index order.

    Branch-free: every entry is written to its block's scratch and the write position advances
    only for entries inside (4x faster than a conditional store). The scratch is sized for every
    entry, but pages that are never written are never backed by memory, so it costs what the
    band holds.
    """
    n = base.size
    blocks = (n + BLOCK - 1) // BLOCK
    above = np.zeros(blocks, np.int64)
    inside = np.zeros(blocks, np.int64)
    values = np.empty(n + blocks, theta.dtype)
    where = np.empty(n + blocks, np.int64)
    for blk in prange(blocks):
        start = blk * (BLOCK + 1)
        k = start
        a = 0
        for j in range(blk * BLOCK, min(n, (blk + 1) * BLOCK)):
            m = abs(theta[j] - base[j])
            values[k] = m
            where[k] = j
            a += m > hi
            k += (m >= lo) & (m <= hi)
        above[blk] = a
        inside[blk] = k - start
    band_values = np.empty(inside.sum(), theta.dtype)
    band_where = np.empty(inside.sum(), np.int64)
    pos = 0
    for blk in range(blocks):
        start, count = blk * (BLOCK + 1), inside[blk]
        band_values[pos : pos + count] = values[start : start + count]
        band_where[pos : pos + count] = where[start : start + count]
        pos += count
    return above.sum(), band_values, band_where


@njit(cache=True, nogil=True)
def sample_bracket(theta, base, below, samples, margin):
    """(lo, hi): quantiles `below` ∓ `margin` of |θ − base| estimated from `samples` entries
    drawn uniformly (seeded by the size). The bracket holds the true quantile but for a
    ~4-standard-error miss, which the caller detects."""
    n = base.size
    sample = np.empty(samples, theta.dtype)
    for i in range(samples):
        j = int(_uniform(np.uint64(n), np.uint64(0), np.uint64(i)) * n)
        sample[i] = abs(theta[j] - base[j])
    sample.sort()
    lo = sample[max(0, int((below - margin) * samples))]
    hi = sample[min(samples - 1, int((below + margin) * samples) + 1)]
    return lo, hi


_BINS = 1 << 16


@njit(cache=True, nogil=True)
def kth_largest(values, rank):
    """The `rank`-th largest of `values` (1-based), exactly, in O(n): bucket the values into
    equal-width bins between their min and max (a monotone map, so bins are ordered), keep the
    bin holding the rank and repeat on it. ~5x faster here than torch.kthvalue's selection."""
    while values.size > 64:
        lo, hi = values.min(), values.max()
        if lo == hi:
            return lo
        scale = _BINS / (hi - lo)
        if not (np.isfinite(scale) and np.isfinite(lo)):  # inf or NaN magnitudes: sort instead
            break
        counts = np.zeros(_BINS + 1, np.int64)
        for v in values:
            counts[int((v - lo) * scale)] += 1
        b = _BINS
        while rank > counts[b]:
            rank -= counts[b]
            b -= 1
        narrowed = np.empty(counts[b], values.dtype)
        k = 0
        for v in values:
            if int((v - lo) * scale) == b:
                narrowed[k] = v
                k += 1
        values = narrowed
    return np.sort(values)[values.size - rank]


@njit(cache=True, nogil=True)
def threshold_in_band(values, where, rank):
    """(t, cut): t the `rank`-th largest of the band's magnitudes; of the entries equal to t,
    those at flat index <= cut make up the rank (ties are kept lowest index first)."""
    t = kth_largest(values, rank)
    ties = rank
    for v in values:
        ties -= v > t
    for i in range(values.size):
        if values[i] == t:
            ties -= 1
            if ties == 0:
                return t, where[i]
    return t, -1


@njit(cache=True, inline="always")
def _kept(thetas, i, j, b, mode, thresholds, tie_cut, density, seed):
    """τᵢ[j] sparsified: mode 0 not at all; 1 TIES (kept if |τ| > threshold, or == threshold up
    to index tie_cut); 2 DARE (kept with probability `density`, rescaled by 1/density).
    Multiplying by 0/1 instead of branching: at density 0.5 a branch is a coin flip."""
    d = thetas[i][j] - b
    if mode == 1:
        m = abs(d)
        d = d * np.float32((m > thresholds[i]) | ((m == thresholds[i]) & (j <= tie_cut[i])))
    elif mode == 2:
        d = d * np.float32(_uniform(seed, np.uint64(i), np.uint64(j)) < density) / density
    return d


@njit(cache=True, parallel=True, nogil=True)
def combine(out, base, thetas, weights, mode, thresholds, tie_cut, density, seed, elect, normalize, lam):
    """out = base + λ · (Σ wᵢ τᵢ, over the agreeing signs if `elect`) / (contributing weight if
    `normalize`), entry by entry, in mergekit's order of operations (τᵢ sparsified by `_kept`).

    Accumulators start as `x - x` of a working-precision value, so float32 merges add in float32
    as mergekit's tensors do (a float64 literal would promote them). The election recomputes τᵢ
    rather than keeping it: cheaper than a scratch array here.
    """
    n, count = base.size, len(thetas)
    zero, one = weights[0] - weights[0], weights[0] - weights[0] + 1
    total_w = zero
    for i in range(count):
        total_w += weights[i]
    if abs(total_w) < 1e-8:
        total_w = one
    for blk in prange((n + BLOCK - 1) // BLOCK):
        for j in range(blk * BLOCK, min(n, (blk + 1) * BLOCK)):
            b = base[j]
            total = b - b
            for i in range(count):
                total += _kept(thetas, i, j, b, mode, thresholds, tie_cut, density, seed) * weights[i]
            mixed, divisor = total, total_w
            if elect:
                positive = total >= 0
                mixed, divisor = zero, zero
                for i in range(count):
                    d = _kept(thetas, i, j, b, mode, thresholds, tie_cut, density, seed) * weights[i]
                    agree = np.float32((d > 0) if positive else (d < 0))
                    mixed += d * agree
                    divisor += weights[i] * agree
                if divisor == 0:
                    divisor = one
            if normalize:
                mixed = mixed / divisor
            if lam != 1.0:
                mixed = mixed * lam
            out[j] = b + mixed


@njit(cache=True, parallel=True, nogil=True)
def della_prune(out, tau, order, cols, low, span, seed, i):
    """DELLA's MagPrune of the task vector `tau`, row by row (`cols` entries each, flat and
    contiguous): `order` holds each row's sort keys (|τ|'s float32 bits << 32 | column, sorted
    ascending, so ties go to the lower column), and the entry of rank q (0-based) in its row is
    kept with probability low + span · q / (cols − 1) (low + span / 2 in a one-entry row), drawn
    from (seed, input i, flat index). Writes the kept τ (else 0) to `out`; returns (Σ|τ|,
    Σ|kept τ|) per row, in float64, for the L1 rescale."""
    rows = tau.size // cols
    l1 = np.zeros((rows, 2))
    mask = np.uint64(0xFFFFFFFF)
    for r in prange(rows):
        start = r * cols
        before, after = 0.0, 0.0
        for q in range(cols):
            j = start + np.int64(order[start + q] & mask)
            p = low + span * 0.5 if cols == 1 else low + span * (np.float32(q) / np.float32(cols - 1))
            keep = _uniform(seed, np.uint64(i), np.uint64(j)) < p
            v = tau[j] * np.float32(keep)
            out[j] = v
            before += abs(tau[j])
            after += abs(v)
        l1[r, 0] = before
        l1[r, 1] = after
    return l1


@njit(cache=True, parallel=True, nogil=True)
def input_variance(out, thetas, base):
    """out[j] = the population variance over the inputs of τᵢ[j] = θᵢ[j] − base[j] (each τ in
    the working precision, the variance summed in float64, then rounded to `out`'s dtype)."""
    n, count = base.size, len(thetas)
    for blk in prange((n + BLOCK - 1) // BLOCK):
        for j in range(blk * BLOCK, min(n, (blk + 1) * BLOCK)):
            b = base[j]
            mean = 0.0
            for i in range(count):
                mean += np.float64(thetas[i][j] - b)
            mean /= count
            var = 0.0
            for i in range(count):
                e = np.float64(thetas[i][j] - b) - mean
                var += e * e
            out[j] = var / count


@njit(cache=True, inline="always")
def _selected(var, j, threshold, cut):
    """Whether entry j is among SCE's selected: var above the threshold, or at it up to index cut
    (a cut of -2 selects everything)."""
    if cut == -2:
        return True
    return (var[j] > threshold) | ((var[j] == threshold) & (j <= cut))


@njit(cache=True, parallel=True, nogil=True)
def selected_squares(thetas, base, var, threshold, cut):
    """Σⱼ τᵢ[j]² over the selected entries, per input (float64)."""
    n, count = base.size, len(thetas)
    blocks = (n + BLOCK - 1) // BLOCK
    sums = np.zeros((blocks, count))
    for blk in prange(blocks):
        for j in range(blk * BLOCK, min(n, (blk + 1) * BLOCK)):
            if _selected(var, j, threshold, cut):
                b = base[j]
                for i in range(count):
                    d = np.float64(thetas[i][j] - b)
                    sums[blk, i] += d * d
    return sums.sum(axis=0)


@njit(cache=True, parallel=True, nogil=True)
def sce_combine(out, thetas, base, var, threshold, cut, weights):
    """out = base + Σ wᵢ eᵢ τᵢ / max(Σ wᵢ eᵢ, 1e-6) over the selected entries (else the base),
    eᵢ = 1 where τᵢ's sign is the sign of Σᵢ τᵢ (≥ 0 counting as +), entry by entry."""
    n, count = base.size, len(thetas)
    zero = weights[0] - weights[0]
    for blk in prange((n + BLOCK - 1) // BLOCK):
        for j in range(blk * BLOCK, min(n, (blk + 1) * BLOCK)):
            b = base[j]
            if not _selected(var, j, threshold, cut):
                out[j] = b
                continue
            total = b - b
            for i in range(count):
                total += thetas[i][j] - b
            positive = total >= 0
            mixed, divisor = zero, zero
            for i in range(count):
                d = thetas[i][j] - b
                agree = np.float32((d > 0) if positive else (d < 0))
                mixed += d * (weights[i] * agree)
                divisor += weights[i] * agree
            out[j] = b + mixed / max(divisor, np.float32(1e-6))


@njit(cache=True, parallel=True, nogil=True)
def pair_sums(theta0, theta1, base, cols):
    """Per group of `cols` consecutive entries (the last may be shorter): (Σ τ₀², Σ τ₁², Σ τ₀τ₁)
    in float64, τᵢ = θᵢ − base in the working precision."""
    n = base.size
    groups = (n + cols - 1) // cols
    sums = np.zeros((groups, 3))
    for g in prange(groups):
        a, b, c = 0.0, 0.0, 0.0
        for j in range(g * cols, min(n, (g + 1) * cols)):
            x = np.float64(theta0[j] - base[j])
            y = np.float64(theta1[j] - base[j])
            a += x * x
            b += y * y
            c += x * y
        sums[g, 0] = a
        sums[g, 1] = b
        sums[g, 2] = c
    return sums


@njit(cache=True, parallel=True, nogil=True)
def interpolate(out, theta0, theta1, base, s0, s1, cols):
    """out[j] = base[j] + (s0[g] τ₀[j] + s1[g] τ₁[j]), g = j // cols, in the working precision."""
    n = base.size
    for blk in prange((n + BLOCK - 1) // BLOCK):
        for j in range(blk * BLOCK, min(n, (blk + 1) * BLOCK)):
            g = j // cols
            b = base[j]
            out[j] = b + (s0[g] * (theta0[j] - b) + s1[g] * (theta1[j] - b))


@njit(cache=True, parallel=True, nogil=True)
def gram(thetas):
    """G[i, k] = Σⱼ θᵢ[j] θₖ[j], summed in float64 (per block, then over blocks)."""
    n, count = thetas[0].size, len(thetas)
    blocks = (n + BLOCK - 1) // BLOCK
    partial = np.zeros((blocks, count, count))
    for blk in prange(blocks):
        for j in range(blk * BLOCK, min(n, (blk + 1) * BLOCK)):
            for i in range(count):
                x = np.float64(thetas[i][j])
                for k in range(i + 1):
                    partial[blk, i, k] += x * np.float64(thetas[k][j])
    g = partial.sum(axis=0)
    for i in range(count):
        for k in range(i):
            g[k, i] = g[i, k]
    return g


@njit(cache=True, parallel=True, nogil=True)
def weighted_sum(out, thetas, coefs):
    """out[j] = Σᵢ coefs[i] θᵢ[j], summed in float64, rounded to `out`'s dtype."""
    n, count = out.size, len(thetas)
    for blk in prange((n + BLOCK - 1) // BLOCK):
        for j in range(blk * BLOCK, min(n, (blk + 1) * BLOCK)):
            total = 0.0
            for i in range(count):
                total += coefs[i] * np.float64(thetas[i][j])
            out[j] = total
