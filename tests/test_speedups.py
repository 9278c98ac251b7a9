"""The fused LoRA layer against PEFT's: same outputs and gradients, and only where it is exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cairn.speedups import fused_lora, lora_linear


class Two(nn.Module):
    """Two linear layers, one with a bias, for LoRA on both."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 40, bias=True)
        self.down = nn.Linear(40, 24, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def peft_model(seed=0, **lora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(Two(), LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], **lora))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapter's gradients and output non-trivial
            nn.init.normal_(p, std=0.5)
    return model


def outputs_and_grads(model, x, autocast=False):
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    (y.float() ** 2).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("autocast, tol", [(False, 1e-5), (True, 3e-2)])
def test_same_outputs_and_gradients_as_peft(autocast, tol):
    model = peft_model()
    x = torch.randn(3, 5, 24)
    y_ref, dx_ref, grads_ref = outputs_and_grads(model, x, autocast)
    with fused_lora(model, torch.bfloat16 if autocast else None) as swapped:
        y, dx, grads = outputs_and_grads(model, x, autocast)
    assert swapped == 2
    assert y.dtype == y_ref.dtype and dx.dtype == dx_ref.dtype
    assert set(grads) == set(grads_ref) and all("lora_" in name for name in grads)  # nothing frozen gets a gradient
    scale = lambda t: t.abs().max().item()  # noqa: E731
    assert (y - y_ref).abs().max().item() <= tol * scale(y_ref)
    assert (dx - dx_ref).abs().max().item() <= tol * scale(dx_ref)
    for name, g in grads.items():
        assert g.dtype == torch.float32
        assert (g - grads_ref[name]).abs().max().item() <= tol * scale(grads_ref[name]), name


def test_the_sum_it_computes_with_a_bias_and_an_input_without_gradient():
    torch.manual_seed(1)
    x, w, bias = torch.randn(7, 6), torch.randn(5, 6), torch.randn(5)
    a, b = torch.randn(3, 6, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    fused = lora_linear(x, w, bias, a, b, 0.5)
    plain = x @ w.T + bias + 0.5 * (x @ a.T) @ b.T
    assert torch.allclose(fused, plain, atol=1e-5)
    grads = torch.autograd.grad(fused.sum(), [a, b])
    expected = torch.autograd.grad(plain.sum(), [a, b])
    assert all(torch.allclose(g, e, atol=1e-5) for g, e in zip(grads, expected))


def test_gradients_match_autograd_of_the_plain_formula():
    torch.manual_seed(2)
    x, w, a, b = torch.randn(4, 6, requires_grad=True), torch.randn(5, 6), torch.randn(3, 6, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    torch.autograd.gradcheck(lambda x, a, b: lora_linear(x, w, None, a, b, 0.7), (x.double(), a.double(), b.double()))


def test_swaps_only_plain_lora_and_restores_peft():
    from peft.tuners.lora.layer import Linear

    for lora, expected in [({}, 2), ({"lora_dropout": 0.1}, 0), ({"use_dora": True}, 0)]:
        model = peft_model(**lora)
        with fused_lora(model) as swapped:
            assert swapped == expected
        assert all("forward" not in vars(m) for m in model.modules() if isinstance(m, Linear))


def test_peft_decides_when_adapters_are_disabled_or_several_are_active():
    model = peft_model()
    x = torch.randn(2, 24)
    with model.disable_adapter():
        base = model(x)
    with fused_lora(model):
        with model.disable_adapter():
            assert torch.equal(model(x), base)
        model.add_adapter("other", model.peft_config["default"])
        for name, p in model.named_parameters():
            if "lora_B.other" in name:  # a second adapter that changes the output
                nn.init.normal_(p, std=0.5)
        model.base_model.set_adapter(["default", "other"])
        fused_two = model(x)
    assert torch.equal(fused_two, model(x))  # both adapters, as PEFT sums them
