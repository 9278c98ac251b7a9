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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cairn.errors import ModelError

# safetensors dtype -> how its bytes are stored in numpy (bfloat16 as its raw 16 bits)
STORAGE = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip
_MAX_HEADER = 100 * 2**20


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


def read_header(path: Path) -> tuple[dict, int]:
    """(header without `__metadata__`, offset of the data section) of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ModelError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", raw)
        if size > _MAX_HEADER:
            raise ModelError(f"{path}: not a safetensors file (header of {size} bytes)")
        try:
            header = json.loads(f.read(size))
        except ValueError as exc:
            raise ModelError(f"{path}: not a safetensors file (header is not JSON: {exc})") from exc
    header.pop("__metadata__", None)
    return header, 8 + size


class SafetensorsReader:
    """Zero-copy tensor views of one safetensors file; `release(name)` drops its pages from memory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.header, self._data = read_header(self.path)
        size = self.path.stat().st_size
        for name, entry in self.header.items():
            if entry.get("dtype") not in STORAGE:
                raise ModelError(f"{self.path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
            start, end = entry["data_offsets"]
            if self._data + end > size:
                raise ModelError(f"{self.path}: tensor {name!r} runs past the end of the file (truncated?)")
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


class FolderWeights:
    """The tensors of a HF model folder, one file or sharded (`model.safetensors.index.json`)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise ModelError(f"{index}: not a safetensors index ({exc})") from exc
            files = sorted(set(weight_map.values()))
        elif (self.folder / "model.safetensors").is_file():
            files, weight_map = ["model.safetensors"], None
        else:
            raise ModelError(f"{self.folder}: no model.safetensors or model.safetensors.index.json (a full HF model folder was expected)")
        self.readers = {f: SafetensorsReader(self.folder / f) for f in files}
        self.where = weight_map or {n: files[0] for n in self.readers[files[0]].keys()}
        for name, file in self.where.items():
            if name not in self.readers[file].header:
                raise ModelError(f"{index}: tensor {name!r} is listed in {file} but not stored there")

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
        """Finish the file (fsync); refuses if tensors are missing."""
        try:
            for job in self._pending:
                job.result()
            if self._next != len(self._order):
                raise ValueError(f"{len(self._order) - self._next} tensors were never written")
            self._file.flush()
            os.fsync(self._file.fileno())
            self.digest = self._hash.hexdigest()
        finally:
            self._pool.shutdown()
            self._file.close()
