"""A run folder (`cairn run --out DIR`): which run it belongs to, and what replacing it removes.

`run.json` records the config a folder's run was started with, so an interrupted run is told
from another run's folder before anything is written. The same config resumes (its cache holds
the work done); another config, or a folder that is not a run's, is refused unless the user asks
for `overwrite`, which removes every earlier output (results, CSVs, stage files, plots) but keeps
`cache/`: its entries are keyed by their content, so no other config can misread them.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from cairn.errors import ConfigError, DataError
from cairn.io import atomic_write_json, not_the_current_folder

log = logging.getLogger("cairn")
RUN_FILE = "run.json"
KEPT = ("cache", ".lock")


def identity(config: dict) -> dict:
    """What makes two runs the same run: the whole config except where it is written."""
    return {k: v for k, v in config.items() if k != "out"}


def recorded_config(out: Path) -> dict | None:
    """The config the run in `out` was started with (run.json, else results.json), or None."""
    for name, key in ((RUN_FILE, "config"), ("results.json", "config")):
        path = out / name
        if path.is_file():
            try:
                config = json.loads(path.read_text(encoding="utf-8")).get(key)
            except (OSError, ValueError, AttributeError) as exc:
                raise DataError(f"{path}: cannot read the run's record ({exc}); move the folder aside, or pass --overwrite") from exc
            if isinstance(config, dict):
                return config
    return None


def check(out: Path | str, config: dict, *, overwrite: bool = False) -> str:
    """What claiming `out` for the run of `config` would do, writing nothing: "start" (a new or
    empty folder), "resume" (this config's run), "replace" (another run's folder, or one that is
    not a run's, with `overwrite`); refused otherwise (see the module's docstring)."""
    out = Path(out)
    not_the_current_folder(out, "the run")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder; choose another --out")
    entries = [p for p in out.iterdir() if p.name not in KEPT] if out.is_dir() else []
    if not entries:
        return "start"
    recorded = recorded_config(out)
    if recorded is None and not overwrite:
        raise ConfigError(f"--out {out}: exists and is not a Cairn run folder (no {RUN_FILE} or results.json); choose another --out, or pass --overwrite to replace its contents")
    if recorded is not None and identity(recorded) != identity(config) and not overwrite:
        changed = sorted(k for k in set(identity(recorded)) | set(identity(config)) if recorded.get(k) != config.get(k))
        raise ConfigError(
            f"--out {out}: holds the run of another config (differs in: {', '.join(changed)}); "
            "choose another --out, or pass --overwrite to replace that run's results"
        )
    return "resume" if recorded is not None and identity(recorded) == identity(config) else "replace"


def claim(out: Path | str, config: dict, *, overwrite: bool = False) -> None:
    """Make `out` the folder of the run of `config`, or refuse (see the module's docstring)."""
    out = Path(out)
    if check(out, config, overwrite=overwrite) == "replace":
        ours = recorded_config(out) is not None
        keep = KEPT if ours else (".lock",)  # a cache/ of a folder that is not a run's is not ours
        for entry in (p for p in out.iterdir() if p.name not in keep):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        log.info(f"--overwrite: removed the earlier contents of {out}" + (" (kept cache/)" if ours else ""))
    atomic_write_json(out / RUN_FILE, {"schema": 1, "config": config})
