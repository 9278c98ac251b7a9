import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cairn.cli import main
from cairn.errors import DataError, ModelError
from cairn.io import atomic_dir, atomic_write_text
from cairn.store import Store
from cairn.manifest import file_hashes, verify_files, write_manifest


def fake_contribution(folder: Path, task: str = "people", payload: bytes = b"weights", base_fp: str = "ab" * 32) -> Path:
    """A contribution folder with a real manifest over small files."""
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(payload)
    (folder / "adapter_config.json").write_text("{}")
    write_manifest(folder, {"schema": 1, "kind": "adapter", "base": "tiny-random", "base_fingerprint": base_fp,
                            "task": task, "method": "lora", "files": file_hashes(folder)})
    return folder


def test_add_list_show_and_verify(tmp_path):
    store = Store(tmp_path / "store")
    entry = store.add(fake_contribution(tmp_path / "c"), name="people-a")
    assert entry["id"] == "people-a" and [e["id"] for e in store.list()] == ["people-a"]
    assert store.show("people-a")["task"] == "people"
    assert store.verify() == {"people-a": []}
    assert store.add(tmp_path / "c", name="people-a") == entry  # same files: idempotent


def test_verify_catches_a_flipped_byte(tmp_path):
    store = Store(tmp_path / "store")
    store.add(fake_contribution(tmp_path / "c"), name="x")
    weights = tmp_path / "store" / "items" / "x" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[0] ^= 1
    weights.write_bytes(bytes(data))
    problems = store.verify("x")["x"]
    assert len(problems) == 1 and "adapter_model.safetensors: sha256" in problems[0]
    with pytest.raises(DataError, match="failed verification"):
        store.resolve("x")


def test_tampered_input_is_refused(tmp_path):
    folder = fake_contribution(tmp_path / "c")
    (folder / "adapter_model.safetensors").write_bytes(b"other")
    with pytest.raises(DataError, match="files do not match cairn.json"):
        Store(tmp_path / "store").add(folder)
    with pytest.raises(DataError, match="not a Cairn contribution"):
        Store(tmp_path / "store").add(tmp_path)


def test_fingerprint_mismatch_is_refused(tmp_path):
    store = Store(tmp_path / "store")
    store.add(fake_contribution(tmp_path / "c"), name="x")
    assert store.resolve("x", base_fingerprint="ab" * 32) == tmp_path / "store" / "items" / "x"
    with pytest.raises(ModelError, match="made on a base with fingerprint abababababab"):
        store.resolve("x", base_fingerprint="cd" * 32)


@pytest.mark.parametrize("bad", ["../escape", "a/b", "..", ".hidden", "", "x" * 81, "a b", "données"])
def test_ids_cannot_escape_the_store(tmp_path, bad):
    store = Store(tmp_path / "store")
    with pytest.raises(DataError, match="invalid contribution id"):
        store.add(fake_contribution(tmp_path / "c"), name=bad)
    with pytest.raises(DataError, match="invalid contribution id"):
        store.path(bad)
    assert not (tmp_path / "escape").exists()


def test_a_taken_id_with_other_files_is_refused(tmp_path):
    store = Store(tmp_path / "store")
    store.add(fake_contribution(tmp_path / "a"), name="x")
    with pytest.raises(DataError, match="taken by different files"):
        store.add(fake_contribution(tmp_path / "b", payload=b"different"), name="x")


def test_eight_concurrent_adds_are_all_recorded(tmp_path):
    folders = [fake_contribution(tmp_path / f"c{i}", task=f"t{i}", payload=bytes([i]) * 1000) for i in range(8)]
    env = {**os.environ, "CAIRN_STORE": str(tmp_path / "store")}
    procs = [subprocess.Popen([sys.executable, "-m", "cairn.cli", "store", "add", str(f)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for f in folders]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    entries = Store(tmp_path / "store").list()
    assert sorted(e["task"] for e in entries) == [f"t{i}" for i in range(8)]
    assert all(not problems for problems in Store(tmp_path / "store").verify().values())


def test_cli_verify_exits_non_zero_on_corruption(tmp_path, capsys):
    root = str(tmp_path / "store")
    assert main(["store", "--store", root, "add", str(fake_contribution(tmp_path / "c")), "--name", "x"]) == 0
    assert main(["store", "--store", root, "verify"]) == 0
    assert "x: ok" in capsys.readouterr().out
    (tmp_path / "store" / "items" / "x" / "adapter_config.json").write_text('{"r": 1}')
    assert main(["store", "--store", root, "verify"]) == 3
    assert main(["store", "--store", root, "show", "x"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["task"] == "people"


def test_atomic_writes_leave_the_previous_version_on_a_crash(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("crash mid-write")
    assert not (tmp_path / "folder").exists() and target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_folder_another_process_filled_meanwhile_is_kept_or_replaced_as_asked(tmp_path):
    out = tmp_path / "model"
    for keep, winner in ((True, "theirs"), (False, "ours")):
        with atomic_dir(out, keep_existing=keep) as tmp:
            (tmp / "w").write_text("ours")
            out.mkdir(exist_ok=True)  # another rank finished the same folder first
            (out / "w").write_text("theirs")
        assert (out / "w").read_text() == winner
        assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary left behind
        shutil.rmtree(out)


def test_a_full_disk_is_refused_before_writing_and_mid_write_keeps_the_old_version(tmp_path, monkeypatch, tiny):
    import errno
    import os
    import shutil
    from collections import namedtuple

    from cairn.errors import CairnError
    from cairn.models import save_model
    from cairn.io import atomic_write_text

    model, tokenizer = tiny
    out = tmp_path / "model"
    save_model(model, tokenizer, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(CairnError, match="not enough free disk"):
        save_model(model, tokenizer, out)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    target = tmp_path / "results.json"
    atomic_write_text(target, "old")

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    def half_written(self, folder, **_):
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CairnError, match="disk filled up"):
        atomic_write_text(target, "new")
    monkeypatch.setattr(type(model), "save_pretrained", half_written)
    with pytest.raises(CairnError, match="disk filled up"):
        save_model(model, tokenizer, out)
    monkeypatch.undo()
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("index", ["{not json", "[]", '{"entries": [1]}', '{"entries": {"x": {"id": "x"}}}'])
def test_a_damaged_index_is_a_data_error(tmp_path, index):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "index.json").write_text(index)
    with pytest.raises(DataError, match=r"index\.json: (cannot read|damaged) the store index|index\.json: damaged store index"):
        Store(tmp_path / "store").list()


def test_manifests_that_are_not_objects_or_lack_a_files_mapping(tmp_path):
    folder = fake_contribution(tmp_path / "c")
    (folder / "cairn.json").write_text("[1, 2]")
    with pytest.raises(DataError, match=r"cairn\.json: expected a JSON object \(a Cairn manifest\), got list"):
        Store(tmp_path / "store").add(folder)
    (folder / "cairn.json").write_text(json.dumps({"base_fingerprint": "ab", "task": "t", "method": "lora", "files": ["x"]}))
    with pytest.raises(DataError, match="'files' is not a mapping of file name to sha256"):
        Store(tmp_path / "store").add(folder)
    (folder / "cairn.json").write_text(json.dumps({"base_fingerprint": 1, "task": "t", "method": "lora", "files": {}}))
    with pytest.raises(DataError, match="field 'base_fingerprint' must be a string, got int"):
        Store(tmp_path / "store").add(folder)


def test_verify_reports_a_manifest_without_files(tmp_path):
    store = Store(tmp_path / "store")
    store.add(fake_contribution(tmp_path / "c"), name="x")
    manifest = tmp_path / "store" / "items" / "x" / "cairn.json"
    manifest.write_text(json.dumps({k: v for k, v in json.loads(manifest.read_text()).items() if k != "files"}))
    assert store.verify() == {"x": ["cairn.json: 'files' is not a mapping of file name to sha256"]}


def test_a_store_where_a_file_is_refused(tmp_path):
    (tmp_path / "store").write_text("not a folder")
    with pytest.raises(DataError, match="cannot create the store there"):
        Store(tmp_path / "store").add(fake_contribution(tmp_path / "c"))



# --- a store add never copies what lies outside the contribution, and never misreports ---


def _snapshot(root: Path, skip: Path | None = None) -> dict:
    """Every entry under `root` (not following links): file bytes, link targets and modes."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder) / name
            if skip is not None and (p == skip or skip in p.parents):
                continue
            st = p.lstat()
            content = os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None
            out[str(p.relative_to(root))] = (st.st_mode, content)
    return out


@pytest.fixture
def cairn_warnings():
    """The messages logged to logging.getLogger("cairn") during the test (the CLI stops it propagating)."""
    import logging

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("cairn")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_a_link_to_a_file_outside_the_contribution_is_refused_naming_the_link_and_its_target(tmp_path, capsys):
    secrets = tmp_path / "home" / "secrets"
    secrets.parent.mkdir()
    secrets.write_bytes(b"password=hunter2")
    folder = fake_contribution(tmp_path / "c")
    (folder / "extra.bin").symlink_to(secrets)  # listed in the manifest, as hashing through the link would list it
    manifest = json.loads((folder / "cairn.json").read_text())
    write_manifest(folder, {**manifest, "files": {**manifest["files"], "extra.bin": hashlib.sha256(secrets.read_bytes()).hexdigest()}})
    before = _snapshot(tmp_path, skip=tmp_path / "store")
    with pytest.raises(DataError, match=r"c/extra\.bin: symbolic link to .*home/secrets, outside .*c; copy the file"):
        Store(tmp_path / "store").add(folder, name="x")
    assert main(["store", "--store", str(tmp_path / "store"), "add", str(folder)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "extra.bin: symbolic link to" in err and "Traceback" not in err
    assert _snapshot(tmp_path, skip=tmp_path / "store") == before
    (folder / "extra.bin").unlink()
    write_manifest(folder, manifest)
    (folder / "sub").mkdir()
    (folder / "sub" / "home").symlink_to("../../home")  # a relative link to a folder outside
    before_second = _snapshot(tmp_path, skip=tmp_path / "store")
    with pytest.raises(DataError, match=r"sub/home: symbolic link to \.\./\.\./home, outside"):
        Store(tmp_path / "store").add(folder, name="x")
    assert _snapshot(tmp_path, skip=tmp_path / "store") == before_second
    assert not any(b"hunter2" in p.read_bytes() for p in (tmp_path / "store").rglob("*") if p.is_file())
    assert not [p for p in (tmp_path / "store").rglob("*") if p.parent.name == "items"]


def test_a_link_planted_in_a_stored_item_fails_its_verification(tmp_path):
    (tmp_path / "secrets").write_text("password")
    store = Store(tmp_path / "store")
    store.add(fake_contribution(tmp_path / "c"), name="x")
    (tmp_path / "store" / "items" / "x" / "adapter_config.json").unlink()
    (tmp_path / "store" / "items" / "x" / "adapter_config.json").symlink_to(tmp_path / "secrets")
    [problem] = store.verify("x")["x"]
    assert "adapter_config.json: symbolic link to" in problem and "outside" in problem
    with pytest.raises(DataError, match="failed verification"):
        store.resolve("x")


def test_a_link_to_a_file_inside_the_contribution_is_stored_as_a_copy_of_that_file(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "sub").mkdir()
    (folder / "sub" / "config.json").symlink_to("../adapter_model.safetensors")
    files = file_hashes(folder)
    assert files["sub/config.json"] == files["adapter_model.safetensors"]
    write_manifest(folder, {"base_fingerprint": "ab" * 32, "task": "t", "method": "lora", "files": files})
    before = _snapshot(tmp_path)
    store = Store(tmp_path / "store")
    store.add(folder, name="x")
    copy = tmp_path / "store" / "items" / "x" / "sub" / "config.json"
    assert not copy.is_symlink() and copy.read_bytes() == b"weights"
    assert store.verify() == {"x": []}
    assert _snapshot(tmp_path, skip=tmp_path / "store") == before


@pytest.mark.parametrize("links", [{"loop": "loop"}, {"a": "b", "b": "a"}, {"sub/up": ".."}, {"sub/here": "."}],
                         ids=["self", "pair", "to-the-root", "to-its-folder"])
def test_a_link_loop_or_a_link_to_a_folder_is_a_data_error_not_a_traceback(tmp_path, links, capsys):
    folder = fake_contribution(tmp_path / "c")
    files = json.loads((folder / "cairn.json").read_text())["files"]
    for name, target in links.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).symlink_to(target)
    expected = r"symbolic link (loop|to the folder)"
    with pytest.raises(DataError, match=expected):
        Store(tmp_path / "store").add(folder)
    with pytest.raises(DataError, match=expected):
        file_hashes(folder)
    [problem] = verify_files(folder, files)
    assert re.search(expected, problem)
    assert main(["store", "--store", str(tmp_path / "store"), "add", str(folder)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(expected, err)
    assert not (tmp_path / "store" / "items").exists() or not list((tmp_path / "store" / "items").iterdir())


def test_a_named_pipe_in_a_contribution_is_refused_rather_than_read_forever(tmp_path):
    folder = fake_contribution(tmp_path / "c")
    os.mkfifo(folder / "pipe")
    with pytest.raises(DataError, match=r"c/pipe: not a regular file or folder"):
        Store(tmp_path / "store").add(folder)


def test_verify_and_resolve_catch_weights_and_manifest_hashes_edited_together(tmp_path, capsys):
    store = Store(tmp_path / "store")
    store.add(fake_contribution(tmp_path / "c"), name="x")
    item = tmp_path / "store" / "items" / "x"
    (item / "adapter_model.safetensors").write_bytes(b"swapped weights")
    manifest = json.loads((item / "cairn.json").read_text())
    write_manifest(item, {**manifest, "files": file_hashes(item)})
    [problem] = store.verify("x")["x"]
    assert "cairn.json: its 'files' digest" in problem and "recorded in index.json" in problem
    with pytest.raises(DataError, match="failed verification.*index.json"):
        store.resolve("x")
    assert main(["store", "--store", str(tmp_path / "store"), "verify"]) == 3
    assert "x: " in capsys.readouterr().out


def test_verify_catches_a_manifest_moved_to_another_base_model(tmp_path):
    store = Store(tmp_path / "store")
    store.add(fake_contribution(tmp_path / "c"), name="x")
    item = tmp_path / "store" / "items" / "x"
    write_manifest(item, {**json.loads((item / "cairn.json").read_text()), "base_fingerprint": "cd" * 32})
    with pytest.raises(DataError, match="base_fingerprint 'cdcd.*recorded in index.json"):
        store.resolve("x", base_fingerprint="cd" * 32)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_an_add_removes_the_temporaries_killed_adds_left_and_says_so(tmp_path, cairn_warnings):
    from cairn.io import _owner

    host = _owner().split("-")[0]
    items = tmp_path / "store" / "items"
    dead = items / f".x.{host}-{_dead_pid()}-k1ll3d.tmp"
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "adapter_model.safetensors").write_bytes(b"half a copy")
    alive = items / f".y.{host}-{os.getppid()}-st1ll.tmp"  # a running process's copy is left alone
    alive.mkdir()
    folder = fake_contribution(tmp_path / "c")
    before = _snapshot(tmp_path, skip=tmp_path / "store")
    Store(tmp_path / "store").add(folder, name="x")
    assert not dead.exists() and alive.is_dir()
    assert sorted(p.name for p in items.iterdir()) == [alive.name, "x"]
    assert any(str(dead) in m and "interrupted" in m for m in cairn_warnings)
    assert Store(tmp_path / "store").verify() == {"x": []}
    assert _snapshot(tmp_path, skip=tmp_path / "store") == before


def _unindex(store_root: Path, cid: str) -> None:
    """What a kill between the rename and the index write leaves: items/ID without its entry."""
    index = json.loads((store_root / "index.json").read_text())
    del index["entries"][cid]
    (store_root / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("name", ["x", None])
def test_an_unindexed_item_holding_the_same_contribution_is_indexed_as_it_is(tmp_path, name, cairn_warnings):
    store = Store(tmp_path / "store")
    folder = fake_contribution(tmp_path / "c")
    entry = store.add(folder, name=name)
    _unindex(tmp_path / "store", entry["id"])
    assert store.list() == []
    item = tmp_path / "store" / "items" / entry["id"]
    inode = item.stat().st_ino
    before = _snapshot(tmp_path, skip=tmp_path / "store")
    assert store.add(folder, name=name) == entry
    assert item.stat().st_ino == inode  # the folder already there was kept
    assert store.verify() == {entry["id"]: []}
    assert any(str(item) in m and "indexed as it is" in m for m in cairn_warnings)
    assert [p.name for p in (tmp_path / "store" / "items").iterdir()] == [entry["id"]]
    assert _snapshot(tmp_path, skip=tmp_path / "store") == before


@pytest.mark.parametrize("orphan", ["other contribution", "half deleted", "a file"])
def test_an_unindexed_item_with_other_files_is_replaced_by_the_contribution_added(tmp_path, orphan, cairn_warnings):
    store = Store(tmp_path / "store")
    item = tmp_path / "store" / "items" / "x"
    if orphan == "other contribution":
        store.add(fake_contribution(tmp_path / "other", payload=b"other weights"), name="x")
        _unindex(tmp_path / "store", "x")
    elif orphan == "half deleted":
        (item / "sub").mkdir(parents=True)
        (item / "sub" / "stray.bin").write_bytes(b"stray")
    else:
        item.parent.mkdir(parents=True)
        item.write_text("stray")
    folder = fake_contribution(tmp_path / "c")
    before = _snapshot(tmp_path, skip=tmp_path / "store")
    entry = store.add(folder, name="x")
    assert entry["id"] == "x" and store.verify() == {"x": []}
    assert (item / "adapter_model.safetensors").read_bytes() == b"weights" and not (item / "sub").exists()
    assert any(str(item) in m and "replaced" in m for m in cairn_warnings)
    assert [p.name for p in (tmp_path / "store" / "items").iterdir()] == ["x"]
    assert _snapshot(tmp_path, skip=tmp_path / "store") == before


@pytest.mark.parametrize("task, start", [("my task", "my_task-lora-"), ("données", "donnees-lora-"), ("Ｆｕｌｌ ｗｉｄｔｈ", "Full_width-lora-"),
                                         ("任务", "lora-"), ("a/b:c", "a_b_c-lora-"), (".hidden", "hidden-lora-"), ("t" * 200, "ttt")])
def test_the_id_derived_from_any_task_name_is_a_valid_id_keeping_the_hash(tmp_path, task, start):
    store = Store(tmp_path / "store")
    folder = fake_contribution(tmp_path / "c", task=task)
    entry = store.add(folder)
    digest = hashlib.sha256(json.dumps(json.loads((folder / "cairn.json").read_text())["files"], sort_keys=True).encode()).hexdigest()
    assert re.fullmatch(Store.ID_PATTERN, entry["id"]) and len(entry["id"]) <= 80
    assert entry["id"].startswith(start) and entry["id"].endswith("-" + digest[:10])
    assert entry["task"] == task and store.show(entry["id"])["task"] == task and store.verify() == {entry["id"]: []}


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_everything_the_store_writes_follows_the_umask_not_the_sources_modes(tmp_path, umask):
    folder = fake_contribution(tmp_path / "c")
    (folder / "sub").mkdir()
    (folder / "sub" / "tokenizer.json").write_text("{}")
    write_manifest(folder, {**json.loads((folder / "cairn.json").read_text()), "files": file_hashes(folder)})
    for p in [folder, *folder.rglob("*")]:
        p.chmod(0o700 if p.is_dir() else 0o600)  # as safetensors and mkdtemp leave them
    old = os.umask(umask)
    try:
        Store(tmp_path / "store").add(folder, name="x")
    finally:
        os.umask(old)
    store = tmp_path / "store"
    written = [store, store / "items", store / "index.json", *(store / "items").rglob("*")]
    assert len(written) == 9  # store, items, index.json, items/x and its 3 files, sub and its file
    for p in written:
        assert stat.S_IMODE(p.stat().st_mode) == (0o777 if p.is_dir() else 0o666) & ~umask, p
    if (store / ".lock").exists():
        assert stat.S_IMODE((store / ".lock").stat().st_mode) & ~(0o666 & ~umask) == 0


def _plain_peft_adapter(tiny, folder: Path, r: int = 4) -> Path:
    """A LoRA adapter saved by PEFT alone, as a party without Cairn makes one: no cairn.json."""
    import copy

    from peft import LoraConfig, get_peft_model

    model, _ = tiny
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=r, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(folder)
    return folder


def test_a_plain_peft_adapter_enters_the_store_with_the_base_named_and_gets_a_manifest_there(tiny, tmp_path, capsys):
    folder = _plain_peft_adapter(tiny, tmp_path / "theirs")
    before = sorted(p.name for p in folder.iterdir())
    assert main(["store", "--store", str(tmp_path / "s"), "add", str(folder)]) == 3
    assert "cairn store add PATH --base BASE" in capsys.readouterr().err  # says how to add one made elsewhere
    assert main(["store", "--store", str(tmp_path / "s"), "add", str(folder), "--base", "tiny-random", "--task", "their-task"]) == 0
    entry = Store(tmp_path / "s").list()[0]
    assert (entry["task"], entry["method"], entry["kind"], entry["base"]) == ("their-task", "lora", "adapter", "tiny-random")
    assert entry["base_fingerprint"] == tiny[0].cairn_fingerprint
    stored = Store(tmp_path / "s").show(entry["id"])
    assert stored["import"]["base_named_by"] == "--base" and Store(tmp_path / "s").verify() == {entry["id"]: []}
    assert sorted(p.name for p in folder.iterdir()) == before  # the owner's folder is left as it was

    from cairn.contributions import load

    assert load(str(Store(tmp_path / "s").path(entry["id"])))[0].cairn_fingerprint == tiny[0].cairn_fingerprint


def test_an_adapter_made_elsewhere_that_does_not_fit_the_named_base_or_already_has_a_manifest_is_refused(tiny, tmp_path, capsys):
    from cairn import api
    from cairn.data import Example, Task
    from cairn.errors import ConfigError

    folder = _plain_peft_adapter(tiny, tmp_path / "theirs")
    header = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**header, "peft_type": "IA3"}))
    with pytest.raises(ModelError, match="a IA3 adapter; Cairn combines LoRA adapters only"):
        api.store_add(folder, store=tmp_path / "s", base="tiny-random")
    task = Task("t", "exact", {"train": [Example("q", "a")] * 4})
    api.train(task, tmp_path / "ours", base="tiny-random", epochs=1, batch_size=4, progress=False)
    with pytest.raises(ConfigError, match="has a Cairn manifest, which names its base; add it without --base"):
        api.store_add(tmp_path / "ours", store=tmp_path / "s", base="tiny-random")
    with pytest.raises(ConfigError, match="--task names a contribution made elsewhere"):
        api.store_add(tmp_path / "ours", store=tmp_path / "s", task="x")
    assert not (tmp_path / "s" / "index.json").exists()
