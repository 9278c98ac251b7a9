"""Tensor-at-a-time reading and writing of safetensors files, for merges that never hold whole models.

Written by hand (on the documented format: 8-byte little-endian header length, a JSON header of
name -> dtype/shape/data_offsets, then the bytes) because the library's readers do not fit a
streaming merge: `safe_open` maps the whole file and every page a merge touches stays resident
until the file is closed, so merging five 0.5 GB models peaks near 2.7 GB; and `save_file` needs
every output tensor in memory at once. Here each tensor is a view of a private memory map whose
pages are released (`madvise(MADV_DONTNEED)`) once the tensor is used, and the writer lays out
the header first and then appends tensors as they are computed.

Tensors are numpy arrays, so a merge needs no torch (whose import alone is a second of a
command-line merge). bfloat16, which numpy lacks, is read as float32 (exact: its bits are
float32's top half) and written back rounded to nearest even, as torch rounds.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cairn.errors import ModelError

# safetensors dtype -> how its bytes are stored in numpy (bfloat16 as its raw 16 bits)
STORAGE = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip
# Every dtype of the safetensors format -> bits per element: what a tensor's byte size must match.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
_MAX_HEADER = 100 * 2**20  # as the safetensors library: a larger header is not a real file's


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) as float32 values: the bits are float32's upper half."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def to_storage(array: np.ndarray, dtype: str) -> np.ndarray:
    """`array` as safetensors `dtype` stores it; floats to bfloat16 round to nearest even."""
    if dtype != "BF16":
        return array.astype(STORAGE[dtype], copy=False)
    bits = np.ascontiguousarray(array, np.float32).view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(array), np.uint16(0x7FC0), rounded)


def stored(array: np.ndarray, dtype: str) -> np.ndarray:
    """`array` rounded to `dtype` and read back: the values a file of that dtype would hold."""
    raw = to_storage(array, dtype)
    return bf16_to_float32(raw) if dtype == "BF16" else raw


def read_header(path: str | Path) -> tuple[dict, int]:
    """(header without `__metadata__`, offset of the data section) of a safetensors file, checked
    against the format before any tensor is read: a sane header length, a UTF-8 JSON object of
    well-formed entries, and tensors stored back to back, each of the size its dtype and shape
    need, exactly covering the rest of the file. Anything else is a ModelError naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            length = _header_length(path, f.read(8), file_size)
            raw = f.read(length)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or exc}); a safetensors file was expected") from exc
    header = _parse_header(path, raw)
    _check_metadata(path, header.pop("__metadata__", None))
    for name, entry in header.items():
        _check_entry(path, name, entry, file_size - 8 - length)
    _check_layout(path, header, file_size - 8 - length)
    return header, 8 + length


def _header_length(path: Path, raw: bytes, file_size: int) -> int:
    """The header length the file's first 8 bytes declare, if the file can hold it."""
    if len(raw) != 8:
        raise ModelError(f"{path}: not a safetensors file ({file_size} bytes, shorter than the 8-byte header length)")
    (length,) = struct.unpack("<Q", raw)
    if length > file_size - 8:
        raise ModelError(
            f"{path}: not a valid safetensors file: its header length ({length} bytes) is larger than the rest of the file "
            f"({file_size - 8} bytes); truncated, or not safetensors"
        )
    if length > _MAX_HEADER:
        raise ModelError(f"{path}: not a valid safetensors file: a header of {length} bytes (at most {_MAX_HEADER} expected)")
    return length


def _parse_header(path: Path, raw: bytes) -> dict:
    """The header bytes as a JSON object (strict UTF-8, as the format requires)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelError(f"{path}: not a valid safetensors file: its header is not UTF-8 text (byte {raw[exc.start]:#04x} at {exc.start})") from exc
    try:
        header = json.loads(text)
    except ValueError as exc:
        raise ModelError(f"{path}: not a valid safetensors file: its header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise ModelError(
            f"{path}: not a valid safetensors file: its header is a JSON {_json_type(header)}, "
            "expected an object of tensor name -> {dtype, shape, data_offsets}"
        )
    return header


def _check_metadata(path: Path, metadata) -> None:
    """`__metadata__`, where present, is an object of strings (what every reader expects)."""
    if metadata is None:
        return
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ModelError(f"{path}: not a valid safetensors file: __metadata__ is not an object of strings")


def _check_entry(path: Path, name: str, entry, data_size: int) -> None:
    """One tensor's entry: a known dtype, a shape of non-negative ints, and two byte offsets
    into the data section, start <= end <= its size, spanning exactly dtype x shape bytes."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise ModelError(f"{where}: its header entry is a JSON {_json_type(entry)}, expected an object with dtype, shape and data_offsets")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in entry]
    if missing:
        raise ModelError(f"{where}: its header entry has no {' or '.join(missing)} (dtype, shape and data_offsets are expected)")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BITS:
        raise ModelError(f"{where}: dtype {dtype!r} is not a safetensors dtype (expected one of {', '.join(DTYPE_BITS)})")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise ModelError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(n) for n in offsets):
        raise ModelError(f"{where}: data_offsets {offsets!r} is not two non-negative integers [start, end]")
    start, end = offsets
    if start > end:
        raise ModelError(f"{where}: data_offsets [{start}, {end}] start after their end (expected start <= end)")
    if end > data_size:
        raise ModelError(f"{where}: data_offsets [{start}, {end}] run past the end of the file (data section of {data_size} bytes; truncated?)")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits != 8 * (end - start):
        needed = bits // 8 if bits % 8 == 0 else bits / 8
        raise ModelError(f"{where}: data_offsets [{start}, {end}] span {end - start} bytes, but dtype {dtype} x shape {shape} needs {needed}")


def _check_layout(path: Path, header: dict, data_size: int) -> None:
    """The tensors lie back to back from the start of the data section to the end of the file, as
    the format requires (and the safetensors library, which transformers uses, checks)."""
    position = 0
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        start, end = entry["data_offsets"]
        if start != position:
            what = "overlaps the tensor before it" if start < position else f"leaves a gap of {start - position} bytes before it"
            raise ModelError(f"{path}: tensor {name!r} starts at byte {start} of the data section, expected {position}: it {what}")
        position = end
    if position != data_size:
        raise ModelError(f"{path}: the tensors end at byte {position} of the data section, but it holds {data_size} bytes (stray bytes at the end)")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _json_type(value) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")


def header_elements(path: str | Path) -> int:
    """How many elements (parameters) the tensors of a safetensors file hold: its header only."""
    return sum(math.prod(entry["shape"]) for entry in read_header(path)[0].values())


class SafetensorsReader:
    """Zero-copy tensor views of one safetensors file; `release(name)` drops its pages from memory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.header, self._data = read_header(self.path)  # every entry checked before any byte is mapped
        for name, entry in self.header.items():
            if entry["dtype"] not in STORAGE:
                raise ModelError(f"{self.path}: tensor {name!r} has dtype {entry['dtype']}, which Cairn cannot read (supported: {', '.join(STORAGE)})")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            # A private (copy-on-write) map: writable views, never written back to the file.
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None

    def keys(self) -> list[str]:
        return list(self.header)

    def get(self, name: str) -> np.ndarray:
        """The tensor as an array (a view of the file; bfloat16 comes as a float32 copy)."""
        entry = self.header[name]
        start, end = entry["data_offsets"]
        storage = np.dtype(STORAGE[entry["dtype"]])
        if end == start:
            raw = np.empty(entry["shape"], storage)
        else:
            raw = np.frombuffer(self._map, storage, (end - start) // storage.itemsize, self._data + start).reshape(entry["shape"])
        return bf16_to_float32(raw) if entry["dtype"] == "BF16" else raw

    def release(self, name: str) -> None:
        """Drop the resident pages of `name`'s bytes (clean file pages: they are re-read if needed)."""
        start, end = self.header[name]["data_offsets"]
        page = mmap.PAGESIZE
        lo = (self._data + start) // page * page
        if end > start:
            self._map.madvise(mmap.MADV_DONTNEED, lo, self._data + end - lo)

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a tensor view is still alive; the map closes when it goes
                pass


def folder_files(folder: str | Path) -> tuple[list[str], dict[str, str] | None]:
    """(safetensors files, tensor -> file map) of a HF model folder: those its index
    (`model.safetensors.index.json`) lists, checked to exist, else `model.safetensors` (map None);
    ([], None) where it has neither."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return (["model.safetensors"], None) if (folder / "model.safetensors").is_file() else ([], None)
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{index}: not a safetensors index ({exc}); expected an object with a weight_map of tensor name -> file") from exc
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ModelError(f"{index}: weight_map is not an object of tensor name -> file name")
    files = sorted(set(weight_map.values()))
    for file in files:
        if not (folder / file).is_file():
            raise ModelError(f"{index}: lists {file}, which is not in {folder}")
    return files, weight_map


class FolderWeights:
    """The tensors of a HF model folder, one file or sharded (`model.safetensors.index.json`)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        files, weight_map = folder_files(self.folder)
        if not files:
            raise ModelError(f"{self.folder}: no model.safetensors or model.safetensors.index.json (a full HF model folder was expected)")
        self.readers: dict[str, SafetensorsReader] = {}
        try:
            for f in files:
                self.readers[f] = SafetensorsReader(self.folder / f)
        except ModelError:
            self.close()  # the files opened before the bad one
            raise
        self.where = weight_map or {n: files[0] for n in self.readers[files[0]].keys()}
        for name, file in self.where.items():
            if name not in self.readers[file].header:
                raise ModelError(f"{self.folder / 'model.safetensors.index.json'}: tensor {name!r} is listed in {file} but not stored there")

    def keys(self) -> list[str]:
        return list(self.where)

    def meta(self, name: str) -> tuple[str, list[int]]:
        """(safetensors dtype name, shape) of a tensor."""
        entry = self.readers[self.where[name]].header[name]
        return entry["dtype"], entry["shape"]

    def get(self, name: str) -> np.ndarray:
        return self.readers[self.where[name]].get(name)

    def release(self, name: str) -> None:
        self.readers[self.where[name]].release(name)

    def close(self) -> None:
        for r in self.readers.values():
            r.close()


class SafetensorsWriter:
    """Write a safetensors file whose tensor names, dtypes and shapes are known up front, one
    tensor at a time in that order; the header is written first. Writing and hashing (sha256,
    kept in `digest`) run on a background thread, overlapping the computation of the next tensor."""

    def __init__(self, path: str | Path, specs: list[tuple[str, str, list[int]]], metadata: dict | None = None):
        """`specs`: (name, safetensors dtype name, shape) of every tensor, in the order written."""
        header, offset = {}, 0
        for name, dtype, shape in specs:
            size = math.prod(shape) * np.dtype(STORAGE[dtype]).itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to a multiple of 8 bytes
        self._order = [(n, header[n]["dtype"], header[n]["shape"]) for n, _, _ in specs]
        self._next = 0
        self._hash = hashlib.sha256()
        self._file = open(path, "wb")
        self._pool = ThreadPoolExecutor(1)
        self._pending: list = []
        self.digest: str | None = None
        self._put(struct.pack("<Q", len(raw)) + raw)

    def _put(self, data) -> None:
        def work():
            self._file.write(data)
            self._hash.update(data)

        self._pending.append(self._pool.submit(work))
        if len(self._pending) > 2:  # at most two tensors wait in memory
            self._pending.pop(0).result()

    def write(self, name: str, array: np.ndarray) -> None:
        """Append the next tensor, converted to its declared dtype."""
        expected, dtype, shape = self._order[self._next]
        if name != expected or list(array.shape) != list(shape):
            raise ValueError(f"expected tensor {expected} {dtype} {shape}, got {name} {list(array.shape)}")
        self._put(memoryview(np.ascontiguousarray(to_storage(array, dtype)).reshape(-1).view(np.uint8)))
        self._next += 1

    def close(self) -> None:
        """Finish the file (fsync); refuses if tensors are missing, unless an error is already on its
        way (close runs in a `finally`): then that error, the cause, is the one the user sees."""
        failing = sys.exc_info()[1] is not None
        try:
            for job in self._pending:
                job.result()
            if self._next != len(self._order) and not failing:
                raise ValueError(f"{len(self._order) - self._next} tensors were never written")
            self._file.flush()
            os.fsync(self._file.fileno())
            self.digest = self._hash.hexdigest()
        finally:
            self._pool.shutdown()
            self._file.close()
