"""serve.store without Ray or torch: atomic writes, checksums, names, replace/delete, version."""

from __future__ import annotations

import json
import os

import time

import pytest

from bitdelta_core.errors import ArtifactCorruptError, InvalidInputError, ModelExistsError, UnknownModelError
from serve.store import ArtifactStore, StoreError, check_name, sha256_hex


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(tmp_path / "store")


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_put_get_load_roundtrip(store):
    e = store.put("sst2", b"abc", info={"num_labels": 2})
    assert e.sha256 == sha256_hex(b"abc") and e.bytes == 3
    got, data = store.load("sst2")
    assert data == b"abc" and got.sha256 == e.sha256 and got.info == {"num_labels": 2}
    assert store.get("sst2").created == e.created
    assert [x.name for x in store.list()] == ["sst2"] and "sst2" in store


def test_new_store_instance_sees_everything(store):
    store.put("a", b"1")
    store.put("b", b"22")
    again = ArtifactStore(store.root)
    assert [e.name for e in again.list()] == ["a", "b"]
    assert again.load("b")[1] == b"22"


def test_conflict_and_replace(store):
    store.put("m", b"v1")
    with pytest.raises(ModelExistsError, match="'m'"):
        store.put("m", b"v2")
    assert store.load("m")[1] == b"v1"
    store.put("m", b"v2", replace=True)
    assert store.load("m")[1] == b"v2"
    # the old object is garbage-collected: exactly one object remains
    assert len(list(store.objects.iterdir())) == 1


def test_delete_removes_files_and_unknown_raises(store):
    store.put("m", b"data")
    store.delete("m")
    assert "m" not in store and store.list() == []
    assert list(store.objects.iterdir()) == []
    with pytest.raises(UnknownModelError, match="'m'"):
        store.delete("m")
    with pytest.raises(UnknownModelError):
        store.load("m")


def test_shared_object_survives_one_delete(store):
    store.put("a", b"same")
    store.put("b", b"same")
    assert len(list(store.objects.iterdir())) == 1
    store.delete("a")
    assert store.load("b")[1] == b"same"


@pytest.mark.parametrize("name", ["../x", "..", ".hidden", "a/b", "a\\b", "", "x" * 65, "x" * 300,
                                  "caf\u00e9", "a b", "-lead", "a\x00b", "\u0430dmin", None, 5])
def test_bad_names_rejected_and_store_unchanged(store, name):
    store.put("ok", b"1")
    before = _files(store.root)
    with pytest.raises(InvalidInputError, match="invalid model name"):
        store.put(name, b"2")
    with pytest.raises(InvalidInputError):
        store.delete(name)
    assert _files(store.root) == before
    assert name not in store


@pytest.mark.parametrize("name", ["a", "A9", "sst2.v1_final-2", "x" * 64, "0"])
def test_good_names(name):
    assert check_name(name) == name


def test_checksum_mismatch_detected(store):
    e = store.put("m", b"original bytes")
    obj = store.objects / f"{e.sha256}.safetensors"
    obj.write_bytes(b"tampered bytes")
    with pytest.raises(StoreError, match="checksum") as ei:
        store.load("m")
    assert isinstance(ei.value, ArtifactCorruptError)
    obj.unlink()
    with pytest.raises(StoreError, match="missing"):
        store.load("m")


def test_corrupt_record_is_skipped_in_list(store):
    store.put("good", b"1")
    (store.models / "bad.json").write_text("{not json")
    assert [e.name for e in store.list()] == ["good"]
    with pytest.raises(StoreError, match="unreadable"):
        store.get("bad")


def test_version_changes_on_every_mutation(store):
    v0 = store.version()
    store.put("a", b"1")
    v1 = store.version()
    store.put("a", b"2", replace=True)
    v2 = store.version()
    store.delete("a")
    v3 = store.version()
    assert len({v0, v1, v2, v3}) == 4 or (v0 == v3 and len({v0, v1, v2}) == 3)
    assert v1 != v2  # a replacement is a new inode even within one mtime tick


def test_version_skips_the_scan_while_the_directory_is_unchanged(store, monkeypatch):
    store.put("a", b"1")
    old = time.time() - 10  # the last change is well in the past: the mtime can be trusted
    os.utime(store.models, (old, old))
    scans = []
    real = store._scan_version
    monkeypatch.setattr(store, "_scan_version", lambda: scans.append(1) or real())
    v1 = store.version()
    assert store.version() == v1 and store.version() == v1 and len(scans) == 1  # one stat each after the scan
    store.put("b", b"2")  # a change renames into models/: the directory's mtime moves
    v2 = store.version()
    assert v2 != v1 and len(scans) == 2
    assert store.version() == v2 and len(scans) == 3  # just changed (racy): scanned again, same answer
    other = type(store)(store.root)  # another replica's view sees the same signature
    assert other.version() == v2


def test_crash_leftovers_are_invisible_and_collected(store):
    store.put("a", b"1")
    # a crash after writing the object but before the record: an orphan object + a temp file
    orphan = store.objects / f"{sha256_hex(b'orphan')}.safetensors"
    orphan.write_bytes(b"orphan")
    stale = store.tmp / "put.x.tmp"
    stale.write_bytes(b"partial")
    os.utime(stale, (0, 0))
    assert [e.name for e in store.list()] == ["a"]
    assert store.gc() == 2
    assert not orphan.exists() and not stale.exists()
    assert store.load("a")[1] == b"1"


def test_failed_write_leaves_store_unchanged(store, monkeypatch):
    store.put("a", b"1")
    before = _files(store.root)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "link", boom)
    with pytest.raises(OSError, match="disk full"):
        store.put("b", b"2")
    monkeypatch.undo()
    assert _files(store.root) == before
    assert [e.name for e in store.list()] == ["a"]


def test_record_format(store):
    store.put("m", b"xyz", info={"labels": ["neg", "pos"]})
    rec = json.loads((store.models / "m.json").read_text())
    assert rec["format_version"] == 1 and rec["sha256"] == sha256_hex(b"xyz") and rec["bytes"] == 3


def test_not_a_store(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="not an artifact store"):
        ArtifactStore(tmp_path / "plain", create=False)
    s = ArtifactStore(tmp_path / "s")
    (s.root / "FORMAT").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(StoreError, match="99"):
        ArtifactStore(s.root)


def test_concurrent_puts_of_one_name_exactly_one_wins(store):
    import threading

    results = []

    def put(i):
        try:
            store.put("race", f"v{i}".encode())
            results.append(("ok", i))
        except ModelExistsError:
            results.append(("exists", i))

    threads = [threading.Thread(target=put, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    winners = [i for r, i in results if r == "ok"]
    assert len(results) == 8 and len(winners) == 1
    assert store.load("race")[1] == f"v{winners[0]}".encode()
    assert len(list(store.objects.iterdir())) == 1  # losers' objects were collected
