"""EWC (methods/ewc.py): the penalty's formula, the contributor's Fisher file, and the `ewc` strategy."""

import copy

import pytest
import torch
from safetensors import safe_open

from cairn.config import parse_config
from cairn.data import Example, Task
from cairn.errors import ModelError
from cairn.methods.ewc import FILE, consolidate, diagonal_fisher, load_anchor, load_fisher, penalty, quadratic, saved_name
from cairn.options import EWCOptions, TrainConfig
from cairn.strategies import STRATEGIES
from cairn.training import add_lora, answer_loss
from cairn.data.batching import collate, encode, pad_id
from cairn.workspace import Workspace
from conftest import code_tasks

CFG = TrainConfig(epochs=2, lr=1e-2, batch_size=4, lora_r=4, warmup_ratio=0.0, bf16=False)


def task(name: str, n: int = 6) -> Task:
    return Task(name, "exact", {"train": [Example(f"Question: {name} code {i}?\nAnswer:", f"{name[:2]}{i}") for i in range(n)]})


def test_the_consolidated_quadratic_equals_one_penalty_per_earlier_stage():
    g = torch.Generator().manual_seed(0)
    fishers = [torch.rand(4, 5, generator=g) for _ in range(3)]
    fishers[0][0] = 0  # entries no stage cares about, in one and in all stages
    for f in fishers:
        f[1, :2] = 0
    anchors = [torch.randn(4, 5, generator=g) for _ in range(3)]
    theta = torch.randn(4, 5, generator=g)
    direct = sum(float(f[i, k] * (theta[i, k] - a[i, k]) ** 2) for f, a in zip(fishers, anchors) for i in range(4) for k in range(5))
    assert quadratic([theta], [consolidate(fishers, anchors)]).item() == pytest.approx(direct, rel=1e-5)


def test_the_fisher_is_the_mean_squared_per_example_gradient(tiny):
    model, tokenizer = tiny
    peft = add_lora(copy.deepcopy(model), CFG)
    torch.manual_seed(0)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.1)
    examples = task("alpha", 3).train
    fisher = diagonal_fisher(peft, tokenizer, examples, "lora")
    name, param = next((n, p) for n, p in peft.named_parameters() if "q_proj.lora_A" in n)
    param.requires_grad_(True)
    squares = []
    for ex in examples:  # the slow transcription: one example's loss, its gradient, squared
        batch = collate([encode(ex, tokenizer)], pad_id(tokenizer))
        (grad,) = torch.autograd.grad(answer_loss(peft, batch)[0], param)
        squares.append(grad.pow(2))
    expected = torch.stack(squares).mean(0)
    assert saved_name(name) in fisher and ".default." not in saved_name(name)
    torch.testing.assert_close(fisher[saved_name(name)], expected, rtol=1e-4, atol=1e-10)
    assert set(fisher) == {saved_name(n) for n, _ in peft.named_parameters() if "lora_" in n}
    assert fisher[saved_name(name)].sum() > 0
    pairs = diagonal_fisher(peft, tokenizer, examples, "lora", batch_size=2)[saved_name(name)]
    assert not torch.allclose(pairs, fisher[saved_name(name)])  # squared batch gradients are another estimate


def run_ewc(tiny, root, opts: EWCOptions, cfg: TrainConfig = CFG):
    model, tokenizer = tiny
    work = Workspace(root, "tiny-random", tokenizer, progress=False)
    notes, models = [], []
    for m in STRATEGIES["ewc"](copy.deepcopy(model), iter([task("alpha"), task("beta")]), opts, cfg, work):
        models.append(m)
        notes.append(dict(work.notes))
        work.notes.clear()
    return work, models, notes


def test_each_stage_ships_its_fisher_beside_its_weights_under_the_same_names(tiny, tmp_path):
    work, models, notes = run_ewc(tiny, tmp_path, EWCOptions(lambda_=1e3))
    first, second = work.used
    for folder in (first, second):
        with safe_open(folder / FILE, framework="pt") as f:
            keys, meta = set(f.keys()), f.metadata()
        with safe_open(folder / "adapter_model.safetensors", framework="pt") as f:
            assert keys == set(f.keys())
        assert meta == {"examples": "6", "batch_size": "1"}
    assert "penalty_ratio" not in notes[0] and notes[1]["penalty_ratio"]["first"] == 0 < notes[1]["penalty_ratio"]["last"]  # stage 2 starts at stage 1's weights
    # stage 2's penalty at its start is the formula over stage 1's shipped Fisher and weights
    fisher, anchor = load_fisher(first), load_anchor(first, load_fisher(first))
    start = copy.deepcopy(models[0])  # the model object went on training: rebuild stage 1's state
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(start, load_file(first / "adapter_model.safetensors"))
    with torch.no_grad():
        for name, p in start.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
                p.add_(0.01)
    direct = sum((fisher[saved_name(n)] * (p.detach() - anchor[saved_name(n)]).pow(2)).sum().item() for n, p in start.named_parameters() if "lora_" in n)
    assert penalty([first], 1e3)(start).item() == pytest.approx(1e3 * direct, rel=1e-4)


def test_a_rerun_reuses_the_stages_and_their_fisher_files(tiny, tmp_path, monkeypatch):
    import cairn.strategies.ewc as strategy

    work, _, notes = run_ewc(tiny, tmp_path, EWCOptions())
    monkeypatch.setattr(strategy, "diagonal_fisher", lambda *a, **k: pytest.fail("the Fisher was computed again"))
    again, _, again_notes = run_ewc(tiny, tmp_path, EWCOptions())
    assert again.used == work.used and again_notes == notes


def test_the_penalty_is_built_from_contribution_folders_and_refuses_one_without_its_fisher(tiny, tmp_path):
    work, _, _ = run_ewc(tiny, tmp_path, EWCOptions())
    (work.used[0] / FILE).unlink()
    with pytest.raises(ModelError, match=rf"{FILE} not found: EWC needs the Fisher information each earlier contributor computes on its own training data"):
        penalty([work.used[0]], 1.0)


def test_ewc_and_l2_run_in_the_semi_setting_end_to_end(tmp_path):
    import cairn

    config = parse_config({
        "name": "cl", "base": "tiny-random", "tasks": code_tasks(tmp_path), "probe": None, "setting": "semi",
        "train": {"method": "lora", "epochs": 1, "batch_size": 4, "lr": 1e-2},
        "strategies": [{"name": "ewc", "kind": "ewc", "lambda": 50}, {"name": "l2", "kind": "l2", "lambda": 0.5}],
    })  # fmt: skip
    assert config.strategies[0].typed_options().lambda_ == 50
    results = cairn.run(config, tmp_path / "run", progress=False, log=lambda *_: None)
    for name in ("ewc", "l2"):
        entry = results["strategies"][name]
        assert len(entry["R"]) == 3 and entry["summary"]["op"] is not None
        assert "penalty_ratio" in entry["stages"][1]


def test_with_full_fine_tuning_the_fisher_covers_every_saved_weight(tiny, tmp_path):
    cfg = TrainConfig(method="fft", epochs=1, lr=1e-3, batch_size=4, warmup_ratio=0.0, bf16=False)
    work, models, notes = run_ewc(tiny, tmp_path, EWCOptions(lambda_=1e3), cfg)
    with safe_open(work.used[0] / FILE, framework="pt") as f:
        keys = set(f.keys())
    with safe_open(work.used[0] / "model.safetensors", framework="pt") as f:
        assert keys == set(f.keys())
    assert notes[1]["penalty_ratio"]["last"] > 0
