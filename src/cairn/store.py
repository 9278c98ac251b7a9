"""The contribution store: a folder of verified contributions and an index with each one's digest."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import unicodedata
from pathlib import Path

from cairn.errors import CairnError, DataError, ModelError
from cairn.io import (
    atomic_write_json,
    check_free_space,
    follow_umask_tree,
    remove_stale_temps,
    temp_dir,
)
from cairn.manifest import (
    MANIFEST,
    _contents,
    files_digest,
    read_manifest,
    verify_files,
    write_manifest,
)

log = logging.getLogger("cairn")


def _copy(contents: list[tuple[str, Path]], dest: Path) -> dict[str, str]:
    """Copy each (name, source) into `dest` as a new file (links become the files they stand
    for; modes follow the umask, not the source's), hashing as it goes; returns name -> sha256."""
    hashes = {}
    for name, source in contents:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        # O_NOFOLLOW: a file swapped for a link since the walk is refused, not followed
        fd = os.open(source, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as src, target.open("xb") as out:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
        hashes[name] = h.hexdigest()
    return hashes


class Store:
    """A folder of contributions (adapters or full weights, each with its `cairn.json`).

    Layout: `ROOT/items/<ID>/` holds a contribution's files; `ROOT/index.json` lists them. Adding
    copies to a temporary folder first, then takes a file lock only to claim the ID, rename and
    rewrite the index, so concurrent writers never lose an entry and readers never see half a copy.
    Everything the store writes has the permissions the user's umask gives (a shared store stays
    readable by the group when the umask allows).
    """

    ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,79}"
    ID_MAX = 80
    _ENTRY_FIELDS = ("id", "task", "method", "base_fingerprint", "digest")

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.items = self.root / "items"

    def _lock(self):
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / ".lock"), timeout=120)  # created with the umask's permissions

    def _index(self) -> dict:
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
        if not re.fullmatch(self.ID_PATTERN, cid) or cid.strip(".") == "":
            raise DataError(f"invalid contribution id {cid!r}: use letters, digits, '.', '_' or '-' (at most {self.ID_MAX}), starting with a letter or digit")
        return cid

    @classmethod
    def derive_id(cls, task: str, method: str, digest: str) -> str:
        """`TASK-METHOD-HASH`, made a valid ID: accented letters lose their accents (NFKD), other
        characters outside [A-Za-z0-9_.-] become '_', and the name is cut to fit, keeping the hash."""
        suffix = f"-{digest[:10]}"
        text = "".join(c for c in unicodedata.normalize("NFKD", f"{task}-{method}") if not unicodedata.combining(c))
        text = re.sub(r"[^A-Za-z0-9_.-]", "_", text).lstrip("._-")[: cls.ID_MAX - len(suffix)]
        return text + suffix if text else digest[:10]

    def add(self, path: Path | str, name: str | None = None, *, manifest: dict | None = None) -> dict:
        """Copy the contribution at `path` into the store (after checking its files) and index it.
        `manifest` describes one made elsewhere, which has none (`describe_made_elsewhere`): it is
        written into the store's copy only.

        Temporaries that killed adds left in `items/` are removed first. A folder `items/ID` that
        the index does not list (an add killed between its rename and its index write) is indexed
        if it holds this very contribution, and replaced otherwise; the log says which."""
        path = Path(path)
        if manifest is None:
            manifest = read_manifest(path) if path.is_dir() else None
        if manifest is None:
            raise DataError(f"{path}: not a Cairn contribution (no {MANIFEST}); make one with `cairn train`, or add one made elsewhere "
                            "with `cairn store add PATH --base BASE` (the base it was trained on)")
        for key in ("base_fingerprint", "task", "method", "files"):
            if key not in manifest:
                raise DataError(f"{path}/{MANIFEST}: missing field {key!r}")
            if key != "files" and not isinstance(manifest[key], str):
                raise DataError(f"{path}/{MANIFEST}: field {key!r} must be a string, got {type(manifest[key]).__name__}")
        contents = _contents(path)  # refuses links leaving the folder, loops, pipes
        problems = verify_files(path, manifest["files"])
        if problems:
            raise DataError(f"{path}: files do not match {MANIFEST}: " + "; ".join(problems))
        digest = files_digest(manifest["files"])
        cid = self._check_id(name if name is not None else self.derive_id(manifest["task"], manifest["method"], digest))
        try:
            self.items.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"{self.root}: cannot create the store there ({exc.strerror})") from exc
        remove_stale_temps(self.items)
        check_free_space(self.items, sum(source.stat().st_size for _, source in contents), f"contribution {cid!r}")
        tmp = temp_dir(self.items, cid)
        try:
            try:
                copied = _copy(contents, tmp)
                if not (tmp / MANIFEST).is_file():  # one made elsewhere: its manifest is the store's
                    write_manifest(tmp, manifest)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise CairnError(f"{self.items}: the disk filled up while copying {path}; the store is unchanged (free some space and rerun)") from exc
                raise DataError(f"{path}: cannot copy it into the store ({exc.strerror or exc}: {exc.filename})") from exc
            if read_manifest(tmp) != manifest or {n: h for n, h in copied.items() if Path(n).name != MANIFEST} != manifest["files"]:
                raise DataError(f"{path}: changed while it was being copied into the store; nothing was added (rerun when it is complete)")
            follow_umask_tree(tmp)
            with self._lock():
                index = self._index()
                if cid in index["entries"]:
                    if index["entries"][cid]["digest"] == digest:
                        return index["entries"][cid]
                    raise DataError(f"contribution id {cid!r} is taken by different files; choose another --name")
                item = self.items / cid
                if item.exists() or item.is_symlink():
                    if self._holds(item, manifest):
                        log.warning(f"{item}: in the store but not in its index (an interrupted `store add`); it holds the same files as {path}, so it is indexed as it is")
                    else:
                        log.warning(f"{item}: in the store but not in its index (an interrupted `store add`), with other files than {path}; replaced by {path}")
                        self._discard(item)
                        os.replace(tmp, item)
                else:
                    os.replace(tmp, item)
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

    @staticmethod
    def _holds(item: Path, manifest: dict) -> bool:
        """Whether the unindexed `item` is a whole copy of the contribution `manifest` describes."""
        if item.is_symlink() or not item.is_dir():
            return False
        try:
            return read_manifest(item) == manifest and not verify_files(item, manifest["files"])
        except CairnError:
            return False

    def _discard(self, item: Path) -> None:
        """Remove an unindexed entry of `items/`: renamed into a temporary first (one step, so a
        kill midway leaves a temporary the next add removes, never half an item under its ID)."""
        aside = temp_dir(self.items, f"{item.name}-unindexed")
        os.replace(item, aside / item.name)
        shutil.rmtree(aside, ignore_errors=True)

    def list(self) -> list[dict]:
        return list(self._index()["entries"].values())

    def path(self, cid: str) -> Path:
        self._check_id(cid)
        if cid not in self._index()["entries"]:
            raise DataError(f"no contribution {cid!r} in the store {self.root}; `cairn store list` shows what is there")
        return self.items / cid

    def show(self, cid: str) -> dict:
        return read_manifest(self.path(cid)) or {}

    def verify(self, cid: str | None = None) -> dict[str, list[str]]:
        """Recompute every file hash, and check each manifest against what the index recorded when
        it was added; returns {id: problems} (empty lists when all is well)."""
        if cid:
            self.path(cid)  # a valid, indexed ID
        entries = self._index()["entries"]
        ids = [cid] if cid else list(entries)
        report = {}
        for i in ids:
            folder = self.items / i
            try:
                manifest = read_manifest(folder) if folder.is_dir() and not folder.is_symlink() else None
            except DataError as exc:
                report[i] = [str(exc)]
                continue
            if manifest is None:
                report[i] = [f"{folder}: folder or manifest missing"]
                continue
            report[i] = verify_files(folder, manifest.get("files")) + self._against_index(folder, manifest, entries[i])
        return report

    @staticmethod
    def _against_index(folder: Path, manifest: dict, entry: dict) -> list[str]:
        """Where an item's manifest no longer says what the index recorded: editing the weights and
        the manifest's hashes together passes the file check, not this one."""
        problems = []
        files = manifest.get("files")
        if isinstance(files, dict) and files_digest(files) != entry["digest"]:
            problems.append(f"{folder / MANIFEST}: its 'files' digest {files_digest(files)[:12]} != {entry['digest'][:12]} "
                            "recorded in index.json when it was added (the manifest was edited since)")
        for key in ("task", "method", "base_fingerprint"):
            if manifest.get(key) != entry[key]:
                problems.append(f"{folder / MANIFEST}: {key} {str(manifest.get(key))[:40]!r} != {entry[key][:40]!r} recorded in index.json")
        return problems

    def resolve(self, cid: str, base_fingerprint: str | None = None) -> Path:
        """The folder of a verified contribution; refuses tampered files or another base model."""
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


def default_store() -> Path:
    """The store that input IDs refer to when none is named: `$CAIRN_STORE`, else ./cairn-store."""
    return Path(os.environ.get("CAIRN_STORE") or "cairn-store")
