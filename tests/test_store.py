import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cairn.cli import main
from cairn.errors import DataError, ModelError
from cairn.io import atomic_dir, atomic_write_text
from cairn.store import Store, file_hashes, write_manifest


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


@pytest.mark.parametrize("bad", ["../escape", "a/b", "..", ".hidden", "", "x" * 81, "a b"])
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
