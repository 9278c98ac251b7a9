"""The test oracle of the Mixtral export: Cairn's own model of the mixture, written from the math.

`reference_model` builds the mixture `export_mixtral` writes as a float32 `LlamaForCausalLM` of the
base whose every MLP is a `MoeMLP`; tests/methods/moe/test_mixtral.py checks the export against it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cairn.errors import ModelError
from cairn.methods.moe.mixtral import _PROJECTIONS, _Mixture
from cairn.methods.moe.routing import topk_weights
from cairn.options import TEMPERATURE
from cairn.weights.tensor_files import stored


class MoeMLP(nn.Module):
    """A top-k mixture of silu-gated MLP experts: out = Σ_k w_k(x) · down_k(silu(gate_k x) ⊙ up_k x),
    w = topk_weights(router x). Cairn's model of a Mixtral sparse-MoE block, from the math alone."""

    def __init__(self, router, gate_proj, up_proj, down_proj, top_k: int):
        """router (E, hidden); gate_proj, up_proj (E, intermediate, hidden); down_proj (E, hidden, intermediate)."""
        super().__init__()
        self.top_k = top_k
        self.router = nn.Parameter(router)
        self.gate_proj, self.up_proj, self.down_proj = nn.Parameter(gate_proj), nn.Parameter(up_proj), nn.Parameter(down_proj)

    def forward(self, x):
        weights = topk_weights(F.linear(x, self.router).float(), self.top_k).to(x.dtype)
        out = torch.zeros_like(x)
        for k in range(self.router.shape[0]):
            h = F.silu(F.linear(x, self.gate_proj[k])) * F.linear(x, self.up_proj[k])
            out = out + weights[..., k : k + 1] * F.linear(h, self.down_proj[k])
        return out


def reference_model(
    base: str | Path,
    inputs: list[str | Path],
    *,
    router: str = "centroid",
    top_k: int = 2,
    shared: str = "base",
    temperature: float = TEMPERATURE["mixtral"]["centroid"],
    seed: int = 0,
):
    """The mixture `export_mixtral` writes, as a float32 `LlamaForCausalLM` of `base` whose every
    layer's `mlp` is a `MoeMLP` (same tensors and router, values as the export stores them)."""
    from transformers import LlamaForCausalLM

    mix = _Mixture(base, inputs, router=router, top_k=top_k, shared=shared, temperature=temperature, seed=seed)
    try:
        model = LlamaForCausalLM.from_pretrained(str(mix.base), dtype=torch.float32)

        def tensor(array, dtype):
            return torch.from_numpy(np.array(stored(np.asarray(array, np.float32), dtype), np.float32))

        if shared == "average":
            state = {n: tensor(mix.shared_tensor(n), mix.base_w.meta(n)[0]) for n in mix.shared_names}
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected:
                raise ModelError(f"{mix.base}: tensors {unexpected[:3]} are not in LlamaForCausalLM")
        for i, layer in enumerate(model.model.layers):
            stack = {p: torch.stack([tensor(mix.expert_tensor(k, mix.mlp[i, p]), mix.base_w.meta(mix.mlp[i, p])[0]) for k in range(len(mix.sources))]) for p in _PROJECTIONS}
            gate = tensor(mix.gates[i], mix.gate_dtype())
            layer.mlp = MoeMLP(gate, stack["gate_proj"], stack["up_proj"], stack["down_proj"], top_k)
    finally:
        mix.close()
    return model.eval()
