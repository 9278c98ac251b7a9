"""How much LoRA contributions share: ‖Σₖ ΔWₖ‖_F / Σₖ ‖ΔWₖ‖_F, per module and over the model.

1.0 means the deltas are aligned (one direction, scaled); sqrt(Σₖ‖ΔWₖ‖²) / Σₖ‖ΔWₖ‖ (1/√K for K
deltas of one norm) is what mutually orthogonal deltas give; above it, the contributions share a
component, which merging them counts more than once. Computed from the factors: with
ΔWₖ = sₖBₖAₖ, ⟨ΔWⱼ, ΔWₖ⟩_F = sⱼsₖ Σ (BⱼᵀBₖ) ⊙ (AⱼAₖᵀ), an r×r product, never an out×in matrix.
"""

from __future__ import annotations

import math

import numpy as np


def gram(factors: list[tuple | None]) -> np.ndarray:
    """The K×K Gram matrix ⟨ΔWⱼ, ΔWₖ⟩_F (float64) of one module's deltas, each given as (A, B,
    scale, ...) as `read_lora` gives them, or None where a contribution leaves the module alone."""
    g = np.zeros((len(factors), len(factors)))
    for j, fj in enumerate(factors):
        for k, fk in enumerate(factors[: j + 1]):
            if fj is None or fk is None:
                continue
            (aj, bj, sj, *_), (ak, bk, sk, *_) = fj, fk
            bb = bj.astype(np.float64).T @ bk.astype(np.float64)
            aa = aj.astype(np.float64) @ ak.astype(np.float64).T
            g[j, k] = g[k, j] = sj * sk * float((bb * aa).sum())
    return g


def ratios(g: np.ndarray) -> dict[str, float | None]:
    """{"ratio": ‖ΣΔW‖/Σ‖ΔW‖, "orthogonal": the ratio of orthogonal deltas of the same norms} from a
    Gram matrix; both None where every delta is 0."""
    total = float(np.sqrt(np.clip(np.diag(g), 0, None)).sum())
    if total == 0:
        return {"ratio": None, "orthogonal": None}
    return {"ratio": math.sqrt(max(float(g.sum()), 0.0)) / total, "orthogonal": math.sqrt(float(np.trace(g))) / total}


def interference(adapters: list[dict[str, tuple]]) -> dict:
    """The contributions' ratios (see `ratios`) over the whole model, each delta being all of its
    modules' ΔW together, and `by_layer`: per module; `adapters`: each one's `read_lora` output."""
    total, by_layer = np.zeros((len(adapters), len(adapters))), {}
    for module in sorted({m for a in adapters for m in a}):
        g = gram([a.get(module) for a in adapters])
        total += g
        by_layer[module] = ratios(g)
    return {**ratios(total), "by_layer": by_layer}
