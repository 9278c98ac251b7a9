"""The Contribution's life cycle: trained and saved once (train-or-reuse), then loaded on its base."""

import copy
import json

from cairn.contributions import load, train_or_reuse
from cairn.data import Example, Task
from cairn.manifest import made_by, read_manifest
from cairn.options import TrainConfig
from cairn.training import train

CFG = TrainConfig(epochs=1, batch_size=4, lr=1e-2)
TASK = Task("codes", "exact", {"train": [Example(f"Question: code {i}?\nAnswer:", f"c{i}") for i in range(4)]})


def test_train_or_reuse_trains_and_saves_once_then_reuses_the_saved_contribution(tiny, tmp_path):
    model, tokenizer = tiny
    folder, calls = tmp_path / "c", []

    def run():
        calls.append(1)
        return train(copy.deepcopy(model), tokenizer, TASK.train, CFG, progress=False)

    first = train_or_reuse(folder, run, tokenizer, TASK, CFG, base="tiny-random", base_fingerprint=model.cairn_fingerprint)
    manifest = read_manifest(folder)
    assert first is not None and first.steps == 1 and calls == [1]
    assert (manifest["task"], manifest["method"], manifest["base_fingerprint"], made_by(folder)) == ("codes", "lora", model.cairn_fingerprint, "train")
    assert (folder / "centroids.safetensors").is_file()  # its routing statistics ship with it
    assert train_or_reuse(folder, run, tokenizer, TASK, CFG, base="tiny-random", base_fingerprint=model.cairn_fingerprint) is None
    assert calls == [1]  # identical work is not done twice

    loaded, _ = load(str(folder))
    assert loaded.cairn_base == "tiny-random" and loaded.cairn_fingerprint == model.cairn_fingerprint
    assert hasattr(loaded, "peft_config")  # the adapter on its recorded base


def test_an_adapter_copied_alone_to_another_folder_loads_with_peft_on_its_base_and_says_what_it_is(tmp_path):
    import shutil

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cairn import api
    from cairn.models import resolve_folder

    made = tmp_path / "made"
    manifest = api.train(TASK, made, base="tiny-random", epochs=2, batch_size=4, lr=1e-2, lora_alpha=8, progress=False)
    copy_ = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(made, copy_)  # the folder alone: no cache, no run folder
    assert json.loads((copy_ / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-random"  # not the cache's path
    assert not list(copy_.glob("tokenizer*")) and not (copy_ / "special_tokens_map.json").exists()  # an adapter uses its base's tokenizer

    base = AutoModelForCausalLM.from_pretrained(resolve_folder("tiny-random"))
    peft_model = PeftModel.from_pretrained(base, str(copy_)).eval()
    ids = torch.tensor([[1, 5, 9, 13]])
    cairn_model, _ = load(str(made))
    with torch.no_grad():
        assert torch.allclose(peft_model(ids).logits, cairn_model(ids).logits, atol=1e-5)

    card = (copy_ / "README.md").read_text()
    for fact in ("tiny-random", manifest["base_fingerprint"], "codes", manifest["data_hash"], "`lora`", "| lora_alpha | `8.0` |", "| lr | `0.01` |",
                 f"{manifest['train']['losses'][-1]:.4f}", "PeftModel.from_pretrained", "cairn eval --model"):
        assert fact in card, fact
    assert "More Information Needed" not in card and card.startswith("---\nlibrary_name: peft\n")

    (copy_ / "cairn.json").unlink()  # a plain PEFT adapter now: its adapter_config.json names the base Cairn loads
    loaded, _ = load(str(copy_))
    assert loaded.cairn_base == "tiny-random"


def test_a_full_fine_tune_keeps_its_tokenizer_so_its_folder_loads_alone(tmp_path):
    from transformers import AutoTokenizer

    from cairn import api

    api.train(TASK, tmp_path / "fft", base="tiny-random", method="fft", epochs=1, batch_size=4, progress=False)
    assert AutoTokenizer.from_pretrained(tmp_path / "fft").eos_token is not None
    assert "AutoModelForCausalLM.from_pretrained" in (tmp_path / "fft" / "README.md").read_text()


def test_a_base_given_as_a_relative_folder_is_recorded_by_its_absolute_path(tiny, tmp_path, monkeypatch):
    from cairn import api
    from cairn.models import save_model

    model, tokenizer = tiny
    save_model(model, tokenizer, tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    api.train(TASK, "adapter", base="base", epochs=1, batch_size=4, progress=False)
    recorded = str((tmp_path / "base").resolve())
    assert read_manifest(tmp_path / "adapter")["base"] == recorded
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == recorded


def test_an_adapter_whose_recorded_base_cannot_be_loaded_says_where_the_name_came_from_and_takes_base(tmp_path):
    import pytest

    from cairn import api
    from cairn.errors import ModelError

    api.train(TASK, tmp_path / "a", base="tiny-random", epochs=1, batch_size=4, progress=False)
    (tmp_path / "a" / "cairn.json").unlink()
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/gone/base"}))
    with pytest.raises(ModelError, match=r"its adapter_config.json names the base '/gone/base', which cannot be loaded: .*give the base with --base"):
        load(str(tmp_path / "a"))
    assert load(str(tmp_path / "a"), base="tiny-random")[0].cairn_base == "tiny-random"
