"""LwF (methods/lwf.py): the distillation term's formula, its hook on the training loop, and the `lwf` strategy."""

import copy
import math

import pytest
import torch

from cairn.config import parse_config
from cairn.data import Example, Task
from cairn.data.batching import collate, encode, pad_id
from cairn.methods.lwf import Distillation, distillation_kl
from cairn.options import LwFOptions, SequentialOptions, TrainConfig
from cairn.strategies import STRATEGIES
from cairn.training import add_lora, answer_loss
from cairn.workspace import Workspace
from conftest import code_tasks

CFG = TrainConfig(epochs=2, lr=1e-2, batch_size=4, lora_r=4, warmup_ratio=0.0, bf16=False)


def task(name: str, n: int = 8) -> Task:
    return Task(name, "exact", {"train": [Example(f"Question: {name} code {i}?\nAnswer:", f"{name[:2]}{i}") for i in range(n)]})


def test_the_term_is_the_mean_kl_from_the_teachers_tempered_distribution():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        p = [math.exp(x / 2) for x in t_row]
        q = [math.exp(x / 2) for x in s_row]
        p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert distillation_kl(student, teacher, 2.0).item() == pytest.approx(total / 3, rel=1e-5)
    assert distillation_kl(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def batch_of(tokenizer, n=3):
    return collate([encode(ex, tokenizer) for ex in task("beta", n).train], pad_id(tokenizer))


def direct_kl(student_model, teacher_model, batch, temperature):
    """The formula from the two models' full logits, at the real positions."""
    with torch.no_grad():
        s = student_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t = teacher_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    return distillation_kl(s[real], t[real], temperature).item()


def test_with_lora_the_teacher_is_the_model_without_its_adapter_and_the_term_reads_the_loops_batch(tiny):
    model, tokenizer = tiny
    peft = add_lora(copy.deepcopy(model), CFG)
    batch = batch_of(tokenizer)
    with Distillation(peft, None, 0.7, 2.0) as term:
        answer_loss(peft, batch)  # the loop's forward pass, which the term reads
        assert term(peft).item() == pytest.approx(0.0, abs=1e-6)  # a fresh adapter (B = 0) is its teacher
        torch.manual_seed(0)
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.data.normal_(std=0.05)
        answer_loss(peft, batch)
        value = term(peft)
        assert value.requires_grad  # it trains the student
    teacher = copy.deepcopy(model)
    expected = 0.7 * direct_kl(peft, teacher, batch, 2.0)
    assert expected > 0 and value.item() == pytest.approx(expected, rel=1e-4)
    assert not peft.get_base_model().model._forward_hooks  # the context removed its hook


def test_with_full_fine_tuning_the_teacher_is_a_frozen_copy(tiny):
    model, tokenizer = tiny
    student, teacher = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        student.model.norm.weight.mul_(1.5)
    batch = batch_of(tokenizer, 2)
    with Distillation(student, teacher, 1.0, 1.0) as term:
        answer_loss(student, batch)
        value = term(student).item()
    assert value > 0 and value == pytest.approx(direct_kl(student, teacher, batch, 1.0), rel=1e-4)


def kl_to(before, after, tokenizer) -> float:
    return direct_kl(after, before, batch_of(tokenizer, 8), 2.0)


def test_lwf_shares_stage_one_with_sequential_and_distillation_keeps_stage_two_near_stage_one(tiny, tmp_path):
    model, tokenizer = tiny
    tasks = [task("alpha"), task("beta")]
    runs = {}
    for lam in (0.0, 1000.0):
        work = Workspace(tmp_path, "tiny-random", tokenizer, progress=False)
        notes, models = [], []
        for m in STRATEGIES["lwf"](copy.deepcopy(model), iter(tasks), LwFOptions(lambda_=lam), CFG, work):
            models.append(copy.deepcopy(m))
            notes.append(dict(work.notes))
            work.notes.clear()
        runs[lam] = (work, models, notes)
    seq = Workspace(tmp_path, "tiny-random", tokenizer, progress=False)
    list(STRATEGIES["sequential"](copy.deepcopy(model), iter(tasks[:1]), SequentialOptions(), CFG, seq))
    held_work, held, held_notes = runs[1000.0]
    assert held_work.used[0] == seq.used[0] == runs[0.0][0].used[0]  # stage 1: the plain contribution
    assert held_notes[0] == {} and held_notes[1]["penalty_ratio"]["first"] == pytest.approx(0.0, abs=1e-6)
    assert held_notes[1]["penalty_ratio"]["last"] > 0
    free = runs[0.0][1]
    assert kl_to(held[0], held[1], tokenizer) < 0.5 * kl_to(free[0], free[1], tokenizer)


def test_lwf_and_magmax_run_in_the_semi_setting_end_to_end(tmp_path):
    import cairn

    config = parse_config({
        "name": "cl", "base": "tiny-random", "tasks": code_tasks(tmp_path), "probe": None, "setting": "semi",
        "train": {"method": "lora", "epochs": 1, "batch_size": 4, "lr": 1e-2},
        "strategies": [{"name": "lwf", "kind": "lwf", "lambda": 2, "temperature": 1}, {"name": "magmax", "kind": "magmax"}],
    })  # fmt: skip
    results = cairn.run(config, tmp_path / "run", progress=False, log=lambda *_: None)
    for name in ("lwf", "magmax"):
        assert len(results["strategies"][name]["R"]) == 3 and results["strategies"][name]["summary"]["op"] is not None
    assert "penalty_ratio" in results["strategies"]["lwf"]["stages"][1]


def test_lwf_with_full_fine_tuning_distils_to_a_copy_of_the_stage_one_model(tiny, tmp_path):
    model, tokenizer = tiny
    cfg = TrainConfig(method="fft", epochs=1, lr=1e-3, batch_size=4, warmup_ratio=0.0, bf16=False)
    work = Workspace(tmp_path, "tiny-random", tokenizer, progress=False)
    notes = []
    for _ in STRATEGIES["lwf"](copy.deepcopy(model), iter([task("alpha"), task("beta")]), LwFOptions(lambda_=10.0), cfg, work):
        notes.append(dict(work.notes))
        work.notes.clear()
    assert notes[1]["penalty_ratio"]["first"] == pytest.approx(0.0, abs=1e-6) and notes[1]["penalty_ratio"]["last"] > 0
