import pytest
import torch

from cairn.errors import ModelError
from cairn.models import ModelSpec, fingerprint, load_model, save_model


def test_spec_parsing(tmp_path):
    assert ModelSpec.parse("bundled:smollm2-135m") == ModelSpec("bundled", "smollm2-135m")
    assert ModelSpec.parse("tiny-random").kind == "tiny-random"
    assert ModelSpec.parse("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert ModelSpec.parse(str(tmp_path / "m")).kind == "folder"


@pytest.mark.parametrize("spec, message", [
    ("bundled:gpt-9", "unknown bundled model 'gpt-9'; available: smollm2-135m"),
    ("", "empty model spec"),
    ("./missing/model", "cannot resolve model"),
    ("x.gguf", "GGUF file not found"),
])
def test_bad_specs_say_what_is_expected(spec, message):
    with pytest.raises(ModelError, match=message):
        ModelSpec.parse(spec)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelError, match="neither a Hugging Face model folder"):
        ModelSpec.parse(str(tmp_path))


def test_tiny_random_is_deterministic_with_a_real_tokenizer(tiny):
    model, tokenizer = tiny
    again, _ = load_model("tiny-random")
    assert model.cairn_fingerprint == again.cairn_fingerprint == fingerprint(again)
    assert model.config.num_hidden_layers == 2
    assert tokenizer.decode(tokenizer("Paris is lovely")["input_ids"]) == "Paris is lovely"


def test_fingerprint_changes_with_any_weight(tiny):
    model, _ = tiny
    other, _ = load_model("tiny-random")
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    assert fingerprint(other) != model.cairn_fingerprint


def test_saved_folder_loads_back_with_the_same_fingerprint(tiny, tmp_path):
    model, tokenizer = tiny
    save_model(model, tokenizer, tmp_path / "copy")
    loaded, _ = load_model(str(tmp_path / "copy"))
    assert loaded.cairn_fingerprint == model.cairn_fingerprint


def test_pickled_weights_are_refused_unless_allowed(tiny, tmp_path):
    model, tokenizer = tiny
    folder = tmp_path / "pickled"
    save_model(model, tokenizer, folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="pickled weights"):
        load_model(str(folder))


def test_adapter_with_a_different_base_is_refused(tmp_path):
    from cairn.data import load_task
    from cairn.store import read_manifest, write_manifest
    from cairn.training import TrainConfig, train_contribution

    task = load_task("pack:people")
    task.splits["train"] = task.train[:4]
    out = tmp_path / "a"
    train_contribution("tiny-random", task, TrainConfig(epochs=1, batch_size=4), out, progress=False)
    manifest = read_manifest(out)
    manifest["base_fingerprint"] = "0" * 64
    write_manifest(out, manifest)
    with pytest.raises(ModelError, match="trained on a base with fingerprint 000000000000"):
        load_model(str(out))


@pytest.mark.slow
def test_bundled_model_converts_once_loads_and_saves(tmp_path):
    model, tokenizer = load_model("bundled:smollm2-135m")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert not hasattr(model.config, "quantization_config")  # a plain model, so fine-tunes can be saved
    save_model(model, tokenizer, tmp_path / "copy")
    assert (tmp_path / "copy" / "model.safetensors").stat().st_size > 500e6
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert tokenizer.eos_token == "<|im_end|>"


def test_a_home_path_of_an_unknown_user_is_a_model_error():
    with pytest.raises(ModelError):
        ModelSpec.parse("~no-such-user-cairn/model")
