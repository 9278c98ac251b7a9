"""The Contribution's life cycle: trained and saved once (train-or-reuse), then loaded on its base."""

import copy

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
