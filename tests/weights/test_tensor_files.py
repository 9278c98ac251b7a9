"""Corrupt safetensors files are refused from their header, naming the file, before any tensor is read."""

import json

import numpy as np
import pytest

from cairn.errors import ModelError
from cairn.weights.tensor_files import FolderWeights, SafetensorsReader, SafetensorsWriter, read_header
from corrupt_safetensors import CORRUPTIONS, corrupt_copy, split, tiny_copy


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupt_safetensors_file_is_a_one_line_model_error_naming_it(tmp_path, corruption):
    folder = corrupt_copy(tmp_path, corruption)
    path = folder / "model.safetensors"
    for read in (read_header, SafetensorsReader, FolderWeights):
        with pytest.raises(ModelError) as caught:
            read(folder if read is FolderWeights else path)
        message = str(caught.value)
        assert message.startswith(f"{path}: ") and "\n" not in message
        assert CORRUPTIONS[corruption][1] in message


def test_a_corrupt_file_is_refused_before_any_tensor_is_mapped(tmp_path, monkeypatch):
    folder = corrupt_copy(tmp_path, "size not dtype x shape")
    monkeypatch.setattr("cairn.weights.tensor_files.mmap.mmap", lambda *a, **k: pytest.fail("mapped before the header was checked"))
    with pytest.raises(ModelError, match="needs 12583168"):
        FolderWeights(folder)


def test_a_valid_file_reads_as_the_safetensors_library_reads_it(tmp_path):
    from safetensors.numpy import load_file

    folder = tiny_copy(tmp_path)
    expected = load_file(folder / "model.safetensors")
    weights = FolderWeights(folder)
    try:
        assert sorted(weights.keys()) == sorted(expected)
        for name, array in expected.items():
            assert np.array_equal(weights.get(name), array)
    finally:
        weights.close()


def test_the_writers_output_passes_every_header_check(tmp_path):
    specs = [("a", "F32", [2, 3]), ("empty", "F16", [0]), ("b", "BF16", [5])]
    writer = SafetensorsWriter(tmp_path / "w.safetensors", specs, metadata={"format": "pt"})
    for name, _, shape in specs:
        writer.write(name, np.ones(shape, np.float32))
    writer.close()
    header, _ = read_header(tmp_path / "w.safetensors")
    assert list(header) == ["a", "empty", "b"]
    assert np.array_equal(SafetensorsReader(tmp_path / "w.safetensors").get("b"), np.ones(5, np.float32))


def test_a_sharded_index_listing_a_missing_file_names_the_index(tmp_path):
    folder = tiny_copy(tmp_path)
    header, _ = split(folder / "model.safetensors")
    index = {"weight_map": {name: "model-00001-of-00002.safetensors" for name in header if name != "__metadata__"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match=r"model.safetensors.index.json: lists model-00001-of-00002.safetensors, which is not in"):
        FolderWeights(folder)


def test_an_error_while_writing_is_not_hidden_behind_tensors_never_written(tmp_path):
    writer = SafetensorsWriter(tmp_path / "w.safetensors", [("a", "F32", [2]), ("b", "F32", [2])])
    with pytest.raises(RuntimeError, match="the real cause"):
        try:
            writer.write("a", np.zeros(2, np.float32))
            raise RuntimeError("the real cause")
        finally:
            writer.close()
    writer = SafetensorsWriter(tmp_path / "v.safetensors", [("a", "F32", [2])])
    with pytest.raises(ValueError, match="1 tensors were never written"):
        writer.close()


def test_cli_merge_of_a_corrupt_input_names_the_file_and_writes_nothing(tmp_path, capsys):
    from cairn.cli import main
    from cairn.models import resolve_folder

    bad = corrupt_copy(tmp_path, "size not dtype x shape")
    out = tmp_path / "merged"
    rc = main(["merge", "--method", "average", "--base", resolve_folder("tiny-random"), "--inputs", str(bad), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 5 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"{bad / 'model.safetensors'}: tensor " in err and "never written" not in err
    assert not out.exists()
