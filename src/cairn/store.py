"""Contributions on disk: manifests (`cairn.json`), file hashes, and the contribution store."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from cairn.errors import CairnError
from cairn.io import atomic_write_json, check_free_space

MANIFEST = "cairn.json"


def file_hashes(folder: Path, known: dict[str, str] | None = None) -> dict[str, str]:
    """sha256 of every file in `folder` (recursively) except the manifest; `known` gives hashes
    already computed while writing (relative path -> hex digest)."""
    out = dict(known or {})
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and p.name != MANIFEST and str(p.relative_to(folder)) not in out:
            h = hashlib.sha256()
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[str(p.relative_to(folder))] = h.hexdigest()
    return out


def write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write_json(Path(folder) / MANIFEST, manifest)


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    from cairn.errors import DataError

    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from exc
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: expected a JSON object (a Cairn manifest), got {type(manifest).__name__}")
    return manifest


def made_by(folder: Path) -> str | None:
    """The Cairn command whose output `folder` is ('train', 'merge' or 'mix', read from its
    manifest), or None: not a Cairn output, or one whose manifest cannot be read."""
    try:
        manifest = read_manifest(folder) if Path(folder).is_dir() else None
    except CairnError:
        return None
    for command in ("train", "merge", "mix"):
        if manifest and command in manifest:
            return command
    return "mix" if manifest and manifest.get("kind") == "moe" else None


def verify_files(folder: Path, expected: dict[str, str]) -> list[str]:
    """Problems found comparing a folder's files with the sha256 its manifest recorded."""
    if not (isinstance(expected, dict) and all(isinstance(d, str) for d in expected.values())):
        return [f"{MANIFEST}: 'files' is not a mapping of file name to sha256"]
    actual = file_hashes(folder)
    problems = [f"{name}: missing" for name in expected if name not in actual]
    problems += [f"{name}: sha256 {actual[name][:12]} != recorded {digest[:12]} (modified or corrupt)"
                 for name, digest in expected.items() if name in actual and actual[name] != digest]
    problems += [f"{name}: not in the manifest" for name in actual if name not in expected]
    return problems


class Store:
    """A folder of contributions (adapters or full weights, each with its `cairn.json`).

    Layout: `ROOT/items/<ID>/` holds a contribution's files; `ROOT/index.json` lists them. Adding
    copies to a temporary folder first, then takes a file lock only to claim the ID, rename and
    rewrite the index, so concurrent writers never lose an entry and readers never see half a copy.
    """

    ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,79}"
    _ENTRY_FIELDS = ("id", "task", "method", "base_fingerprint", "digest")

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.items = self.root / "items"

    def _lock(self):
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / ".lock"), timeout=120)

    def _index(self) -> dict:
        from cairn.errors import DataError

        path = self.root / "index.json"
        if not path.is_file():
            return {"schema": 1, "entries": {}}
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read the store index ({exc})") from exc
        entries = index.get("entries") if isinstance(index, dict) else None
        if not isinstance(entries, dict) or not all(
            isinstance(e, dict) and all(isinstance(e.get(k), str) for k in self._ENTRY_FIELDS) for e in entries.values()
        ):
            raise DataError(
                f"{path}: damaged store index (expected {{\"entries\": {{ID: {{{', '.join(self._ENTRY_FIELDS)}, ...}}}}}}); "
                "restore it, or move the store aside and add its contributions again"
            )
        return index

    def _check_id(self, cid: str) -> str:
        import re

        from cairn.errors import DataError

        if not re.fullmatch(self.ID_PATTERN, cid) or cid.strip(".") == "":
            raise DataError(f"invalid contribution id {cid!r}: use letters, digits, '.', '_' or '-' (at most 80), starting with a letter or digit")
        return cid

    def add(self, path: Path | str, name: str | None = None) -> dict:
        """Copy the contribution at `path` into the store (after checking its files) and index it."""
        from cairn.errors import DataError

        path = Path(path)
        manifest = read_manifest(path) if path.is_dir() else None
        if manifest is None:
            raise DataError(f"{path}: not a Cairn contribution (no {MANIFEST}); make one with `cairn train`")
        for key in ("base_fingerprint", "task", "method", "files"):
            if key not in manifest:
                raise DataError(f"{path}/{MANIFEST}: missing field {key!r}")
            if key != "files" and not isinstance(manifest[key], str):
                raise DataError(f"{path}/{MANIFEST}: field {key!r} must be a string, got {type(manifest[key]).__name__}")
        problems = verify_files(path, manifest["files"])
        if problems:
            raise DataError(f"{path}: files do not match {MANIFEST}: " + "; ".join(problems))
        digest = hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()
        cid = self._check_id(name if name is not None else f"{manifest['task']}-{manifest['method']}-{digest[:10]}".replace("/", "_").replace(":", "_"))
        try:
            self.items.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"{self.root}: cannot create the store there ({exc.strerror})") from exc
        check_free_space(self.items, sum(f.stat().st_size for f in path.rglob("*") if f.is_file()), f"contribution {cid!r}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{cid}.", suffix=".tmp", dir=self.items))
        try:
            shutil.copytree(path, tmp, dirs_exist_ok=True)
            with self._lock():
                index = self._index()
                if cid in index["entries"]:
                    if index["entries"][cid]["digest"] == digest:
                        return index["entries"][cid]
                    raise DataError(f"contribution id {cid!r} is taken by different files; choose another --name")
                os.replace(tmp, self.items / cid)
                entry = {
                    "id": cid,
                    "task": manifest["task"],
                    "method": manifest["method"],
                    "kind": manifest.get("kind"),
                    "base": manifest.get("base"),
                    "base_fingerprint": manifest["base_fingerprint"],
                    "data_hash": manifest.get("data_hash"),
                    "digest": digest,
                }
                index["entries"][cid] = entry
                atomic_write_json(self.root / "index.json", index)
                return entry
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def list(self) -> list[dict]:
        return list(self._index()["entries"].values())

    def path(self, cid: str) -> Path:
        from cairn.errors import DataError

        self._check_id(cid)
        if cid not in self._index()["entries"]:
            raise DataError(f"no contribution {cid!r} in the store {self.root}; `cairn store list` shows what is there")
        return self.items / cid

    def show(self, cid: str) -> dict:
        return read_manifest(self.path(cid)) or {}

    def verify(self, cid: str | None = None) -> dict[str, list[str]]:
        """Recompute every file hash; returns {id: problems} (empty lists when all is well)."""
        ids = [cid] if cid else [e["id"] for e in self.list()]
        report = {}
        for i in ids:
            folder = self.path(i)
            manifest = read_manifest(folder) if folder.is_dir() else None
            report[i] = ["folder or manifest missing"] if manifest is None else verify_files(folder, manifest.get("files"))
        return report

    def resolve(self, cid: str, base_fingerprint: str | None = None) -> Path:
        """The folder of a verified contribution; refuses tampered files or another base model."""
        from cairn.errors import DataError, ModelError

        problems = self.verify(cid)[cid]
        if problems:
            raise DataError(f"contribution {cid!r} failed verification: " + "; ".join(problems))
        recorded = str(self.show(cid).get("base_fingerprint"))
        if base_fingerprint and recorded != base_fingerprint:
            raise ModelError(
                f"contribution {cid!r} was made on a base with fingerprint {recorded[:12]}, "
                f"not on this base ({base_fingerprint[:12]})"
            )
        return self.path(cid)
