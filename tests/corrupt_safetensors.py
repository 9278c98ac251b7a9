"""Test helpers: copies of tiny-random's weights with their safetensors file corrupted in each way
a header check must catch (used by tests/weights/test_tensor_files.py and tests/test_models.py)."""

import json
import shutil
import struct
from pathlib import Path



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
