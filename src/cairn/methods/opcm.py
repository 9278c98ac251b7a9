"""OPCM: orthogonal projection-based continual merging (Tang et al., "Merging Models on the Fly
Without Retraining: A Sequential Approach to Scalable Continual Model Merging", 2025), as
FusionBench's `fusion_bench/method/opcm/opcm.py` (`OPCMForCLIP` and `opcm_general.OPCM`) computes it.

Contributions arrive one at a time, each fine-tuned from the base on its own task (τ_t = θ_t −
θ_base); only the running merge is kept. Stage 1 is θ_1 (λ_1 = 1). At stage t ≥ 2, with τ_m the
merged task vector so far and λ_{t-1} its scale (S_{t-1} = λ_{t-1} · τ_m the unscaled sum):

- every linear layer's weight: SVD τ_m = U Σ Vᵀ; k = the first index whose cumulative share of
  the singular values exceeds `alpha` (Σ_{i≤k} σ_i / Σ σ > α); P = Uᵀ τ_t V with its diagonal and
  its top-left k × k block set to 0; the projected τ'_t = U P Vᵀ keeps out of the directions
  (u_i, v_i) of the merge so far and out of the span of its dominant ones;
- every other parameter (norms, embeddings, biases): τ'_t = τ_t;
- S_t = S_{t-1} + τ'_t; λ_t = ‖S_t‖ / mean_{j≤t} ‖τ_j‖ (norms over all parameters); the merge is
  θ_base + S_t / λ_t, whose task vector has the mean norm of the contributions'.

The zeroed entries all lie in the first r = min(out, in) rows and columns, so the projection is
computed from the reduced SVD: τ'_t = τ_t − U_r (M ⊙ U_rᵀ τ_t V_r) V_rᵀ, M the mask of zeroed
entries; equal to FusionBench's full-matrix form (tests/methods/test_opcm.py checks it), without
the out × out factor an LLM's untied output layer would need (49152² for the bundled model's
vocabulary). Norms are over the model's parameters (a tied embedding counted once; FusionBench's
state dicts count it twice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


def split_rank(s: Tensor, alpha: float) -> int:
    """The first index at which the cumulative share of the singular values `s` exceeds `alpha` (0 if none does)."""
    share = s.cumsum(0) / s.sum()
    return int((share > alpha).float().argmax())


def project_out(merged: Tensor, task: Tensor, alpha: float) -> Tensor:
    """The task vector `task` of a linear weight with its components on the merge's singular
    directions removed: the diagonal of Uᵀ τ V, and its top-left `split_rank` block."""
    merged, task = merged.float(), task.float()
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    v = vh.T
    k = split_rank(s, alpha)
    coefficients = u.T @ task @ v
    mask = torch.zeros_like(coefficients, dtype=torch.bool)
    mask.fill_diagonal_(True)
    mask[:k, :k] = True
    return task - u @ (coefficients * mask) @ v.T


def _norm(tensors) -> float:
    return math.sqrt(sum(float(t.float().pow(2).sum()) for t in tensors))


@dataclass
class ContinualMerge:
    """The running OPCM merge: `add` one contribution's task vector at a time."""

    alpha: float = 0.5
    merged: dict[str, Tensor] = field(default_factory=dict)  # τ_m, the merged task vector (scaled)
    scale: float = 1.0  # λ_t: S_t = λ_t · τ_m
    norms: list[float] = field(default_factory=list)  # ‖τ_j‖ of every contribution so far

    def add(self, task: dict[str, Tensor], linear: set[str]) -> dict[str, Tensor]:
        """Merge task vector `task` ({name: τ}, `linear` the names of linear layers' weights) into
        the running merge; returns the new merged task vector."""
        self.norms.append(_norm(task.values()))
        if not self.merged:
            self.merged = {name: t.float().clone() for name, t in task.items()}
            return self.merged
        total = {}
        for name, t in task.items():
            previous = self.merged[name]
            cleaned = project_out(previous, t, self.alpha) if name in linear and previous.ndim == 2 else t.float()
            total[name] = self.scale * previous + cleaned
        size, mean = _norm(total.values()), sum(self.norms) / len(self.norms)
        if size == 0:  # nothing moved: no direction to rescale
            self.merged = total
            return self.merged
        self.scale = size / mean
        self.merged = {name: t * (mean / size) for name, t in total.items()}
        return self.merged
