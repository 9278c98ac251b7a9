"""The one manifest builder: every producer's output is a contribution the store can index."""

import pytest

from cairn.manifest import contribution_manifest, made_by, read_manifest, tasks_of


def test_a_manifest_holds_what_the_store_indexes_and_its_producers_section(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    made_from = {"base": "tiny-random", "base_fingerprint": "f" * 64, "mergekit_config": "m.yml"}
    manifest = contribution_manifest(tmp_path, "merge", {"method": "ties"}, kind="adapter", task="a+b", method="merge-ties", made_from=made_from)
    assert read_manifest(tmp_path) == manifest
    assert {k: manifest[k] for k in ("kind", "task", "method", "base", "base_fingerprint", "mergekit_config")} == {
        "kind": "adapter", "task": "a+b", "method": "merge-ties", "base": "tiny-random", "base_fingerprint": "f" * 64, "mergekit_config": "m.yml"
    }  # fmt: skip
    assert manifest["merge"] == {"method": "ties"} and list(manifest["files"]) == ["adapter_model.safetensors", "README.md"]
    assert made_by(tmp_path) == "merge" and "f" * 64 in (tmp_path / "README.md").read_text()  # the model card, hashed with the rest


def test_a_manifest_without_its_base_or_of_an_unknown_producer_is_refused(tmp_path):
    with pytest.raises(ValueError, match="made_from lacks base_fingerprint"):
        contribution_manifest(tmp_path, "train", {}, kind="model", task="t", method="fft", made_from={"base": "tiny-random"})
    with pytest.raises(ValueError, match="producer 'blend': expected one of train, merge, mix, import"):
        contribution_manifest(tmp_path, "blend", {}, kind="model", task="t", method="fft", made_from={"base": "b", "base_fingerprint": "f"})
    assert read_manifest(tmp_path) is None


def test_the_task_of_a_combination_joins_its_inputs_tasks(tmp_path):
    for name in ("x", "plain-adapter"):
        (tmp_path / name).mkdir()
    contribution_manifest(tmp_path / "x", "train", {}, kind="adapter", task="alpha", method="lora", made_from={"base": "b", "base_fingerprint": "f"})
    assert tasks_of([tmp_path / "x", tmp_path / "plain-adapter"]) == "alpha+plain-adapter"


def test_a_merge_and_a_mixture_of_contributions_can_be_added_to_the_store(tmp_path):
    from cairn import api
    from cairn.data import Example, Task
    from cairn.store import Store

    inputs = []
    for name in ("alpha", "beta"):
        task = Task(name, "exact", {"train": [Example(f"{name} q{i}", f"a{i}") for i in range(4)]})
        api.train(task, tmp_path / name, base="tiny-random", epochs=1, batch_size=4, progress=False)
        inputs.append(str(tmp_path / name))
    api.merge(inputs, tmp_path / "merged", base="tiny-random", method="ties", density=0.5, progress=False)
    api.mix(inputs, tmp_path / "mixed", base="tiny-random", router="uniform", progress=False)
    store = Store(tmp_path / "store")
    merged, mixed = store.add(tmp_path / "merged"), store.add(tmp_path / "mixed")
    assert (merged["task"], merged["method"], merged["kind"]) == ("alpha+beta", "merge-ties", "model")
    assert (mixed["task"], mixed["method"], mixed["kind"]) == ("alpha+beta", "moe-uniform", "moe")
    fingerprint = read_manifest(tmp_path / "alpha")["base_fingerprint"]
    assert merged["base_fingerprint"] == mixed["base_fingerprint"] == fingerprint
    assert store.verify() == {merged["id"]: [], mixed["id"]: []}
    assert (made_by(tmp_path / "merged"), made_by(tmp_path / "mixed"), made_by(tmp_path / "alpha")) == ("merge", "mix", "train")


def test_merges_and_mixtures_say_what_they_are_made_of_and_an_adapter_merge_names_its_base_as_given(tmp_path):
    import json

    from cairn import api
    from cairn.data import Example, Task

    inputs = []
    for name in ("alpha", "beta"):
        task = Task(name, "exact", {"train": [Example(f"{name} q{i}", f"a{i}") for i in range(4)]})
        api.train(task, tmp_path / name, base="tiny-random", epochs=1, batch_size=4, lr=1e-2, progress=False)
        inputs.append(str(tmp_path / name))
    api.merge(inputs, tmp_path / "merged", base="tiny-random", method="ties", density=0.5, adapter_rank=4, progress=False)
    api.mix(inputs, tmp_path / "mixed", base="tiny-random", router="uniform", progress=False)
    fingerprint = read_manifest(tmp_path / "alpha")["base_fingerprint"]
    assert json.loads((tmp_path / "merged" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-random"
    for folder, made in (("merged", "`cairn merge` (ties, delta) of 2 inputs"), ("mixed", "`cairn mix`, router uniform")):
        card = (tmp_path / folder / "README.md").read_text()
        assert made in card and fingerprint in card and all(f"`{i}`" in card for i in inputs), folder
