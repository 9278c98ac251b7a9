"""Contributions as inputs: naming them (a folder or `store:ID`) and checking that each was made
on the base it is combined with, before a merge or a mixture reads any weight.

A contribution with a manifest records its base's fingerprint, which must equal the base's. One
without (a plain PEFT adapter or HF folder from elsewhere) is accepted when its tensors fit the
base's shapes, with a note that its base could not be verified: an adapter trained on another
base of the same architecture fits too, and only a fingerprint tells them apart.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Callable

from cairn.errors import ConfigError, ModelError
from cairn.store import Store, read_manifest
from cairn.tensor_files import FolderWeights, read_header

log = logging.getLogger("cairn")
STORE_PREFIX = "store:"


def resolve_inputs(items: list[str | Path], store_dir: Path | str, base_fingerprint: Callable[[], str]) -> list[Path]:
    """The folders of `items`: each a folder, or `store:ID` (verified, and checked against the base's
    fingerprint). A bare name that is both a folder and a store ID is refused rather than guessed."""
    store = Store(store_dir)
    stored = None
    paths = []
    for item in map(str, items):
        if item.startswith(STORE_PREFIX):
            cid = item.removeprefix(STORE_PREFIX)
            paths.append(store.resolve(cid, base_fingerprint=base_fingerprint()))
            continue
        if stored is None:
            stored = {e["id"] for e in store.list()} if (Path(store_dir) / "index.json").is_file() else set()
        if Path(item).exists() and item in stored:
            raise ConfigError(
                f"input {item!r} is both a folder (./{item}) and a contribution in the store {store_dir}; "
                f"write ./{item} for the folder or {STORE_PREFIX}{item} for the stored one"
            )
        if item in stored:
            paths.append(store.resolve(item, base_fingerprint=base_fingerprint()))
        elif Path(item).exists():
            paths.append(Path(item))
        else:
            raise ConfigError(f"input {item!r} is neither a folder nor a contribution in the store {store_dir} (`cairn store list` shows what is there)")
    return paths


def check_inputs(inputs: list[Path], base_folder: str | Path, base_fingerprint: Callable[[], str], base_name: str) -> None:
    """Refuse an input made on another base (its manifest's fingerprint differs) or of another
    architecture (its tensors do not fit the base's shapes), naming it; note the inputs whose base
    cannot be verified. Reads only manifests and safetensors headers."""
    base = FolderWeights(base_folder)
    try:
        shapes = {name: base.meta(name)[1] for name in base.keys()}
    finally:
        base.close()
    for path in map(Path, inputs):
        if not path.is_dir():
            raise ModelError(f"{path}: no such folder (a PEFT adapter folder or a HF model folder was expected)")
        _check_shapes(path, shapes, base_name)
        recorded = (read_manifest(path) or {}).get("base_fingerprint")
        if recorded is None:
            log.warning(f"{path}: no Cairn manifest with its base's fingerprint; its shapes fit {base_name}, but its base could not be verified")
        elif recorded != base_fingerprint():
            raise ModelError(
                f"{path} was made on a base with fingerprint {str(recorded)[:12]}, not on {base_name} ({base_fingerprint()[:12]}); "
                "combine contributions of one base only"
            )


_LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


def _check_shapes(path: Path, shapes: dict[str, list[int]], base_name: str) -> None:
    if not (path / "adapter_config.json").is_file():
        weights = FolderWeights(path)
        try:
            theirs = {name: weights.meta(name)[1] for name in weights.keys()}
        finally:
            weights.close()
        for name, shape in theirs.items():
            if shapes.get(name) != shape:
                mine = f"has {shapes[name]}" if name in shapes else "has no such tensor"
                raise ModelError(f"{path}: tensor {name!r} has shape {shape}, {base_name} {mine}: it was made from another architecture")
        return
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}/adapter_config.json: cannot read ({exc})") from exc
    transposed = bool(isinstance(config, dict) and config.get("fan_in_fan_out"))
    header, _ = read_header(path / "adapter_model.safetensors")
    for key, entry in header.items():
        m = _LORA_KEY.fullmatch(key)
        if not m:
            continue  # read_lora names what it cannot combine
        weight = f"{m.group(1)}.weight"
        if weight not in shapes:
            raise ModelError(f"{path}: adapts module {m.group(1)!r}, which {base_name} does not have: it was made for another architecture")
        out_dim, in_dim = shapes[weight][::-1] if transposed else shapes[weight]
        shape = entry.get("shape") or []
        fits = len(shape) == 2 and (shape[1] == in_dim if m.group(2) == "A" else shape[0] == out_dim)
        if not fits:
            raise ModelError(
                f"{path}: {key} has shape {shape}, which does not fit {base_name}'s {m.group(1)} ({shapes[weight][0]} x {shapes[weight][1]}): "
                "it was made for another architecture"
            )


def default_store() -> Path:
    """The store that input IDs refer to when none is named: `$CAIRN_STORE`, else ./cairn-store."""
    return Path(os.environ.get("CAIRN_STORE") or "cairn-store")
