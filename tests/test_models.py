from pathlib import Path

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
    from cairn.manifest import read_manifest, write_manifest
    from cairn.options import TrainConfig
    from cairn.contributions import load, train_contribution

    task = load_task("pack:people")
    task.splits["train"] = task.train[:4]
    out = tmp_path / "a"
    train_contribution("tiny-random", task, TrainConfig(epochs=1, batch_size=4), out, progress=False)
    manifest = read_manifest(out)
    manifest["base_fingerprint"] = "0" * 64
    write_manifest(out, manifest)
    with pytest.raises(ModelError, match="was made on a base with fingerprint 000000000000"):
        load(str(out))
    with pytest.raises(ModelError, match="is an adapter, not a base model"):  # a base-model loader does not take it
        load_model(str(out))


@pytest.mark.slow
def test_bundled_model_converts_once_loads_and_saves(tmp_path):
    import time

    from cairn.models import check_folder, resolve_folder

    model, tokenizer = load_model("bundled:smollm2-135m")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert not hasattr(model.config, "quantization_config")  # a plain model, so fine-tunes can be saved
    save_model(model, tokenizer, tmp_path / "copy")
    assert (tmp_path / "copy" / "model.safetensors").stat().st_size > 500e6
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert tokenizer.eos_token == "<|im_end|>"
    start = time.perf_counter()
    check_folder(Path(resolve_folder("bundled:smollm2-135m")))  # config and headers only: no cost worth counting
    assert time.perf_counter() - start < 0.1


def test_a_home_path_of_an_unknown_user_is_a_model_error():
    with pytest.raises(ModelError):
        ModelSpec.parse("~no-such-user-cairn/model")


# --- bad model inputs: one-line ModelErrors naming the file, before anything is allocated -------


def _one_line_naming(exc: pytest.ExceptionInfo, path) -> str:
    message = str(exc.value)
    assert str(path) in message and "\n" not in message, message
    return message


def _tiny_with_config(tmp_path, **changes):
    """A copy of tiny-random whose config.json has `changes` (a value None removes the field)."""
    import json

    from corrupt_safetensors import tiny_copy

    folder = tiny_copy(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("corruption", ["header length past the end of the file", "absurd header length", "header a JSON list",
                                        "entry not an object", "entry without data_offsets", "offsets not integers", "start after end",
                                        "offsets past the end (truncated file)", "size not dtype x shape", "header not UTF-8"])
def test_a_corrupt_safetensors_file_is_a_one_line_model_error_naming_it_when_loaded(tmp_path, corruption):
    from corrupt_safetensors import CORRUPTIONS, corrupt_copy

    folder = corrupt_copy(tmp_path, corruption)
    with pytest.raises(ModelError) as caught:
        load_model(str(folder))
    assert CORRUPTIONS[corruption][1] in _one_line_naming(caught, folder / "model.safetensors")


def test_the_safetensors_library_s_own_errors_are_model_errors_naming_the_folder(tmp_path, monkeypatch):
    from corrupt_safetensors import corrupt_copy

    folder = corrupt_copy(tmp_path, "header a JSON list")
    monkeypatch.setattr("cairn.models.check_folder", lambda *a, **k: None)  # as if Cairn's own checks had missed it
    with pytest.raises(ModelError) as caught:
        load_model(str(folder))
    assert "safetensors weights cannot be read" in _one_line_naming(caught, folder)


@pytest.mark.parametrize("content", [b"", b"hello, not a model" * 50, "head", "first MiB"])
def test_a_garbage_or_truncated_gguf_file_is_a_model_error_and_leaves_no_cache_folder(tmp_path, monkeypatch, content):
    from cairn.models import _bundled_gguf

    monkeypatch.setenv("CAIRN_CACHE", str(tmp_path / "cache"))
    if isinstance(content, str):  # the start of a real GGUF file, cut short
        content = _bundled_gguf("smollm2-135m").read_bytes()[: 100 if content == "head" else 2**20]
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(content)
    with pytest.raises(ModelError) as caught:
        load_model(str(gguf))
    assert "not a valid GGUF file" in _one_line_naming(caught, gguf)
    assert not list((tmp_path / "cache").rglob("*gguf*"))


def _pickled_copy(tiny, tmp_path, state=None):
    """tiny-random saved with its weights pickled (pytorch_model.bin) only."""
    model, tokenizer = tiny
    folder = tmp_path / "pickled"
    save_model(model, tokenizer, folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict() if state is None else state, folder / "pytorch_model.bin")
    return folder


def test_pickled_weights_load_when_allowed_with_the_same_fingerprint(tiny, tmp_path):
    loaded, _ = load_model(str(_pickled_copy(tiny, tmp_path)), allow_pickle=True)
    assert loaded.cairn_fingerprint == tiny[0].cairn_fingerprint


class _NotATensor:
    """An object torch's weights-only unpickler refuses."""


def test_pickled_weights_holding_more_than_tensors_are_refused_even_when_allowed(tiny, tmp_path):
    folder = _pickled_copy(tiny, tmp_path, state={**tiny[0].state_dict(), "extra": _NotATensor()})
    with pytest.raises(ModelError) as caught:
        load_model(str(folder), allow_pickle=True)
    message = _one_line_naming(caught, folder / "pytorch_model.bin")
    assert "weights-only) unpickler refused" in message and "_NotATensor" in message and "convert them to safetensors" in message


def test_a_truncated_pickle_is_a_model_error_naming_it(tiny, tmp_path):
    folder = _pickled_copy(tiny, tmp_path)
    raw = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ModelError) as caught:
        load_model(str(folder), allow_pickle=True)
    assert "not a readable torch checkpoint, corrupt or truncated" in _one_line_naming(caught, folder / "pytorch_model.bin")


def test_transformers_refusing_torch_load_is_a_model_error_saying_what_to_do(tiny, tmp_path, monkeypatch):
    from transformers.utils.import_utils import check_torch_load_is_safe

    folder = _pickled_copy(tiny, tmp_path)
    monkeypatch.setattr("transformers.utils.import_utils.is_torch_greater_or_equal", lambda *a, **k: False)  # as with torch < 2.6
    monkeypatch.setattr("transformers.modeling_utils.check_torch_load_is_safe", check_torch_load_is_safe)
    with pytest.raises(ModelError) as caught:
        load_model(str(folder), allow_pickle=True)
    message = _one_line_naming(caught, folder / "pytorch_model.bin")
    assert "transformers refuses to unpickle weights with torch" in message and "upgrade torch to 2.6" in message


_HEADS = "num_attention_heads 4, num_key_value_heads 2, head_dim 16 describe a model"
_TOO_BIG = "parameters, but model.safetensors holds 3.22M: expected sizes that match the weights"


@pytest.mark.parametrize("field, value, expected", [
    ("hidden_size", 1e9, "hidden_size is 1000000000.0, expected a positive integer"),
    ("hidden_size", 10**9, f"vocab_size 49152, hidden_size 1000000000, intermediate_size 128, num_hidden_layers 2, {_HEADS} of about 50.3T {_TOO_BIG}"),
    ("vocab_size", 10**10, f"vocab_size 10000000000, hidden_size 64, intermediate_size 128, num_hidden_layers 2, {_HEADS} of about 640B {_TOO_BIG}"),
    ("num_hidden_layers", 10**6, f"num_hidden_layers 1000000, {_HEADS} of about 37B {_TOO_BIG}"),
    ("head_dim", 10**7, f"head_dim 10000000 describe a model of about 15.4B {_TOO_BIG}"),
    ("num_hidden_layers", -2, "num_hidden_layers is -2, expected a positive integer"),
    ("intermediate_size", 0, "intermediate_size is 0, expected a positive integer"),
    ("num_attention_heads", "4", "num_attention_heads is '4', expected a positive integer"),
    ("num_key_value_heads", True, "num_key_value_heads is True, expected a positive integer"),
])
def test_a_config_with_absurd_or_invalid_sizes_is_refused_fast_before_building_the_model(tmp_path, monkeypatch, field, value, expected):
    import time

    folder = _tiny_with_config(tmp_path, **{field: value})
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("the model was built"))
    start = time.perf_counter()
    with pytest.raises(ModelError) as caught:
        load_model(str(folder))
    assert time.perf_counter() - start < 0.5
    assert expected in _one_line_naming(caught, folder / "config.json")


def test_a_config_larger_than_the_free_memory_is_refused_naming_both_sizes(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import psutil

    folder = _tiny_with_config(tmp_path)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=2**20))
    monkeypatch.setattr(psutil, "swap_memory", lambda: SimpleNamespace(free=0))
    with pytest.raises(ModelError) as caught:
        load_model(str(folder))
    message = _one_line_naming(caught, folder / "config.json")
    assert "about 3.22M parameters (model.safetensors holds 3.22M): 0.0 GiB in float32, more than the 0.0 GiB of memory free" in message


@pytest.mark.parametrize("layers, found", [(3, "9 tensors of the model it describes are not in the weights"), (1, "9 tensors in the weights have no place in that model")])
def test_a_config_that_does_not_match_its_weights_is_refused_rather_than_filled_with_random_weights(tmp_path, layers, found):
    folder = _tiny_with_config(tmp_path, num_hidden_layers=layers)
    with pytest.raises(ModelError) as caught:
        load_model(str(folder))
    assert found in _one_line_naming(caught, folder / "config.json")


def test_a_config_that_is_not_a_json_object_is_a_model_error_naming_it(tmp_path):
    folder = _tiny_with_config(tmp_path)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match=r"expected a JSON object \(the model's config\), got list") as caught:
        load_model(str(folder))
    _one_line_naming(caught, folder / "config.json")


def test_the_folder_checks_read_headers_only_and_cost_milliseconds():
    import time

    from cairn.models import check_folder, resolve_folder

    start = time.perf_counter()
    check_folder(Path(resolve_folder("tiny-random")))
    assert time.perf_counter() - start < 0.1


@pytest.mark.parametrize("change, message", [
    ({"corruption": "size not dtype x shape"}, "model.safetensors: tensor 'model.embed_tokens.weight'"),
    ({"hidden_size": 10**9}, "config.json: vocab_size 49152, hidden_size 1000000000,"),
])
def test_cli_eval_of_a_bad_model_exits_5_with_one_error_line(tmp_path, capsys, change, message):
    from cairn.cli import main
    from corrupt_safetensors import corrupt_copy

    folder = corrupt_copy(tmp_path, change["corruption"]) if "corruption" in change else _tiny_with_config(tmp_path, **change)
    rc = main(["eval", "--model", str(folder), "--task", "pack:people"])
    err = capsys.readouterr().err
    assert rc == 5 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("cairn eval: error: ") and message in err and str(folder) in err


def test_a_cached_model_is_written_as_save_pretrained_writes_it(tmp_path, monkeypatch, tiny):
    """The cache's folders are written without save_pretrained (which skips weights on ranks > 0
    under a launch), yet hold what it holds: the same config, and a tied weight under its source's
    name only, so merges and checks that match tensor names against the base still match."""
    import json

    from safetensors import safe_open

    from cairn.models import resolve_folder

    bundled = resolve_folder(ModelSpec("bundled", "smollm2-135m"))
    (tmp_path / "cache" / "models").mkdir(parents=True)
    (tmp_path / "cache" / "models" / Path(bundled).name).symlink_to(bundled)  # tiny-random reads its tokenizer
    monkeypatch.setenv("CAIRN_CACHE", str(tmp_path / "cache"))
    model, _ = load_model("tiny-random")
    model.save_pretrained(tmp_path / "reference")
    names = lambda folder: sorted(safe_open(str(folder / "model.safetensors"), "pt").keys())  # noqa: E731
    cached = tmp_path / "cache" / "models" / Path(resolve_folder("tiny-random")).name
    assert names(cached) == names(tmp_path / "reference") and "lm_head.weight" not in names(cached)
    assert json.loads((cached / "config.json").read_text()) == json.loads((tmp_path / "reference" / "config.json").read_text())
    assert fingerprint(model) == fingerprint(tiny[0])
