"""L2-SP (methods/l2.py) and the `l2` strategy on tiny-random."""

import copy

import pytest
import torch

from cairn.data import Example, Task
from cairn.methods.l2 import l2_sp, lora_delta_sq_norm, penalty
from cairn.options import L2Options, TrainConfig
from cairn.strategies import STRATEGIES
from cairn.training import add_lora
from cairn.workspace import Workspace

CFG = TrainConfig(epochs=2, lr=1e-2, batch_size=4, lora_r=4, warmup_ratio=0.0, bf16=False)


def task(name: str, n: int = 8) -> Task:
    return Task(name, "exact", {"train": [Example(f"Question: {name} code {i}?\nAnswer:", f"{name[:2]}{i}") for i in range(n)]})


def test_the_penalty_is_the_sum_of_squared_differences_from_the_base():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    anchors = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    direct = sum(float((p[i] - a[i]) ** 2) for p, a in zip([x.flatten() for x in params], [x.flatten() for x in anchors]) for i in range(p.numel()))
    assert l2_sp(params, anchors).item() == pytest.approx(direct, rel=1e-6)


def test_a_lora_modules_term_is_the_squared_norm_of_its_scaled_delta_from_r_by_r_products():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 7, generator=g), torch.randn(6, 4, generator=g)
    assert lora_delta_sq_norm(a, b, 0.5).item() == pytest.approx(torch.linalg.matrix_norm(0.5 * b @ a).pow(2).item(), rel=1e-5)


def test_with_lora_the_penalty_equals_lambda_times_the_merged_models_squared_distance_to_the_base(tiny):
    model, _ = tiny
    base = copy.deepcopy(model)
    peft = add_lora(copy.deepcopy(model), CFG)
    torch.manual_seed(0)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # a nonzero delta
    value = penalty(base, 0.3, "lora")(peft).item()
    merged = dict(copy.deepcopy(peft).merge_and_unload().named_parameters())
    direct = sum((merged[name] - p).pow(2).sum().item() for name, p in base.named_parameters())
    assert direct > 0 and value == pytest.approx(0.3 * direct, rel=1e-4)


def test_with_full_fine_tuning_the_penalty_reads_the_base_weights_copied_before_training(tiny):
    model, _ = tiny
    trained = copy.deepcopy(model)
    loss = penalty(trained, 2.0, "fft")  # anchors copied now
    with torch.no_grad():
        trained.model.norm.weight += 0.5
    assert loss(trained).item() == pytest.approx(2.0 * 0.25 * trained.model.norm.weight.numel(), rel=1e-5)


def run_l2(tiny, root, opts: L2Options, cfg: TrainConfig = CFG):
    model, tokenizer = tiny
    work = Workspace(root, "tiny-random", tokenizer, progress=False)
    notes = []
    stages = STRATEGIES["l2"](copy.deepcopy(model), iter([task("alpha"), task("beta")]), opts, cfg, work)
    models = []
    for m in stages:
        models.append(m)
        notes.append(dict(work.notes))
        work.notes.clear()
    return work, models, notes


def delta_norm(model) -> float:
    return sum(lora_delta_sq_norm(m.lora_A["default"].weight, m.lora_B["default"].weight, m.scaling["default"]).item()
               for m in model.modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}))  # fmt: skip


def test_l2_carries_one_adapter_through_the_stages_and_a_large_weight_keeps_it_near_the_base(tiny, tmp_path):
    free, free_models, _ = run_l2(tiny, tmp_path / "free", L2Options(lambda_=0.0))
    held, held_models, notes = run_l2(tiny, tmp_path / "held", L2Options(lambda_=10.0))
    assert held_models[0] is held_models[1]  # stage 2 continued the stage-1 adapter
    assert held_models[1].peft_config["default"].r == CFG.lora_r
    assert all(n["penalty_ratio"]["first"] >= 0 for n in notes) and "penalty_ratio" in notes[1]
    assert delta_norm(held_models[1]) < 0.5 * delta_norm(free_models[1])
    again, _, again_notes = run_l2(tiny, tmp_path / "held", L2Options(lambda_=10.0))  # cached: same folders, same rows
    assert again.used == held.used and again_notes == notes
