"""The `merge` strategy inside an experiment: per-task contributions from the base, merged per stage."""

import json

import torch

import cairn.experiment as experiment
from cairn.config import parse_config
from cairn.experiment import run_experiment
from cairn.store import read_manifest
from conftest import code_tasks


def config(tmp_path):
    return parse_config({
        "name": "merge", "base": "tiny-random", "tasks": code_tasks(tmp_path), "probe": None, "setting": "semi",
        "train": {"method": "lora", "epochs": 1, "batch_size": 4, "lr": 1e-2},
        "strategies": [{"name": "avg", "kind": "merge", "method": "average"}, {"name": "ties", "kind": "merge", "method": "ties", "density": 0.5, "lambda": 1.5}],
    })  # fmt: skip


def test_merge_strategy_merges_independent_contributions_and_reruns_from_cache(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    calls = []
    real = experiment.train
    monkeypatch.setattr(experiment, "train", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = config(tmp_path)
    assert cfg.strategies[1].typed_options().lambda_ == 1.5
    first = run_experiment(cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    assert len(calls) == 2  # one contribution per task, shared by both merge strategies
    contributions = sorted((tmp_path / "run" / "cache" / "contributions").iterdir())
    assert all(read_manifest(c)["base_fingerprint"] for c in contributions)
    merges = list((tmp_path / "run" / "cache" / "merges").iterdir())
    assert len(merges) == 4  # 2 strategies x 2 stages
    stage2 = [m for m in merges if read_manifest(m)["merge"]["method"] == "average" and len(read_manifest(m)["merge"]["inputs"]) == 2]
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
    again = run_experiment(cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    assert len(calls) == 2 and again["strategies"]["avg"]["R"] == first["strategies"]["avg"]["R"]
