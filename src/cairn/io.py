"""Writing outputs safely: atomic files and folders (a reader sees the old version or the new, never half)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

import yaml

from cairn.errors import CairnError, ConfigError, DataError

log = logging.getLogger("cairn")


def _umask() -> int:
    """The process's umask: read from /proc where it can be (setting it to read it back, the only
    other way, races with threads creating files meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path | str, folder: bool = False) -> None:
    """Give a file or folder made by `tempfile` (always 0600 / 0700) the permissions the user's
    umask asks for, as `open` and `mkdir` would: a shared store or a served report stays readable."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def follow_umask_tree(folder: Path) -> None:
    """`follow_umask` for a folder and everything in it (some writers, safetensors among them,
    create their files 0600 whatever the umask)."""
    follow_umask(folder, folder=True)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            follow_umask(Path(root) / d, folder=True)
        for f in files:
            if not (Path(root) / f).is_symlink():
                follow_umask(Path(root) / f)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _owner() -> str:
    """`HOST-PID` for temporary names: a later command on this host can tell whether the process
    that made one is still running (on a shared disk, other hosts' temporaries are left alone)."""
    return f"{hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]}-{os.getpid()}"


def temp_dir(parent: Path, name: str) -> Path:
    """A new hidden folder `.NAME.HOST-PID-XXXX.tmp` in `parent`, with the umask's permissions."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.{_owner()}-", suffix=".tmp", dir=parent))
    follow_umask(tmp, folder=True)
    return tmp


_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[^.]+\.(tmp|old)")


def remove_stale_temps(parent: Path) -> list[Path]:
    """Delete the temporary folders and files in `parent` that a killed command left (their
    process is gone); log each, and return them."""
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.fullmatch(entry.name)
        if not m or m["host"] != _owner()[:6] or int(m["pid"]) == os.getpid() or _pid_alive(int(m["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        if not entry.exists():
            removed.append(entry)
            log.warning(f"removed {entry}, left unfinished by an interrupted command (process {m['pid']})")
    return removed


def read_yaml(path: str | Path):
    """A YAML file's data; every way it can fail is a ConfigError naming the file (and line)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from exc
    except RecursionError as exc:
        raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from exc
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        # PyYAML's constructors raise these for a value it cannot build as the date, number or
        # !!type it looks like or is tagged with: 2001-13-01, `!!int ''`, `!!bool maybe`, `!!timestamp x`
        raise ConfigError(
            f"{path}: not valid YAML (a value cannot be read as the date, number or !!type it looks like or is tagged with: "
            f"{type(exc).__name__}: {exc}); quote it to keep it a string"
        ) from exc
    return data


def read_json_object(path: Path | str, what: str, error: type[CairnError] = DataError) -> dict:
    """The JSON object in the file `path` (`what` it holds, for the message); every way it can fail
    is one `error` naming the file: unreadable, not JSON text, or not an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except ValueError as exc:  # a UnicodeDecodeError too
        raise error(f"{path}: not valid JSON ({exc})") from exc
    except RecursionError as exc:
        raise error(f"{path}: not valid JSON (nested too deeply)") from exc
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object ({what}), got {type(data).__name__}")
    return data


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_owner()}-", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise CairnError(f"{path}: the disk filled up while writing it; the previous version is intact") from exc
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


_MARGIN_BYTES = 64 * 2**20  # kept free beyond an output's size


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse to start writing `what` (about `needed` bytes) where the disk cannot hold it."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed + _MARGIN_BYTES:
        raise CairnError(
            f"not enough free disk for {what}: needs about {needed / 2**20:.0f} MB (+{_MARGIN_BYTES // 2**20} MB margin), "
            f"{free / 2**20:.0f} MB free at {folder}; free some space or write elsewhere"
        )


@contextlib.contextmanager
def atomic_dir(out: Path, needed: int = 0, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out` whole, on error it
    vanishes and `out` is untouched. `needed` (bytes) is checked against the free disk first.
    With `keep_existing` (a cache another process may fill with the same content at the same
    time: ranks of one launch, parallel sweeps), an `out` that exists by the end is kept and
    this copy dropped, so no process ever moves a folder another may be reading. Temporary
    folders that killed commands left beside `out` are removed first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent)
    if needed:
        check_free_space(out.parent, needed, str(out))
    tmp = temp_dir(out.parent, out.name)
    try:
        try:
            yield tmp
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise CairnError(f"{out}: the disk filled up while writing it; nothing was replaced (free some space and rerun)") from exc
            raise
        follow_umask_tree(tmp)
        if not out.exists():
            try:
                os.replace(tmp, out)
            except OSError as exc:  # another process put its `out` there since the check
                if not (keep_existing and exc.errno in (errno.ENOTEMPTY, errno.EEXIST)):
                    raise
        elif not keep_existing:
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.{_owner()}-", suffix=".old", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless another copy was kept
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolved(path: Path, flag: str = "--out") -> Path:
    """`path` made absolute with its links followed; a link loop is the user's error, not a traceback."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as exc:  # RuntimeError: Python 3.11's report of a symlink loop
        raise ConfigError(f"{flag} {path}: cannot follow its symbolic links ({exc}); remove the link or name another path") from None


def not_the_current_folder(out: Path, what: str, flag: str = "--out") -> Path:
    """`out` resolved, refused where it is the current folder or contains it: replacing it would
    delete the folder the command runs in (and cannot rename it away)."""
    here, target = Path.cwd().resolve(), resolved(out, flag)
    if target == here or target in here.parents:
        raise ConfigError(f"{flag} {out}: is {'the current folder' if target == here else 'a folder that contains the current one'}; name a new folder for {what}")
    return target


def check_output(out: Path | str, *, earlier: bool, overwrite: bool, what: str, flag: str = "--out") -> None:
    """Refuse to write `what` at `out` where that would destroy files Cairn did not write there.

    An absent or empty `out` is written; an `earlier` output of the same command is replaced (and
    the log says so); anything else only with `overwrite`. The current folder, and any folder that
    contains it, are never replaced: the replacement renames `out`, which cannot move the folder a
    command runs in.
    """
    out = Path(out)
    target = not_the_current_folder(out, what, flag)
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CairnError(f"{flag} {out}: cannot write in {parent} (permission denied); choose a folder you can write to")
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    if earlier:
        log.info(f"replacing the earlier {what} at {out}")
        return
    if not overwrite:
        kind = "a file" if out.is_file() else "a symbolic link" if out.is_symlink() else "a folder that is not an earlier " + what
        raise ConfigError(f"{flag} {out}: exists and is {kind}; choose another {flag}, or pass --overwrite to replace it (its contents will be deleted)")
    log.info(f"--overwrite: replacing {out}")


@contextlib.contextmanager
def exclusive(folder: Path | str, what: str) -> Iterator[None]:
    """Hold `folder/.lock` while `what` writes there; a second process is refused at once, before it
    starts, rather than finding files it relies on replaced half-way. The lock is the kernel's
    (flock), so a killed holder releases it."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    resolved(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {folder}: exists and is not a folder; choose another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CairnError(f"{folder}: cannot create the folder ({exc.strerror or exc})") from exc
    lock = FileLock(str(folder / ".lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise CairnError(f"{folder} is in use by another {what} (it holds {folder / '.lock'}); wait for it to finish, or write elsewhere") from None
    try:
        yield
    finally:
        lock.release()
