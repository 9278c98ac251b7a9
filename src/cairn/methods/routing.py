"""Top-k routing: the pure math every mixture in Cairn shares (LoRA experts and Mixtral export)."""

from __future__ import annotations

import torch


def topk_weights(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Mixture weights over the last dimension (experts): the softmax of the `k` largest logits,
    zero elsewhere. Equals Mixtral's softmax-then-top-k-then-renormalise, computed in one step."""
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, top.indices, top.values.softmax(-1))
