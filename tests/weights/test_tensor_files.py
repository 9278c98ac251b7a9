"""Corrupt safetensors files are refused from their header, naming the file, before any tensor is read."""

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from cairn.errors import ModelError
from cairn.weights.tensor_files import FolderWeights, SafetensorsReader, SafetensorsWriter, read_header


def tiny_copy(tmp_path: Path) -> Path:
    """A copy of the tiny-random model folder, to corrupt."""
    from cairn.models import resolve_folder

    folder = tmp_path / "model"
    shutil.copytree(resolve_folder("tiny-random"), folder)
    return folder


def split(path: Path) -> tuple[dict, bytes]:
    """(header, data section) of a safetensors file."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def rewrite(path: Path, header, data: bytes, *, length: int | None = None, raw: bytes | None = None) -> None:
    """Write `header` (or the bytes `raw`) and `data` as a safetensors file, with its real length unless given."""
    raw = json.dumps(header).encode() if raw is None else raw
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def first_tensor(header: dict) -> dict:
    return header[next(k for k in header if k != "__metadata__")]


def _edit_first(edit):
    """A corruption that changes the first tensor's entry in place."""

    def corrupt(path):
        header, data = split(path)
        edit(first_tensor(header))
        rewrite(path, header, data)

    return corrupt


def _entry(value):
    def corrupt(path):
        header, data = split(path)
        header[next(k for k in header if k != "__metadata__")] = value
        rewrite(path, header, data)

    return corrupt


def _length_past_the_file(path):
    header, data = split(path)
    rewrite(path, header, data, length=len(json.dumps(header)) + len(data) + 100)


def _absurd_length(path):
    """A header length the file could hold but no real file has: a sparse file of 150 MiB."""
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 120 * 2**20))
        f.truncate(150 * 2**20)


def _header_as(value):
    def corrupt(path):
        _, data = split(path)
        rewrite(path, value, data)

    return corrupt


def _not_utf8(path):
    header, data = split(path)
    raw = json.dumps(header).encode()
    rewrite(path, None, data, raw=raw[:2] + b"\xff\xfe" + raw[4:])


def _truncated(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _stray_bytes(path):
    with open(path, "ab") as f:
        f.write(b"\0" * 16)


def _resize(entry):
    entry["shape"] = [entry["shape"][0] + 1, *entry["shape"][1:]]


def _swap(entry):
    entry["data_offsets"] = entry["data_offsets"][::-1]


# name -> (how to corrupt a model.safetensors in place, what the error must say)
CORRUPTIONS = {
    "shorter than its length field": (lambda p: p.write_bytes(b"abc"), "shorter than the 8-byte header length"),
    "header length past the end of the file": (_length_past_the_file, "is larger than the rest of the file"),
    "absurd header length": (_absurd_length, f"a header of {120 * 2**20} bytes"),
    "header a JSON list": (_header_as(["a", "b"]), "its header is a JSON list, expected an object"),
    "header a JSON number": (_header_as(7), "its header is a JSON number, expected an object"),
    "header not JSON": (lambda p: rewrite(p, None, b"", raw=b"{not json"), "its header is not JSON"),
    "header not UTF-8": (_not_utf8, "its header is not UTF-8 text"),
    "metadata not strings": (_header_as({"__metadata__": {"format": 1}}), "__metadata__ is not an object of strings"),
    "entry not an object": (_entry([1, 2]), "its header entry is a JSON list, expected an object with dtype, shape and data_offsets"),
    "entry without data_offsets": (_edit_first(lambda e: e.pop("data_offsets")), "has no data_offsets"),
    "entry without dtype": (_edit_first(lambda e: e.pop("dtype")), "has no dtype"),
    "entry without shape": (_edit_first(lambda e: e.pop("shape")), "has no shape"),
    "unknown dtype": (_edit_first(lambda e: e.update(dtype="F33")), "dtype 'F33' is not a safetensors dtype"),
    "negative shape": (_edit_first(lambda e: e.update(shape=[-1, 64])), "shape [-1, 64] is not a list of non-negative integers"),
    "offsets not integers": (_edit_first(lambda e: e.update(data_offsets=["0", 5.5])), "is not two non-negative integers"),
    "three offsets": (_edit_first(lambda e: e.update(data_offsets=[0, 4, 8])), "is not two non-negative integers"),
    "start after end": (_edit_first(_swap), "start after their end"),
    "offsets past the end (truncated file)": (_truncated, "run past the end of the file"),
    "size not dtype x shape": (_edit_first(_resize), "but dtype F32 x shape [49153, 64] needs 12583168"),
    "stray bytes after the tensors": (_stray_bytes, "stray bytes at the end"),
}


def corrupt_copy(tmp_path: Path, corruption: str) -> Path:
    """A tiny-random folder whose model.safetensors has `corruption` (a key of CORRUPTIONS)."""
    folder = tiny_copy(tmp_path)
    CORRUPTIONS[corruption][0](folder / "model.safetensors")
    return folder


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
