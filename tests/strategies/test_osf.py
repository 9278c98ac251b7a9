"""The `osf` strategy: PEFT's OSFConfig in its sequential recipe on tiny-random."""

import copy

import pytest
import torch

import cairn.strategies.osf as strategy
from cairn.config import QUICKSTART, parse_config
from cairn.data import Example, Task
from cairn.errors import ConfigError
from cairn.options import OSFOptions, TrainConfig
from cairn.strategies import STRATEGIES
from cairn.workspace import Workspace

CFG = TrainConfig(method="fft", epochs=2, lr=1e-3, batch_size=4, warmup_ratio=0.0, bf16=False)


def task(name: str, n: int = 8) -> Task:
    return Task(name, "exact", {"train": [Example(f"Question: {name} code {i}?\nAnswer:", f"{name[:2]}{i}") for i in range(n)]})


def test_the_preserved_share_grows_by_the_step_up_to_its_cap():
    assert [strategy.preserved(OSFOptions(), s) for s in range(1, 6)] == [0.3, 0.5, 0.7, 0.9, 0.9]
    assert [strategy.preserved(OSFOptions(effective_rank=0.5, rank_step=0.0), s) for s in (1, 3)] == [0.5, 0.5]


def run_osf(tiny, root):
    model, tokenizer = tiny
    work = Workspace(root, "tiny-random", tokenizer, progress=False)
    notes, models = [], []
    for m in STRATEGIES["osf"](copy.deepcopy(model), iter([task("alpha"), task("beta")]), OSFOptions(), CFG, work):
        models.append(copy.deepcopy(m))
        notes.append(dict(work.notes))
        work.notes.clear()
    return work, models, notes


def test_each_stage_merges_its_update_into_a_full_model_that_a_rerun_reuses(tiny, tmp_path, monkeypatch):
    model, _ = tiny
    work, models, notes = run_osf(tiny, tmp_path)
    assert [n["osf_effective_rank"] for n in notes] == [0.3, 0.5]
    assert all((f / "config.json").is_file() and f.parent.name == "osf" for f in work.used)
    base = dict(model.named_parameters())
    moved = {n for n, p in models[0].named_parameters() if not torch.equal(p, base[n])}
    assert moved and all(n.endswith("proj.weight") for n in moved)  # the linear layers' update was kept, nothing else changed
    monkeypatch.setattr(strategy, "train", lambda *a, **k: pytest.fail("trained again"))
    again, reloaded, _ = run_osf(tiny, tmp_path)
    assert again.used == work.used
    for (name, p), q in zip(models[1].named_parameters(), reloaded[1].parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_peft_unload_drops_the_osf_update_which_merge_and_unload_keeps(tiny):
    from peft import OSFConfig, get_peft_model

    model, _ = tiny
    weight = model.model.layers[0].self_attn.q_proj.weight.detach().clone()

    def trained():
        wrapped = get_peft_model(copy.deepcopy(model), OSFConfig(target_modules=["q_proj"], effective_rank=0.5))
        with torch.no_grad():
            for name, p in wrapped.named_parameters():
                if "osf_svd_params" in name and name.endswith("S_low"):
                    p.mul_(2.0)
        return wrapped

    assert torch.equal(trained().unload().model.layers[0].self_attn.q_proj.weight, weight)
    assert not torch.allclose(trained().merge_and_unload().model.layers[0].self_attn.q_proj.weight, weight)


def test_osf_trains_full_weight_subspaces_only():
    with pytest.raises(ConfigError, match=r"strategy 'o' \(kind osf\) trains with method fft only, got train method 'lora'"):
        parse_config({**QUICKSTART, "strategies": [{"name": "o", "kind": "osf"}]})
    cfg = parse_config({**QUICKSTART, "setting": "semi", "strategies": [{"name": "o", "kind": "osf", "train": {"method": "fft"}, "rank_step": 0.1}]})
    assert cfg.strategies[0].typed_options().rank_step == 0.1
