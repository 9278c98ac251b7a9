"""Small PEFT LoRA adapters of tiny-random, made in place, for the MoE tests (fixtures to import)."""

import pytest
import torch


def make_adapter(folder, seed: int, std: float = 0.05):
    """A rank-4 all-linear LoRA adapter of tiny-random with random A and B (seeded), saved at `folder`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cairn.models import resolve_folder

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(resolve_folder("tiny-random")), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=std)
    model.eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def three_experts(tmp_path_factory):
    """Three LoRA adapters of tiny-random and a fourth, `general`, for GenKnowSub."""
    root = tmp_path_factory.mktemp("arrow")
    return [make_adapter(root / f"e{k}", 10 + k) for k in range(3)], make_adapter(root / "general", 20)


@pytest.fixture
def fresh_base():
    """A function returning a fresh tiny-random base (attaching experts modifies it in place)."""
    from cairn.models import load_model

    return lambda: load_model("tiny-random")[0]
