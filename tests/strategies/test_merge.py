"""The `merge` strategy inside an experiment: per-task contributions from the base, merged per stage."""

import json

import torch

import cairn.workspace as workspace
from cairn.config import parse_config
from cairn.experiment import run_experiment
from cairn.manifest import read_manifest
from conftest import code_tasks


def config(tmp_path):
    return parse_config({
        "name": "merge", "base": "tiny-random", "tasks": code_tasks(tmp_path), "probe": None, "setting": "semi",
        "train": {"method": "lora", "epochs": 1, "batch_size": 4, "lr": 1e-2},
        "strategies": [{"name": "avg", "kind": "merge", "method": "average"}, {"name": "ties", "kind": "merge", "method": "ties", "density": 0.5, "lambda": 1.5}],
    })  # fmt: skip


def test_merge_strategy_merges_independent_contributions_and_reruns_from_cache(tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file

    import cairn.strategies.merge as strategy

    calls, merged_folders, evaluations = [], [], []
    real_train, real_merge, real_evaluate = workspace.train, strategy.merge_models, workspace.evaluate_task
    monkeypatch.setattr(workspace, "train", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    monkeypatch.setattr(workspace, "evaluate_task", lambda *a, **k: evaluations.append(1) or real_evaluate(*a, **k))

    def merge_and_keep(base, contributions, out, opts, **kw):  # a copy of each merge, which the strategy drops
        real_merge(base, contributions, out, opts, **kw)
        merged_folders.append(shutil.copytree(out, tmp_path / "kept" / str(len(merged_folders))))

    monkeypatch.setattr(strategy, "merge_models", merge_and_keep)
    cfg = config(tmp_path)
    assert cfg.strategies[1].typed_options().lambda_ == 1.5
    first = run_experiment(cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    assert len(calls) == 2  # one contribution per task, shared by both merge strategies
    contributions = sorted((tmp_path / "run" / "cache" / "contributions").iterdir())
    assert all(read_manifest(c)["base_fingerprint"] for c in contributions)
    assert len(merged_folders) == 4  # 2 strategies x 2 stages
    assert list((tmp_path / "run" / "cache" / "merges").iterdir()) == []  # none kept on disk once scored
    stage2 = [m for m in merged_folders if read_manifest(m)["merge"]["method"] == "average" and len(read_manifest(m)["merge"]["inputs"]) == 2]
    assert len(stage2) == 1
    # the stage-2 average of two LoRA contributions is base + (ΔW1 + ΔW2) / 2 on adapted weights
    from cairn.models import resolve_folder

    base = load_file(f"{resolve_folder('tiny-random')}/model.safetensors")
    merged = load_file(stage2[0] / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    deltas = []
    for c in contributions:
        lora, conf = load_file(c / "adapter_model.safetensors"), json.loads((c / "adapter_config.json").read_text())
        a, b = (lora[f"base_model.model.model.layers.0.self_attn.q_proj.lora_{x}.weight"] for x in "AB")
        deltas.append(conf["lora_alpha"] / conf["r"] * b @ a)
    assert deltas[0].abs().max() > 0
    torch.testing.assert_close(merged[name], base[name] + (deltas[0] + deltas[1]) / 2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(merged["model.norm.weight"], base["model.norm.weight"])
    scored = len(evaluations)
    again = run_experiment(cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    assert len(calls) == 2 and again["strategies"]["avg"]["R"] == first["strategies"]["avg"]["R"]
    # merged again from the cached contributions, to the same weights: every score comes from the cache
    assert len(merged_folders) == 8 and len(evaluations) == scored
    for a, b in zip(merged_folders[:4], merged_folders[4:]):
        assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_a_factors_merge_stage_is_the_base_with_the_merged_adapter_and_records_interference(tmp_path, monkeypatch):
    import pytest
    from peft import PeftModel

    import cairn.strategies.merge as strategy
    from cairn.errors import ConfigError
    from cairn.methods.merge.interference import interference
    from cairn.weights.adapters import read_lora

    from cairn.strategies import STRATEGIES

    stages = []
    monkeypatch.setitem(STRATEGIES, "merge", lambda *a: (stages.append(m) or m for m in strategy.run(*a)))
    raw = {
        "name": "factors", "base": "tiny-random", "tasks": code_tasks(tmp_path), "probe": None, "setting": "semi",
        "train": {"method": "lora", "epochs": 1, "batch_size": 4, "lr": 1e-2},
        "strategies": [{"name": "peft-ties", "kind": "merge", "method": "ties", "density": 0.2, "combine": "factors"}],
    }  # fmt: skip
    run_experiment(parse_config(raw), tmp_path / "run", progress=False, log=lambda *_: None)
    assert len(stages) == 2 and all(isinstance(m, PeftModel) for m in stages)
    rows = [json.loads((tmp_path / "run" / "seeds" / "0" / "peft-ties" / f"stage-{s}.json").read_text()) for s in (1, 2)]
    folders = tmp_path / "run" / "cache" / "contributions"
    assert [len(r["contributions"]) for r in rows] == [1, 2]
    assert rows[0]["interference"]["ratio"] == pytest.approx(1.0)  # one contribution is aligned with itself
    expected = interference([read_lora(folders / name) for name in rows[1]["contributions"]])
    assert rows[1]["interference"]["ratio"] == pytest.approx(expected["ratio"]) and expected["ratio"] < 1
    assert set(rows[1]["interference"]["by_layer"]) == set(expected["by_layer"]) and len(expected["by_layer"]) == 14  # 7 linear modules x 2 layers
    with pytest.raises(ConfigError, match="full fine-tunes"):
        parse_config(raw | {"train": {"method": "fft", "epochs": 1}})
