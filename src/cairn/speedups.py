"""The speed-ups the training loop switches on, each measured in bench/train.py and each leaving
the numbers as they were (or as autocast's bf16 makes them): a fused LoRA layer, frozen weights
held in bf16, a sparse lookup for a tied embedding, eager attention on short examples, and
malloc settings that keep freed memory for the next step.

The fused LoRA layer, y = x Wᵀ + b + s · (x Aᵀ) Bᵀ, is one autograd node while training.

PEFT builds the layer from separate modules (the base layer, dropout, A, B, a scale and an add),
each cast by autocast and each an autograd node. On the short examples Cairn trains on a CPU,
those per-op costs are a large part of a step. Here the forward is three matmuls (the add and the
scale folded into the last, an `addmm`) and the backward five, with no gradient for the frozen W
and the casts done once. PEFT's own layer stays the reference: `fused_lora` swaps this in only
where the layer is plain LoRA, and tests/test_speedups.py checks outputs and gradients against
PEFT. No library offers this for CPU training (Unsloth's and Liger's kernels are GPU-only).
"""

from __future__ import annotations

import ctypes
import platform
import types
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from cairn.models import causal_lm_of
from cairn.options import TrainConfig

# Longest example (tokens) trained with eager attention. On CPU, SDPA's backward is slow on short
# sequences: eager attention trains the bundled model 1.04x-1.3x faster up to 512 tokens
# (bench/train.py); beyond that its L x L scores cost more memory than they save time.
EAGER_ATTENTION_UP_TO = 512


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


@contextmanager
def frozen_in_bf16(model, enabled: bool):
    """Hold the frozen weights of linear layers in bfloat16 while training, restoring the originals after.

    Autocast re-casts a frozen weight at every use (it caches only leaves that require grad), so
    casting them once gives the same numbers for less memory traffic. Embeddings stay as they are:
    the residual stream keeps autocast's float32. An output layer tied to a frozen embedding gets a
    bfloat16 copy of it for the while (the vocabulary-sized cast is a few percent of a LoRA step).
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    frozen = {
        id(m.weight): m.weight
        for m in model.modules()
        if enabled and isinstance(m, nn.Linear) and not m.weight.requires_grad and m.weight.dtype == torch.float32 and id(m.weight) not in embeddings
    }
    originals = [(p, p.data) for p in frozen.values()]
    for p, data in originals:
        p.data = data.to(torch.bfloat16)
    causal_lm = causal_lm_of(model)
    output = causal_lm.get_output_embeddings()
    weight = getattr(output, "weight", None)
    tied = weight if enabled and id(weight) in embeddings and not weight.requires_grad and weight.dtype == torch.float32 else None
    if tied is not None:
        output.weight = nn.Parameter(tied.detach().to(torch.bfloat16), requires_grad=False)
    try:
        yield
    finally:
        for p, data in originals:
            p.data = data
        if tied is not None:
            output.weight = tied


@contextmanager
def sparse_tied_lookup(model):
    """Give a trained embedding tied to the output layer a sparse lookup gradient while training.

    The lookup touches only the batch's tokens, but its default gradient is a dense zero-filled
    vocabulary-sized matrix (113 MB for the bundled model) added to the output layer's dense one.
    Sparse, it is added into the output layer's gradient in place, so the parameter's gradient is
    still dense (fused AdamW needs that): +4-6% an FFT step. Untied or frozen embeddings are left.
    """
    causal_lm = causal_lm_of(model)
    lookup, output = causal_lm.get_input_embeddings(), causal_lm.get_output_embeddings()
    switch = isinstance(lookup, nn.Embedding) and not lookup.sparse and lookup.weight.requires_grad and getattr(output, "weight", None) is lookup.weight
    if switch:
        lookup.sparse = True
    try:
        yield
    finally:
        if switch:
            lookup.sparse = False


@contextmanager
def attention_for(model, longest: int):
    """Eager attention while training on examples of at most `EAGER_ATTENTION_UP_TO` tokens (the
    model's own choice, usually SDPA, otherwise), restored after."""
    causal_lm = causal_lm_of(model)
    before = getattr(causal_lm.config, "_attn_implementation", None)
    switch = longest <= EAGER_ATTENTION_UP_TO and before not in (None, "eager") and hasattr(causal_lm, "set_attn_implementation")
    if switch:
        causal_lm.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            causal_lm.set_attn_implementation(before)


def reuse_freed_memory() -> bool:
    """Let glibc's malloc hand freed memory back to the next allocation rather than to the OS.

    A training step frees and reallocates hundreds of MB of activations and gradients. By default
    glibc returns much of it to the OS (tensors above its adaptive mmap threshold, and the heap's
    top beyond 128 KB), so the next step faults it back in page by page: 4-5 M page faults in
    bench/train.py's FFT run. With tensors up to 32 MB (glibc's limit) taken from the heap and up to
    1 GB of free heap kept, FFT trains 5-8% faster for ~0.2 GB more peak memory. Process-wide and
    idempotent; returns False where the C library is not glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**30))


def bf16_supported() -> bool:
    """True on a CUDA device with bf16, or a CPU with native bf16 instructions (AVX512-BF16 / AMX)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def uses_bf16(cfg: TrainConfig) -> bool:
    """Whether a training run computes in bf16: `cfg.bf16` as set, or for "auto" whether the
    machine supports it. Part of a contribution's identity (its cache key), as the numbers differ."""
    return bf16_supported() if cfg.bf16 == "auto" else cfg.bf16

