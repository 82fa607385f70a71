"""serve.reconcile without Ray or torch: the pool follows the store (load, replace, drop, failures)."""

from __future__ import annotations

import pytest

from bitdelta_core.errors import ArtifactCorruptError, UnknownModelError
from serve.reconcile import Reconciler
from serve.store import ArtifactStore


class FakePool:
    """Records what is served; artifacts starting with b"bad" fail to register."""

    def __init__(self):
        self.served: dict[str, bytes] = {}
        self.calls: list[tuple[str, str]] = []

    def register(self, name, data, *, replace=False):
        self.calls.append(("register", name))
        if data.startswith(b"bad"):
            raise ArtifactCorruptError(f"{name}: not a delta")
        if name in self.served and not replace:
            raise AssertionError("the reconciler always replaces")
        self.served[name] = data

    def unregister(self, name):
        self.calls.append(("unregister", name))
        if name not in self.served:
            raise UnknownModelError(name)
        del self.served[name]


@pytest.fixture
def env(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    pool = FakePool()
    events = []
    rec = Reconciler(store, pool, on_change=lambda action, s: events.append(action))
    return store, pool, rec, events


def test_new_replaced_and_deleted_models_follow_the_store(env):
    store, pool, rec, events = env
    store.put("a", b"a1")
    store.put("b", b"b1")
    assert rec.sync() is True
    assert pool.served == {"a": b"a1", "b": b"b1"} and events == ["load", "load"]
    store.put("a", b"a2", replace=True)
    store.delete("b")
    assert rec.stale()
    assert rec.sync() is True
    assert pool.served == {"a": b"a2"}
    assert sorted(events) == ["drop", "load", "load", "load"]
    assert rec.loaded == {"a": store.get("a").sha256}
    assert rec.created == {"a": store.get("a").created}  # the record's time: the same on every replica


def test_unchanged_store_does_nothing(env):
    store, pool, rec, events = env
    store.put("a", b"a1")
    rec.sync()
    calls = list(pool.calls)
    assert not rec.stale()
    assert rec.sync() is False and pool.calls == calls


def test_a_failing_artifact_is_not_retried_until_it_changes(env):
    store, pool, rec, events = env
    store.put("x", b"bad1")
    rec.sync()
    assert "x" not in pool.served and rec.failed == {"x": store.get("x").sha256} and events == ["error"]
    store.put("y", b"y1")  # another change: x (same sha) is not tried again
    rec.sync()
    assert pool.calls.count(("register", "x")) == 1 and pool.served == {"y": b"y1"}
    store.put("x", b"x2", replace=True)  # a new version is tried, and served
    rec.sync()
    assert pool.served["x"] == b"x2" and "x" not in rec.failed


def test_a_failing_replacement_stops_serving_the_old_version(env):
    store, pool, rec, events = env
    store.put("m", b"good")
    rec.sync()
    store.put("m", b"bad-new", replace=True)
    rec.sync()
    assert "m" not in pool.served and "m" not in rec.loaded and "m" in rec.failed


def test_mark_loaded_and_forget(env):
    store, pool, rec, events = env
    e = store.put("m", b"v1")
    pool.register("m", b"v1")
    rec.mark_loaded("m", e.sha256, e.created)
    rec.sync()
    assert pool.calls.count(("register", "m")) == 1  # already served at that sha: not loaded again
    store.delete("m")
    rec.forget("m")
    assert "m" not in pool.served and rec.loaded == {}
    rec.sync()
    assert pool.calls.count(("unregister", "m")) == 1


def test_a_second_reconciler_sees_changes_made_through_the_first(tmp_path):
    store1 = ArtifactStore(tmp_path / "s")
    store2 = ArtifactStore(tmp_path / "s")
    p1, p2 = FakePool(), FakePool()
    r1, r2 = Reconciler(store1, p1), Reconciler(store2, p2)
    store1.put("a", b"1")
    r1.sync()
    r2.sync()
    assert p2.served == {"a": b"1"}
    store1.delete("a")
    r1.forget("a")
    assert r2.stale() and r2.sync() and p2.served == {}
