"""A contribution's manifest, `cairn.json`: what it is, what it was made from, and its files' hashes.

Every producer (training, merging, mixing) writes its manifest through `contribution_manifest`,
so every contribution carries the fields the store indexes it by (`kind`, `base`,
`base_fingerprint`, `task`, `method`, `files`) plus its producer's own section (`train`, `merge`
or `mix`), which also says which command made it, and a model card (`README.md`) saying the same
for people. A contribution made elsewhere gets its manifest when it enters the store (`import`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path

from cairn.errors import CairnError, DataError
from cairn.io import atomic_write_json, read_json_object
from cairn.model_card import CARD, model_card

MANIFEST = "cairn.json"
# What makes contributions, each writing its own section: three commands, and `cairn store add
# --base`, which describes a contribution made elsewhere (in the store's copy, not in its folder).
PRODUCERS = ("train", "merge", "mix", "import")

def _link_target(link: Path, root: Path) -> Path:
    """The file a symbolic link inside `root` stands for, or a DataError naming the link and its target.

    A link to a file inside `root` counts as a copy of that file: its hash, and its copy in the
    store, are the target's content, so a manifest written over the folder stays true of the copy
    (a contributor may link a shared config rather than duplicate it). Everything else is refused:
    a link that leaves `root` (`store add` would copy, say, ~/.ssh into a shared store), one that
    dangles or loops, and one to a folder (it can loop back on its parents, and would put one
    subtree in the store under two names)."""
    shown = os.readlink(link)
    try:
        target = Path(os.path.realpath(link, strict=True))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataError(f"{link}: symbolic link loop (-> {shown}); expected a file, or a link to a file in {root}") from None
        raise DataError(f"{link}: symbolic link to {shown}, which does not exist; expected a file, or a link to a file in {root}") from None
    inside = Path(os.path.realpath(root))
    if target != inside and inside not in target.parents:
        raise DataError(f"{link}: symbolic link to {shown}, outside {root}; copy the file into the folder instead of linking to it")
    if not target.is_file():
        raise DataError(f"{link}: symbolic link to the folder {shown}; expected a file, or a link to a file in {root}")
    return target


def _contents(folder: Path) -> list[tuple[str, Path]]:
    """(name relative to `folder`, path to read) of every file in `folder`, recursively, sorted by
    name; walks without following links (see `_link_target` for what a link may be), and refuses
    pipes, sockets and devices (reading a pipe would wait forever)."""
    folder = Path(folder)
    out = []
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            with os.scandir(current) as it:
                entries = list(it)
        except OSError as exc:
            raise DataError(f"{current}: cannot read the folder ({exc.strerror or exc})") from None
        for entry in entries:
            path = Path(entry.path)
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError as exc:
                raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
            if stat.S_ISLNK(mode):
                out.append((str(path.relative_to(folder)), _link_target(path, folder)))
            elif stat.S_ISDIR(mode):
                pending.append(path)
            elif stat.S_ISREG(mode):
                out.append((str(path.relative_to(folder)), path))
            else:
                raise DataError(f"{path}: not a regular file or folder (a pipe, socket or device); expected only files")
    return sorted(out)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return h.hexdigest()


def file_hashes(folder: Path, known: dict[str, str] | None = None) -> dict[str, str]:
    """sha256 of every file in `folder` (recursively) except the manifest; `known` gives hashes
    already computed while writing (relative path -> hex digest). A symbolic link that does not
    stand for a file inside `folder` is a DataError."""
    out = dict(known or {})
    for name, source in _contents(folder):
        if Path(name).name != MANIFEST and name not in out:
            out[name] = _sha256(source)
    return out


def files_digest(files: dict) -> str:
    """sha256 of a manifest's `files` mapping: what the store's index records for each contribution."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write_json(Path(folder) / MANIFEST, manifest)


def read_manifest(folder: Path) -> dict | None:
    """`folder`'s manifest, or None where it has none; a damaged one is a DataError naming it."""
    path = Path(folder) / MANIFEST
    return read_json_object(path, "a Cairn manifest") if path.is_file() else None


def made_by(folder: Path) -> str | None:
    """The Cairn command whose output `folder` is (one of `PRODUCERS`, read from its manifest), or
    None: not a Cairn output, or one whose manifest cannot be read."""
    try:
        manifest = read_manifest(folder) if Path(folder).is_dir() else None
    except CairnError:
        return None
    return next((command for command in PRODUCERS if manifest and command in manifest), None)


def verify_files(folder: Path, expected: dict[str, str]) -> list[str]:
    """Problems found comparing a folder's files with the sha256 its manifest recorded."""
    if not (isinstance(expected, dict) and all(isinstance(d, str) for d in expected.values())):
        return [f"{MANIFEST}: 'files' is not a mapping of file name to sha256"]
    try:
        actual = file_hashes(folder)
    except DataError as exc:  # a link leaving the folder, a loop, an unreadable file
        return [str(exc)]
    problems = [f"{name}: missing" for name in expected if name not in actual]
    problems += [f"{name}: sha256 {actual[name][:12]} != recorded {digest[:12]} (modified or corrupt)"
                 for name, digest in expected.items() if name in actual and actual[name] != digest]
    problems += [f"{name}: not in the manifest" for name in actual if name not in expected]
    return problems


def describe(folder: Path, producer: str, details: dict, *, kind: str, task: str, method: str, made_from: dict,
             known: dict[str, str] | None = None, **fields) -> dict:  # fmt: skip
    """The manifest of the contribution in `folder`, written nowhere: the fields every contribution
    has (`kind`: adapter, model or moe; `task`; `method`; `made_from`'s `base` and
    `base_fingerprint`, and any other provenance it holds), `fields`, the `producer`'s section
    (`details`) and the hashes of the folder's files (`known`: those computed while writing)."""
    if producer not in PRODUCERS:
        raise ValueError(f"producer {producer!r}: expected one of {', '.join(PRODUCERS)}")
    missing = [key for key in ("base", "base_fingerprint") if not made_from.get(key)]
    if missing:
        raise ValueError(f"a contribution's manifest records its base: made_from lacks {', '.join(missing)}")
    manifest = {"schema": 1, "kind": kind, "task": task, "method": method, **made_from, **fields, producer: details}
    manifest["files"] = file_hashes(Path(folder), known)
    return manifest


def contribution_manifest(folder: Path, producer: str, details: dict, **described) -> dict:
    """Write the model card (`README.md`, replacing PEFT's empty template) and the manifest of the
    contribution being made in `folder`, and return the manifest (see `describe`)."""
    manifest = describe(folder, producer, details, **described)
    (Path(folder) / CARD).write_text(model_card(manifest), encoding="utf-8")
    manifest["files"][CARD] = _sha256(Path(folder) / CARD)
    write_manifest(Path(folder), manifest)
    return manifest


def tasks_of(inputs: list[Path]) -> str:
    """The task of a combination of contributions: each input's task (its manifest's; the
    folder's name where it has none) joined by '+'."""
    names = []
    for path in inputs:
        try:
            manifest = read_manifest(Path(path))
        except CairnError:
            manifest = None
        task = manifest.get("task") if manifest else None
        names.append(task if isinstance(task, str) and task else Path(path).name)
    return "+".join(names)
