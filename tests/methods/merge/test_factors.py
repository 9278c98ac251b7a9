"""`combine: factors`: merging LoRA adapters A with A and B with B equals PEFT's add_weighted_adapter."""

import json

import numpy as np
import pytest
import torch
from conftest import MADE_FROM
from safetensors.numpy import load_file

from cairn.errors import ConfigError
from cairn.methods.merge.factors import combine_factor
from cairn.methods.merge.streaming import merge_models
from cairn.models import resolve_folder
from cairn.options import MergeOptions, TrainConfig

TARGETS = [["q_proj", "v_proj"], ["q_proj", "v_proj"], ["q_proj", "k_proj"]]  # the third leaves v_proj alone


def base_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_folder("tiny-random")).eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Three rank-4 adapters with random A and B, of different LoRA scales, saved by PEFT."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("adapters")
    paths = []
    for i, (targets, alpha) in enumerate(zip(TARGETS, (8, 4, 16))):
        torch.manual_seed(i)
        model = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=alpha, target_modules=targets, init_lora_weights=False))
        model.save_pretrained(root / f"a{i}")
        paths.append(root / f"a{i}")
    return paths


def peft_merge(paths, weights, combination_type, density):
    """PEFT's merged adapter's tensors, keyed as in its adapter file."""
    from peft import PeftModel, get_peft_model_state_dict

    model = PeftModel.from_pretrained(base_model(), str(paths[0]), adapter_name="a0")
    for i, p in enumerate(paths[1:], 1):
        model.load_adapter(str(p), adapter_name=f"a{i}")
    model.add_weighted_adapter([f"a{i}" for i in range(len(paths))], weights, "merged", combination_type=combination_type, density=density)
    return model, {k: v.numpy() for k, v in get_peft_model_state_dict(model, adapter_name="merged").items()}


@pytest.mark.parametrize(("method", "kind", "density"), [("ties", "ties", 0.2), ("ties", "ties", 1.0), ("task_arithmetic", "linear", 1.0)])
def test_factor_merges_equal_peft_add_weighted_adapter(adapters, tmp_path, method, kind, density):
    weights, lam = [1.0, 0.5, -0.8], 1.5
    opts = MergeOptions(method=method, combine="factors", **{"lambda": lam}, **({"density": density} if method == "ties" else {}))
    stats = merge_models(resolve_folder("tiny-random"), adapters, tmp_path / "m", opts, weights=weights, made_from=MADE_FROM, progress=False)
    assert stats["combination_type"] == kind and stats["modules"] == 6  # q, k, v on two layers
    ours = load_file(tmp_path / "m" / "adapter_model.safetensors")
    _, theirs = peft_merge(adapters, [lam * w for w in weights], kind, density)
    assert sorted(ours) == sorted(theirs)
    diff = max(float(np.abs(ours[k] - theirs[k]).max()) for k in ours)
    assert diff < 1e-6
    assert min(float(np.abs(v).max()) for v in ours.values()) > 0


def test_the_merged_adapter_loads_in_peft_and_computes_what_peft_s_merge_does(adapters, tmp_path):
    from peft import PeftModel

    merge_models(resolve_folder("tiny-random"), adapters, tmp_path / "m", MergeOptions(method="ties", combine="factors", density=0.5), made_from=MADE_FROM, progress=False)
    manifest = json.loads((tmp_path / "m" / "cairn.json").read_text())
    assert manifest["kind"] == "adapter" and manifest["method"] == "merge-ties-factors" and manifest["base"] == "tiny-random"
    theirs, _ = peft_merge(adapters, [1.0, 1.0, 1.0], "ties", 0.5)
    theirs.set_adapter("merged")
    ours = PeftModel.from_pretrained(base_model(), str(tmp_path / "m")).eval()
    ids = torch.arange(1, 17).reshape(2, 8)
    with torch.no_grad():
        expected, got, base = theirs(ids).logits, ours(ids).logits, base_model()(ids).logits
    assert (got - base).abs().max() > 1e-4  # the adapter does something
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties"])
def test_dare_equals_peft_given_the_same_drops(monkeypatch, kind):
    # PEFT draws from torch's global generator, Cairn from a seeded NumPy one: handed Cairn's masks,
    # PEFT's own merge function gives Cairn's result.
    from peft.utils import merge_utils

    rng = np.random.default_rng(0)
    tensors = [rng.normal(size=(4, 64)).astype(np.float32) for _ in range(3)]
    weights = np.asarray([1.2, 0.7, 0.3], np.float32)
    ours = combine_factor(tensors, weights, kind, 0.3, np.random.default_rng(5))
    replay = np.random.default_rng(5)
    masks = iter([torch.from_numpy((replay.random(t.shape, dtype=np.float32) < 0.3).astype(np.float32)) for t in tensors])
    monkeypatch.setattr(torch, "bernoulli", lambda p: next(masks))
    theirs = getattr(merge_utils, kind)([torch.from_numpy(t) for t in tensors], torch.from_numpy(weights), 0.3)
    assert float(np.abs(ours - theirs.numpy()).max()) < 1e-6


def test_dare_keeps_a_density_fraction_rescaled_and_reproducible_by_seed(adapters, tmp_path):
    t = np.random.default_rng(0).normal(size=(64, 256)).astype(np.float32)
    out = combine_factor([t], np.ones(1, np.float32), "dare_linear", 0.3, np.random.default_rng(1))
    kept = out != 0
    assert abs(kept.mean() - 0.3) < 4 * (0.3 * 0.7 / t.size) ** 0.5
    np.testing.assert_allclose(out[kept], t[kept] / np.float32(0.3), rtol=1e-6)
    folder = resolve_folder("tiny-random")
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        merge_models(folder, adapters, tmp_path / name, MergeOptions(method="dare_ties", combine="factors", density=0.5, seed=seed), made_from=MADE_FROM, progress=False)
    read = {n: (tmp_path / n / "adapter_model.safetensors").read_bytes() for n in "abc"}
    assert read["a"] == read["b"] != read["c"]


def test_factors_refuse_full_models_other_methods_and_full_fine_tunes(adapters, tmp_path):
    folder = resolve_folder("tiny-random")
    with pytest.raises(ConfigError, match="LoRA adapters only.*combine: delta"):
        merge_models(folder, [adapters[0], folder], tmp_path / "m", MergeOptions(method="ties", combine="factors"), made_from=MADE_FROM)
    with pytest.raises(ConfigError, match="supports task_arithmetic, ties, dare_linear, dare_ties"):
        MergeOptions.parse("strategy m", method="average", combine="factors")
    with pytest.raises(ConfigError, match="normalize does not apply"):
        MergeOptions.parse("strategy m", method="ties", combine="factors", normalize=True)
    with pytest.raises(ValueError, match="full fine-tunes"):
        MergeOptions(combine="factors").check(TrainConfig(method="fft"))
    MergeOptions(combine="factors").check(TrainConfig(method="lora"))
    assert not (tmp_path / "m").exists()


def test_cairn_merge_combine_factors_writes_the_merged_adapter(adapters, tmp_path, capsys):
    from cairn.cli import main

    args = ["merge", "--method", "ties", "--density", "0.2", "--combine", "factors", "--base", "tiny-random", "--inputs", *map(str, adapters)]
    assert main([*args, "--out", str(tmp_path / "m")]) == 0
    manifest = json.loads((tmp_path / "m" / "cairn.json").read_text())
    assert manifest["merge"]["combination_type"] == "ties" and manifest["merge"]["options"]["combine"] == "factors"
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["r"] == 4
    assert main([*args, "--out", str(tmp_path / "n"), "--as-adapter", "--rank", "4"]) == 4
    assert "drop --rank" in capsys.readouterr().err and not (tmp_path / "n").exists()
