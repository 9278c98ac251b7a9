"""Per-entry loops of the task-arithmetic merges, compiled with numba.

Written as loops because a merge is a handful of arithmetic per entry: as chains of tensor
operations the same work made ~15 passes over memory (and bool-tensor kernels are slow on CPU),
about 5x slower than one fused pass. Compiled once per machine (cached beside this file or in
NUMBA_CACHE_DIR); both cores work on disjoint blocks of entries.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

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


@njit(cache=True, parallel=True)
def band_counts(theta, base, lo, hi):
    """Per block: (entries with |θ − base| > hi, entries with lo <= |θ − base| <= hi)."""
    n = base.size
    blocks = (n + BLOCK - 1) // BLOCK
    above = np.zeros(blocks, np.int64)
    inside = np.zeros(blocks, np.int64)
    for blk in prange(blocks):
        a = 0
        c = 0
        for j in range(blk * BLOCK, min(n, (blk + 1) * BLOCK)):
            m = abs(theta[j] - base[j])
            a += m > hi
            c += (m >= lo) & (m <= hi)
        above[blk] = a
        inside[blk] = c
    return above, inside


@njit(cache=True, parallel=True)
def band_gather(theta, base, lo, hi, inside):
    """The magnitudes inside [lo, hi] and their flat indices, in index order.

    Branch-free: every entry is written and the write position advances only for entries inside
    (4x faster than a conditional store); each block gets one spare slot for its last write.
    """
    n = base.size
    blocks = inside.size
    starts = np.zeros(blocks + 1, np.int64)
    for blk in range(blocks):
        starts[blk + 1] = starts[blk] + inside[blk] + 1
    values = np.empty(starts[blocks], theta.dtype)
    where = np.empty(starts[blocks], np.int64)
    for blk in prange(blocks):
        k = starts[blk]
        for j in range(blk * BLOCK, min(n, (blk + 1) * BLOCK)):
            m = abs(theta[j] - base[j])
            values[k] = m
            where[k] = j
            k += (m >= lo) & (m <= hi)
    real = np.ones(starts[blocks], np.bool_)
    real[starts[1:] - 1] = False
    return values[real], where[real]


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


@njit(cache=True, parallel=True)
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
