"""MagMax: continual merging by maximum magnitude (Marczak et al., "MagMax: Leveraging Model
Merging for Seamless Continual Learning", ECCV 2024).

The model is fine-tuned sequentially (stage s starts from stage s-1's model, as `sequential`);
τ_s = θ_s − θ_base is the task vector of the sequential model after stage s, relative to the base.
The model after stage s is θ_base + λ · m_s with, for every entry i,

    m_s,i = τ_j,i  where j = argmax_{j ≤ s} |τ_j,i|   (ties: the earliest stage),

the entry of largest magnitude across the stages' task vectors. It is kept as a running selection
(m_s = τ_s where |τ_s| > |m_{s-1}|, else m_{s-1}), which is the same choice with the same ties as
the stacked argmax of the paper's code (torch.argmax returns the first maximum); FusionBench's
`magmax` keeps the later one on ties, which differs only where two stages moved an entry by
exactly the same amount. λ (default 1) scales the selected vector, as FusionBench's `scaling_factor`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def magmax(vectors: list[Tensor]) -> Tensor:
    """Per entry, the value of largest magnitude across `vectors` (same shape; ties: the first)."""
    stacked = torch.stack(vectors)
    return stacked.gather(0, stacked.abs().argmax(0, keepdim=True)).squeeze(0)


def magmax_update(selected: Tensor, vector: Tensor) -> Tensor:
    """The running selection with one more task vector: `vector` where it is strictly larger in magnitude."""
    return torch.where(vector.abs() > selected.abs(), vector, selected)
