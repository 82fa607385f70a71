"""Persistence and replica consistency over real HTTP (one Ray session for the module).

* restart: the whole application is torn down and deployed again (new ingress and engine
  processes) over the same store; everything registered before is served.
* two engine replicas: a registration, replacement or deletion made through one request (or
  written into the shared store by someone else, e.g. a replica on another node) is seen by
  both replicas on their next request. The answering replica is read from the
  ``x-bitdelta-replica`` header, and every loop is bounded.
"""

from __future__ import annotations

import math

import pytest
from ray import serve

from bitdelta_core.apply import apply
from bitdelta_core.compress import compress
from serve import run
from serve.app import build_app
from serve.config import ServeConfig
from serve.store import ArtifactStore
from serve_helpers import ADMIN, AUTH, client, finetune, free_port, reference_predictions, save_base, texts, tiny_tokenizer

pytestmark = pytest.mark.slow

INPUTS = texts(3, seed=7)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_replicas")
    base = save_base(root / "base")
    arts, files = {}, {}
    for i, (name, labels) in enumerate({"a": ["neg", "pos"], "b": ["x", "y", "z"], "c": ["p", "q"]}.items()):
        arts[name] = compress(base, finetune(base, root / f"ft_{name}", labels, seed=20 + i), progress=False)
        files[name] = root / f"{name}.safetensors"
        arts[name].save(files[name])
    tok = tiny_tokenizer()
    expected = {}
    for name, art in arts.items():
        model = apply(str(base), art)
        expected[name] = reference_predictions(model, tok, INPUTS, art.id2label())
    cfg = ServeConfig(base=str(base), store=str(root / "store"), admin_token=ADMIN, port=free_port(),
                      num_replicas=1, replica_num_cpus=0.25, max_wait_ms=2)
    url = run.start(cfg, ray_num_cpus=2, wait_s=240)
    with client(url) as c:
        yield {"cfg": cfg, "url": url, "c": c, "files": files, "expected": expected, "store": root / "store"}
    run.stop()


def _classify(c, name):
    return c.post("/v1/classify", json={"model": name, "inputs": INPUTS})


def _check(r, expected):
    assert r.status_code == 200, r.text
    for g, w in zip(r.json()["predictions"], expected):
        assert g["label"] == w["label"] and math.isclose(g["score"], w["score"], abs_tol=1e-4)


def _on_every_replica(c, name, check, replicas=2, max_requests=60, concurrency=4):
    """Send requests until ``replicas`` distinct replicas answered; ``check`` every answer.

    Requests go out ``concurrency`` at a time: Serve's router balances on queue lengths, and
    strictly one-at-a-time requests (every queue empty) may all land on the same replica."""
    from concurrent.futures import ThreadPoolExecutor

    seen = set()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(max_requests // concurrency):
            for r in pool.map(lambda _: _classify(c, name), range(concurrency)):
                check(r)
                seen.add(r.headers.get("x-bitdelta-replica") or r.json().get("replica"))
            if len(seen - {None}) >= replicas:
                return seen
    raise AssertionError(f"only replicas {seen} answered in {max_requests} requests")


def _register(c, name, path, replace=False):
    return c.post("/v1/models", data={"name": name, "replace": str(replace).lower()},
                  files={"file": ("d.safetensors", path.read_bytes())}, headers=AUTH)


def test_restart_restores_the_store_and_two_replicas_serve_it(env):
    c = env["c"]
    assert _register(c, "a", env["files"]["a"]).status_code == 201
    _check(_classify(c, "a"), env["expected"]["a"])
    # restart: tear the application down (all its processes) and deploy it again, now with two
    # engine replicas, over the same store directory
    serve.delete(run.APP_NAME)
    cfg2 = env["cfg"].model_copy(update={"num_replicas": 2})
    serve.run(build_app(cfg2.to_args()), name=run.APP_NAME, route_prefix="/", blocking=False)
    run.wait_ready(env["url"], timeout_s=180)
    assert c.get("/healthz").json() == {"status": "ok", "models": 1, "replicas": 2}
    assert [m["name"] for m in c.get("/v1/models").json()["models"]] == ["a"]
    _on_every_replica(c, "a", lambda r: _check(r, env["expected"]["a"]))
    # a model's description is the same whichever replica answers (registration time from the store)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        infos = list(pool.map(lambda _: c.get("/v1/models/a"), range(16)))
    assert len({r.headers["x-bitdelta-replica"] for r in infos}) >= 1
    assert len({r.json()["created"] for r in infos}) == 1, [r.json() for r in infos]


def test_registration_and_deletion_through_http_seen_by_both_replicas(env):
    c = env["c"]
    assert _register(c, "b", env["files"]["b"]).status_code == 201
    _on_every_replica(c, "b", lambda r: _check(r, env["expected"]["b"]))
    # replace b with c's weights: every replica serves the new version
    r = _register(c, "b", env["files"]["c"], replace=True)
    assert r.status_code == 201 and r.json()["labels"] == ["p", "q"]
    _on_every_replica(c, "b", lambda r: _check(r, env["expected"]["c"]))
    assert c.delete("/v1/models/b", headers=AUTH).status_code == 204

    def gone(r):
        assert r.status_code == 404 and "'b'" in r.json()["error"]["message"], r.text

    _on_every_replica(c, "b", gone)


def test_store_changes_from_elsewhere_seen_on_next_request(env):
    """No broadcast here: the store is changed directly (as a replica on another node would)."""
    c = env["c"]
    store = ArtifactStore(env["store"])
    store.put("c", env["files"]["c"].read_bytes())
    _on_every_replica(c, "c", lambda r: _check(r, env["expected"]["c"]))
    store.delete("c")

    def gone(r):
        assert r.status_code == 404, r.text

    _on_every_replica(c, "c", gone)
    assert [m["name"] for m in c.get("/v1/models").json()["models"]] == ["a"]


def test_corrupt_store_entry_is_not_served(env):
    """A stored artifact whose bytes no longer match its checksum is refused by every replica (404),
    and the other models are still served."""
    c = env["c"]
    store = ArtifactStore(env["store"])
    entry = store.put("d", env["files"]["b"].read_bytes())  # no request in between: nobody loaded it
    obj = env["store"] / "objects" / f"{entry.sha256}.safetensors"
    data = bytearray(obj.read_bytes())
    data[-1] ^= 0xFF
    obj.write_bytes(bytes(data))

    def refused(r):
        assert r.status_code == 404 and "'d'" in r.json()["error"]["message"], r.text

    _on_every_replica(c, "d", refused)
    _on_every_replica(c, "a", lambda r: _check(r, env["expected"]["a"]))
    assert c.get("/healthz").status_code == 200
    store.delete("d")
