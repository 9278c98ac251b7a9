"""A PEFT LoRA linear layer, y = x Wᵀ + b + s · (x Aᵀ) Bᵀ, as one autograd node while training.

PEFT builds the layer from separate modules (the base layer, dropout, A, B, a scale and an add),
each cast by autocast and each an autograd node. On the short examples Cairn trains on a CPU,
those per-op costs are a large part of a step. Here the forward is three matmuls (the add and the
scale folded into the last, an `addmm`) and the backward five, with no gradient for the frozen W
and the casts done once. PEFT's own layer stays the reference: `fused_lora` swaps this in only
where the layer is plain LoRA, and tests/test_fused_lora.py checks outputs and gradients against
PEFT. No library offers this for CPU training (Unsloth's and Liger's kernels are GPU-only).
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(dtype)
        w, a, b_scaled = weight.to(dtype), lora_a.to(dtype), (lora_b * scale).to(dtype)
        h = rows @ a.t()
        base = rows @ w.t() if bias is None else torch.addmm(bias.to(dtype), rows, w.t())
        y = torch.addmm(base, h, b_scaled.t())
        ctx.save_for_backward(rows, h, w, a, b_scaled)
        ctx.scale, ctx.x_dtype, ctx.x_shape, ctx.a_dtype, ctx.b_dtype = scale, x.dtype, x.shape, lora_a.dtype, lora_b.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        rows, h, w, a, b_scaled = ctx.saved_tensors
        dy = grad_y.reshape(-1, grad_y.shape[-1]).to(rows.dtype)
        dh = dy @ b_scaled  # the gradient reaching x Aᵀ, scale included
        needs_x, _, _, needs_a, needs_b = ctx.needs_input_grad[:5]
        grad_x = grad_a = grad_b = None
        if needs_x:
            grad_x = torch.addmm(dy @ w, dh, a).view(ctx.x_shape).to(ctx.x_dtype)
        if needs_a:
            grad_a = (dh.t() @ rows).to(ctx.a_dtype)
        if needs_b:
            grad_b = torch.addmm(b_scaled.new_empty(b_scaled.shape), dy.t(), h, beta=0, alpha=ctx.scale).to(ctx.b_dtype)
        return grad_x, None, None, grad_a, grad_b, None, None


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scale: float, dtype: torch.dtype | None = None) -> Tensor:
    """x Wᵀ + bias + scale · (x Aᵀ) Bᵀ computed in `dtype` (default: x's), with gradients for x, A
    and B only (W and the bias are frozen). The result is in `dtype`, as autocast's would be."""
    return _LoraLinear.apply(x, weight, bias, lora_a, lora_b, scale, dtype or x.dtype)


def _plain_adapter(layer) -> str | None:
    """The one active adapter of a PEFT LoRA `layer` if the fused form computes it exactly as PEFT
    does (a frozen `nn.Linear` base, no dropout, DoRA, LoRA bias or merged weights), else None."""
    from peft.tuners.lora.layer import Linear

    if not isinstance(layer, Linear) or layer.merged or getattr(layer, "fan_in_fan_out", False) or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    base = layer.base_layer
    if name not in layer.lora_A or type(base) is not nn.Linear or any(p.requires_grad for p in base.parameters()):
        return None
    if not isinstance(layer.lora_dropout[name], nn.Identity) or layer.lora_bias.get(name) or name in layer.lora_variant:
        return None  # dropout, a LoRA bias, or a variant (DoRA and others) of the plain sum
    return name


@contextmanager
def fused_lora(model, dtype: torch.dtype | None = None):
    """Inside, `model`'s plain LoRA layers (see `_plain_adapter`) compute with `lora_linear` in
    `dtype` (default: their input's), unless adapters are disabled or merged meanwhile; PEFT's own
    forward computes them after. Yields how many layers were swapped."""
    swapped = []

    def forward(layer, name):
        lora_a, lora_b, base, scale = layer.lora_A[name].weight, layer.lora_B[name].weight, layer.base_layer, layer.scaling[name]
        peft_forward = type(layer).forward

        def fused(self, x, *args, **kwargs):
            if args or kwargs or self.disable_adapters or self.merged or self.active_adapters != [name]:
                return peft_forward(self, x, *args, **kwargs)
            return lora_linear(x, base.weight, base.bias, lora_a, lora_b, scale, dtype)

        return fused

    for module in model.modules():
        name = _plain_adapter(module)
        if name is not None:
            module.forward = types.MethodType(forward(module, name), module)
            swapped.append(module)
    try:
        yield len(swapped)
    finally:
        for module in swapped:
            del module.forward
