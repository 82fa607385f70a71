"""Multi-tenant access over real HTTP: scoped API keys, revocation and expiry on every replica,
per-key rate limits, the audit trail, the key/audit CLI, and bad input on the new endpoints.

One local service (two replicas, tiny BERT base, real short fine-tunes; reachable through Serve's
proxy and, with direct ingress, on each replica's own port) for the module. It starts in open mode
(no classify token, no key), which the first key closes: the first test checks that, and the
``env`` fixture gives every other test the module's models and two tenant keys (made by whichever
test needs them first), so each test also runs alone.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from serve import cli
from bitdelta_core.compress import compress
from serve import run
from serve.config import ServeConfig
from serve_helpers import ADMIN, AUTH, client, finetune, free_port, save_base, texts

pytestmark = pytest.mark.slow

REPLICAS = 2
INPUTS = texts(2, seed=11)
TOKENS: list[str] = []  # every key token handed out in this module: none may reach the audit trail


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_access")
    base = save_base(root / "base")
    files = {}
    for i, labels in enumerate((["neg", "pos"], ["x", "y", "z"])):
        files[i] = root / f"d{i}.safetensors"
        compress(base, finetune(base, root / f"ft{i}", labels, seed=60 + i), progress=False).save(files[i])
    store = root / "store"
    cfg = ServeConfig(base=str(base), store=str(store), admin_token=ADMIN, port=free_port(), num_replicas=REPLICAS,
                      replica_num_cpus=0.25, max_wait_ms=2, max_inputs=16)
    # Serve's direct ingress as well as its proxy (docs/service.md "Served path"): each replica
    # also listens on a port of its own, which the flood test uses to measure without the proxy.
    # Ray's processes read it when Ray starts here (not when Ray already runs: then no replica ports).
    di_port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        for kind, base_port in (("HTTP", di_port), ("GRPC", free_port())):
            mp.setenv(f"RAY_SERVE_DIRECT_INGRESS_MIN_{kind}_PORT", str(base_port))
            mp.setenv(f"RAY_SERVE_DIRECT_INGRESS_MAX_{kind}_PORT", str(base_port + 2 * REPLICAS))
        mp.setenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1")
        mp.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")  # else run.stop() waits 30 s
        url = run.start(cfg, ray_num_cpus=2, wait_s=240)
    with client(url) as c:
        yield {"c": c, "url": url, "files": files, "store": store,
               "direct": _replica_ports(range(di_port, di_port + 2 * REPLICAS + 1))}
    run.stop()


MODELS = (("acme-a", 0), ("acme-b", 1), ("bob-a", 1))


def _ensure_models(svc) -> None:
    """Register the module's models once."""
    if not svc.get("models_ready"):
        for name, i in MODELS:
            assert _register(svc["c"], name, svc["files"][i]).status_code == 201
        svc["models_ready"] = True


def _ensure_keys(svc) -> None:
    """Create the two tenant keys once (this ends open mode)."""
    if "key_a" not in svc:
        svc["key_a"] = _create_key(svc["c"], name="tenant-a", scopes=["acme-*"])
        svc["key_b"] = _create_key(svc["c"], name="tenant-b", scopes=["bob-*"])


@pytest.fixture
def env(service):
    """The service with the module's models registered and the tenant keys created."""
    _ensure_models(service)
    _ensure_keys(service)
    return service


def _replica_ports(ports) -> list[str]:
    """The direct-ingress URL of every replica (one per replica), or [] when it is off."""
    found = {}
    for port in ports:
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
        except httpx.HTTPError:
            continue
        if r.status_code == 200 and "x-bitdelta-replica" in r.headers:
            found.setdefault(r.headers["x-bitdelta-replica"], f"http://127.0.0.1:{port}")
    return sorted(found.values()) if len(found) == REPLICAS else []


def _bearer(token):
    return {"Authorization": f"Bearer {token}"}


def _register(c, name, path, headers=AUTH, replace=False):
    return c.post("/v1/models", data={"name": name, "replace": str(replace).lower()},
                  files={"file": ("d.safetensors", path.read_bytes())}, headers=headers)


def _create_key(c, **body):
    r = c.post("/v1/keys", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    k = r.json()
    TOKENS.append(k["token"])
    return k


def _classify(c, model, token, inputs=INPUTS):
    return c.post("/v1/classify", json={"model": model, "inputs": inputs}, headers=_bearer(token))


def _answer(r):
    """What a caller can observe of an answer, but the per-request replica id."""
    headers = {k: v for k, v in r.headers.items() if k not in ("date", "x-bitdelta-replica", "x-request-id")}
    return r.status_code, r.content, sorted(headers.items()), "x-bitdelta-replica" in r.headers


def _fanout(fn, n, workers=4):
    with cf.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda _: fn(), range(n)))


# =============================================================================================
def test_open_mode_until_the_first_key(service):
    env, c = service, service["c"]
    if "key_a" in env:  # file order runs this test first
        pytest.skip("an earlier test of this run created the first key: open mode has ended")
    _ensure_models(env)
    r = c.post("/v1/classify", json={"model": "acme-a", "inputs": INPUTS})  # no credential: open
    assert r.status_code == 200, r.text
    assert [m["name"] for m in c.get("/v1/models").json()["models"]] == ["acme-a", "acme-b", "bob-a"]
    _ensure_keys(env)
    r = c.post("/v1/classify", json={"model": "acme-a", "inputs": INPUTS})
    assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"
    assert c.get("/v1/models").status_code == 401
    # /metrics names every model in its labels: admin only once keys exist
    for h in ({}, _bearer(env["key_a"]["token"])):
        assert c.get("/metrics", headers=h).status_code == 401
    assert 'model="acme-a"' in c.get("/metrics?scope=all", headers=AUTH).text
    assert c.get("/healthz").status_code == 200  # probes stay open
    # the admin token reads everything
    assert [m["name"] for m in c.get("/v1/models", headers=AUTH).json()["models"]] == ["acme-a", "acme-b", "bob-a"]
    assert c.post("/v1/classify", json={"model": "bob-a", "inputs": INPUTS}, headers=AUTH).status_code == 200


def test_key_cannot_see_or_infer_other_tenants_models(env):
    c = env["c"]
    ta, tb = env["key_a"]["token"], env["key_b"]["token"]
    # key A's own models work and equal the admin's answers
    r = _classify(c, "acme-a", ta)
    assert r.status_code == 200
    ref = c.post("/v1/classify", json={"model": "acme-a", "inputs": INPUTS}, headers=AUTH).json()["predictions"]
    assert r.json()["predictions"] == ref
    assert [m["name"] for m in c.get("/v1/models", headers=_bearer(ta)).json()["models"]] == ["acme-a", "acme-b"]
    assert [m["name"] for m in c.get("/v1/models", headers=_bearer(tb)).json()["models"]] == ["bob-a"]

    # what key A observes for 'bob-z' before it exists (truly unknown) ...
    def observe():
        listing = c.get("/v1/models", headers=_bearer(ta))
        for m in listing.json()["models"]:
            m.pop("created")  # each replica stamps its own load time
        return {"classify": _answer(_classify(c, "bob-z", ta)),
                "get": _answer(c.get("/v1/models/bob-z", headers=_bearer(ta))),
                "list": (listing.status_code, listing.json(), _answer(listing)[2])}

    before = observe()
    assert before["classify"][0] == 404 and before["get"][0] == 404
    assert json.loads(before["classify"][1]) == {"error": {"type": "unknown_model",
                                                           "message": "model 'bob-z' is not registered"}}
    # ... is byte for byte what it observes once tenant B's 'bob-z' exists
    assert _register(c, "bob-z", env["files"][0]).status_code == 201
    assert _classify(c, "bob-z", tb).status_code == 200
    after = observe()
    assert after == before
    # and an existing model of B answers like a name that never existed (the name aside)
    hidden, unknown = _classify(c, "bob-a", ta), _classify(c, "bob-q", ta)
    assert hidden.status_code == unknown.status_code == 404
    assert hidden.content.replace(b"bob-a", b"bob-q") == unknown.content
    assert _answer(hidden)[2:] == _answer(unknown)[2:]

    # latency of a hidden vs an unknown model (printed, not asserted: the box is shared)
    lat = {"hidden": [], "unknown": []}
    for _ in range(15):
        for kind, model in (("hidden", "bob-a"), ("unknown", "bob-q")):
            t0 = time.perf_counter()
            assert _classify(c, model, ta).status_code == 404
            lat[kind].append(time.perf_counter() - t0)
    print(f"\n404 latency median: hidden {statistics.median(lat['hidden']) * 1e3:.2f} ms, "
          f"unknown {statistics.median(lat['unknown']) * 1e3:.2f} ms (15 each, interleaved)")


def test_revoked_and_expired_keys_get_401_on_every_replica(env):
    c = env["c"]
    k = _create_key(c, name="short-lived", scopes=["acme-*"])
    e = _create_key(c, name="expiring", scopes=["acme-*"], expires_in_s=4)
    for key in (k, e):  # both work on both replicas first
        seen = set()
        for r in _fanout(lambda: _classify(c, "acme-a", key["token"]), 24):
            assert r.status_code == 200, r.text
            seen.add(r.headers["x-bitdelta-replica"])
        assert len(seen) == REPLICAS, seen
    r = c.delete(f"/v1/keys/{k['id']}", headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] == "revoked" and "token" not in r.json()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _classify(c, "acme-a", e["token"]).status_code == 200:
        time.sleep(0.25)
    for token in (k["token"], e["token"]):
        answers = _fanout(lambda: _classify(c, "acme-a", token), 24) + \
            _fanout(lambda: c.get("/v1/models", headers=_bearer(token)), 8) + \
            _fanout(lambda: c.get("/v1/models/acme-a", headers=_bearer(token)), 8)
        for r in answers:
            assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized", r.text
        # every replica answers for itself (each is its own ingress) and each refused the key
        assert len({r.headers["x-bitdelta-replica"] for r in answers}) == REPLICAS
    statuses = {x["id"]: x["status"] for x in c.get("/v1/keys", headers=AUTH).json()["keys"]}
    assert statuses[k["id"]] == "revoked" and statuses[e["id"]] == "expired"
    assert statuses[env["key_a"]["id"]] == "active"


def _p99(xs):
    return sorted(xs)[max(0, int(round(0.99 * len(xs))) - 1)]


def test_flood_from_one_key_is_throttled_other_key_unaffected(env, tmp_path):
    """A key flooding the service gets 429 beyond its limit while another key keeps being served.

    The calm key's latency is sampled with no flood, during a flood from the rate-limited key,
    and (the baseline) during the same flood from a key without a limit; the figures are printed,
    not asserted (the box is shared). The flood comes from other processes, as other tenants'
    clients would, so the calm key's timings are not this process's threads fighting for the GIL.

    All of it twice: through Serve's proxy, and (when direct ingress is on) straight to the
    replicas' own ports, one flood process per replica and the calm client alternating between
    them: without the proxy's CPU per request, the figures show what the replicas themselves
    spend on a flood."""
    c = env["c"]
    rate, burst, n_calm = 4.0, 4.0, 250  # 250 samples: a p99 that is not one outlier
    limited = _create_key(c, name="flooder", scopes=["acme-*"], rate_limit={"requests_per_s": rate,
                                                                            "requests_burst": burst})
    unlimited = _create_key(c, name="flooder-unlimited", scopes=["acme-*"])
    calm = _create_key(c, name="calm", scopes=["acme-*"])

    def calm_latencies(clients, n):
        out = []
        for i in range(n):
            t0 = time.perf_counter()
            r = _classify(clients[i % len(clients)], "acme-b", calm["token"])
            out.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
        return out

    def flood(urls, clients, token, tag, per_s=0.0):
        """One client process per URL (two through the proxy; ``flood_client.py``, a raw keep-alive
        socket whose own CPU per request is tiny, as a remote sender's is to this machine), as fast
        as each is answered (``per_s`` 0) or at a fixed pace of ``per_s`` requests a second each
        (an open loop: a sender whose rate does not depend on how fast it is answered), until the
        calm samples are taken (bounded)."""
        stop_file = tmp_path / ("stop-" + "".join(ch if ch.isalnum() else "-" for ch in tag))
        body = json.dumps({"model": "acme-a", "inputs": INPUTS})
        script = str(Path(__file__).with_name("flood_client.py"))
        t0 = time.monotonic()
        procs = [subprocess.Popen([sys.executable, script, u, token, str(stop_file), str(per_s), body],
                                  stdout=subprocess.PIPE, text=True) for u in urls]
        time.sleep(1.0)  # let the flood start
        lat = calm_latencies(clients, n_calm)
        stop_file.touch()
        codes, retry, cpu = [], [], 0.0
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0
            res = json.loads(out)
            codes, retry, cpu = codes + res["codes"], retry + res["retry"], cpu + res["cpu_s"]
            assert res["skipped"] <= len(res["codes"]) // 10, res["skipped"]  # the pace was kept
        return lat, codes, retry, cpu, time.monotonic() - t0

    def measure(path, urls, clients, per_s=0.0):
        calm_latencies(clients, 5)  # warm
        quiet = calm_latencies(clients, n_calm)
        lat_l, codes, retry_after, cpu_l, elapsed = flood(urls, clients, limited["token"], f"limited-{path}", per_s)
        ok, refused = codes.count(200), codes.count(429)
        assert set(codes) <= {200, 429} and refused > 0
        assert set(retry_after) == {1}  # 1 token at 4/s: at most 0.25 s, rounded up to whole seconds
        # the buckets are per replica: at most REPLICAS x (burst + rate x elapsed) pass
        assert ok <= REPLICAS * (burst + rate * elapsed) + 1, (ok, elapsed)
        lat_u, codes_u, _, cpu_u, elapsed_u = flood(urls, clients, unlimited["token"], f"unlimited-{path}", per_s)
        assert set(codes_u) == {200}  # no limit, no 429

        def row(name, lat):
            return (f"  {name:<34} p50 {statistics.median(lat) * 1e3:6.1f} ms  p99 {_p99(lat) * 1e3:6.1f} ms  "
                    f"p99 / quiet p99 {_p99(lat) / _p99(quiet):5.2f}")

        print(f"\n[{path}] flood, rate-limited key: {len(codes)} requests in {elapsed:.1f} s, {ok} passed, "
              f"{refused} got 429 (limit {rate:g}/s burst {burst:g} per replica, {REPLICAS} replicas); "
              f"flood clients' own CPU {cpu_l:.1f} s")
        print(f"[{path}] flood, unlimited key (baseline): {len(codes_u)} requests in {elapsed_u:.1f} s, all passed; "
              f"flood clients' own CPU {cpu_u:.1f} s")
        print(f"[{path}] calm key, {n_calm} sequential requests each:")
        print(row("no flood", quiet))
        print(row("flood from the rate-limited key", lat_l))
        print(row("flood from an unlimited key", lat_u))

    measure("proxy", [env["url"]] * 2, [c])
    if not env["direct"]:
        print("\n[direct ingress] not measured: Ray was already running when the module started")
        return
    direct = [client(u) for u in env["direct"]]
    try:
        measure("direct ingress", env["direct"], direct)
        # fixed-rate floods, 25x and 75x the key's limit on each replica: what a sender far over
        # its limit costs the others (the closed loop above is as many refusals as two cores serve)
        for per_s in (100.0, 300.0):
            measure(f"direct ingress, open loop {per_s:g}/s per replica", env["direct"], direct, per_s=per_s)
    finally:
        for d in direct:
            d.close()


def test_over_limit_key_gets_401_once_revoked_and_the_input_limit_holds(env):
    """A key with an empty requests bucket is refused before its body is read; revoking it turns
    that 429 into the 401 every bad key gets, on every replica. The inputs bucket is checked
    with the body's input count."""
    c = env["c"]
    k = _create_key(c, name="over-limit", scopes=["acme-*"], rate_limit={"requests_per_s": 0.5, "requests_burst": 1})
    t0 = time.monotonic()
    codes = [r.status_code for r in _fanout(lambda: _classify(c, "acme-a", k["token"]), 16)]
    passed = REPLICAS * (1 + 0.5 * (time.monotonic() - t0)) + 1  # burst 1 + 0.5/s per replica (429s are held)
    assert set(codes) == {200, 429} and codes.count(200) <= passed, codes
    r = _classify(c, "acme-a", k["token"])
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limited" and r.headers["retry-after"] in ("1", "2")
    # listing shares the key's buckets (each replica's own: a few calls reach an empty one)
    assert 429 in [c.get("/v1/models", headers=_bearer(k["token"])).status_code for _ in range(2 * REPLICAS + 2)]
    # those refusals came from the early check (its classify refusals count under model "_unread")
    assert 'model="_unread"' in c.get("/metrics?scope=all", headers=AUTH).text
    assert c.delete(f"/v1/keys/{k['id']}", headers=AUTH).status_code == 200
    answers = _fanout(lambda: _classify(c, "acme-a", k["token"]), 16) + \
        _fanout(lambda: c.get("/v1/models/acme-a", headers=_bearer(k["token"])), 8)
    for r in answers:
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized", r.text
        assert r.headers["www-authenticate"] == "Bearer"
    assert len({r.headers["x-bitdelta-replica"] for r in answers}) == REPLICAS

    n = _create_key(c, name="input-limited", scopes=["acme-*"], rate_limit={"inputs_per_s": 0.5, "inputs_burst": 2})
    t0 = time.monotonic()
    codes = [_classify(c, "acme-a", n["token"]).status_code for _ in range(8)]  # 2 inputs each
    assert set(codes) == {200, 429} and codes.count(200) <= REPLICAS * (1 + (time.monotonic() - t0) / 4) + 1, codes
    r = _classify(c, "acme-a", n["token"], inputs=texts(3, seed=5))  # more than the burst: never passes
    assert r.status_code == 413 and r.json()["error"]["type"] == "too_many_inputs", r.text


def test_manage_key_registers_and_deletes_within_its_scopes_only(env):
    c = env["c"]
    m = _create_key(c, name="acme-ops", scopes=["acme-*"], manage=True)
    h = _bearer(m["token"])
    assert _register(c, "acme-m", env["files"][0], headers=h).status_code == 201
    assert _classify(c, "acme-m", env["key_a"]["token"]).status_code == 200
    for r in (_register(c, "bob-m", env["files"][0], headers=h), c.delete("/v1/models/bob-a", headers=h),
              _register(c, "acme-n", env["files"][0], headers=_bearer(env["key_a"]["token"]))):
        assert r.status_code == 403 and r.json()["error"]["type"] == "forbidden", r.text
    assert c.get("/v1/models/bob-a", headers=AUTH).status_code == 200
    assert c.post("/v1/keys", json={"name": "x", "scopes": ["*"]}, headers=h).status_code == 401
    assert c.delete("/v1/models/acme-m", headers=h).status_code == 204
    entries = c.get("/v1/audit", params={"actor": m["id"]}, headers=AUTH).json()["entries"]
    assert [(x["action"], x["model"], x["result"]) for x in entries] == [
        ("register", "acme-m", "ok"), ("register", "bob-m", "forbidden"), ("delete", "bob-a", "forbidden"),
        ("delete", "acme-m", "ok")]


def test_every_admin_action_is_audited_without_secrets(env, tmp_path, capsys):
    c = env["c"]
    since = c.get("/v1/audit", params={"limit": 1}, headers=AUTH).json()["entries"][-1]["time"]
    d0, d1 = env["files"][0].read_bytes(), env["files"][1].read_bytes()
    assert _register(c, "audit-m", env["files"][0]).status_code == 201
    assert _register(c, "audit-m", env["files"][0]).status_code == 409
    assert _register(c, "audit-m", env["files"][1], replace=True).status_code == 201
    assert c.delete("/v1/models/audit-m", headers=AUTH).status_code == 204
    assert c.delete("/v1/models/audit-m", headers=AUTH).status_code == 404
    # keys through the CLI (HTTP, like the other client commands)
    url = ["--url", env["url"], "--token", ADMIN, "--json"]
    assert cli.main(["keys", "create", *url, "--name", "cli-key", "--scope", "acme-*", "--scope", "shared",
                     "--requests-per-s", "3", "--expires-in-s", "3600"]) == 0
    created = json.loads(capsys.readouterr().out)
    TOKENS.append(created["token"])
    assert created["scopes"] == ["acme-*", "shared"] and created["rate_limit"]["requests_per_s"] == 3
    assert _classify(c, "acme-a", created["token"]).status_code == 200
    assert cli.main(["keys", "list", *url]) == 0
    listed = json.loads(capsys.readouterr().out)["keys"]
    assert created["id"] in [k["id"] for k in listed]
    assert all("token" not in k and "secret_sha256" not in k and "salt" not in k for k in listed)
    assert cli.main(["keys", "revoke", *url, created["id"]]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "revoked"
    assert _classify(c, "acme-a", created["token"]).status_code == 401
    assert cli.main(["keys", "revoke", "--url", env["url"], "--token", "wrong-token-123", created["id"]]) == 1
    assert "401" in capsys.readouterr().err
    assert cli.main(["audit", *url, "--since", since]) == 0
    got = [(e["actor"], e["action"], e["model"], e["sha256"], e["key_id"], e["result"])
           for e in json.loads(capsys.readouterr().out)["entries"]]
    sha0, sha1 = hashlib.sha256(d0).hexdigest(), hashlib.sha256(d1).hexdigest()
    assert len(got) == 8 and got[1:] == [  # got[0] is the entry at `since` itself
        ("admin", "register", "audit-m", sha0, None, "ok"),
        ("admin", "register", "audit-m", sha0, None, "model_exists"),
        ("admin", "replace", "audit-m", sha1, None, "ok"),
        ("admin", "delete", "audit-m", sha1, None, "ok"),
        ("admin", "delete", "audit-m", None, None, "unknown_model"),
        ("admin", "key_create", None, None, created["id"], "ok"),
        ("admin", "key_revoke", None, None, created["id"], "ok"),
    ]
    # every key made in this module was audited; no token, secret or admin token anywhere in the trail
    trail = c.get("/v1/audit", params={"limit": 10_000}, headers=AUTH)
    created_ids = {e["key_id"] for e in trail.json()["entries"] if e["action"] == "key_create"}
    assert {t.split("_")[1] for t in TOKENS} <= created_ids
    raw = (env["store"] / "access" / "audit.jsonl").read_text()
    assert raw.count("\n") == len(trail.json()["entries"])
    for blob in (raw, trail.text):
        assert ADMIN not in blob
        for t in TOKENS:
            assert t not in blob and t.split("_", 2)[2] not in blob
    keys_file = (env["store"] / "access" / "keys.json").read_text()
    assert all(t.split("_", 2)[2] not in keys_file for t in TOKENS)  # only digests are stored


BAD_CREATE = [
    ("not-json", b"{name: x"),
    ("array", b"[]"),
    ("null", b"null"),
    ("missing-scopes", {"name": "x"}),
    ("missing-name", {"scopes": ["a"]}),
    ("scopes-not-list", {"name": "x", "scopes": "acme-*"}),
    ("scope-wrong-type", {"name": "x", "scopes": [{"a": 1}]}),
    ("scope-bad-pattern", {"name": "x", "scopes": ["../etc"]}),
    ("scope-bracket", {"name": "x", "scopes": ["[a-z]*"]}),
    ("scope-huge", {"name": "x", "scopes": ["a" * 5000]}),
    ("name-huge", {"name": "n" * 5000, "scopes": ["a"]}),
    ("body-huge", {"name": "x", "scopes": ["a"] * 300_000}),
    ("name-type", {"name": ["x"], "scopes": ["a"]}),
    ("unknown-field", {"name": "x", "scopes": ["a"], "role": "admin"}),
    ("negative-rate", {"name": "x", "scopes": ["a"], "rate_limit": {"requests_per_s": -5}}),
    ("zero-burst", {"name": "x", "scopes": ["a"], "rate_limit": {"inputs_per_s": 1, "inputs_burst": 0}}),
    ("rate-string", {"name": "x", "scopes": ["a"], "rate_limit": {"requests_per_s": "fast"}}),
    ("rate-empty", {"name": "x", "scopes": ["a"], "rate_limit": {}}),
    ("past-expiry", {"name": "x", "scopes": ["a"], "expires_at": "2001-01-01T00:00:00Z"}),
    ("naive-expiry", {"name": "x", "scopes": ["a"], "expires_at": "2031-01-01T00:00:00"}),
    ("negative-ttl", {"name": "x", "scopes": ["a"], "expires_in_s": -1}),
    ("huge-ttl", {"name": "x", "scopes": ["a"], "expires_in_s": 1e12}),
    ("manage-int", {"name": "x", "scopes": ["a"], "manage": 1}),
]


def test_bad_input_on_the_new_endpoints_is_4xx_json(env):
    c = env["c"]
    n_keys = len(c.get("/v1/keys", headers=AUTH).json()["keys"])
    cases = []
    for case, body in BAD_CREATE:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        cases.append((case, c.post("/v1/keys", content=content, headers={**AUTH, "content-type": "application/json"})))
    for q in ({"limit": -1}, {"limit": 0}, {"limit": "ten"}, {"limit": 10**9}, {"action": "drop_table"},
              {"since": "yesterday"}, {"actor": "a" * 5000}, {"limit": 1.5}):
        cases.append((f"audit-{q}", c.get("/v1/audit", params=q, headers=AUTH)))
    for kid in ("0" * 12, "nope", "a" * 5000, "bdk_0123456789ab_x", "%00"):
        cases.append((f"revoke-{kid[:20]}", c.delete(f"/v1/keys/{kid}", headers=AUTH)))
    for method, path in (("POST", "/v1/keys"), ("GET", "/v1/keys"), ("GET", "/v1/audit"), ("DELETE", "/v1/keys/abc")):
        for h in ({}, _bearer("wrong-admin-token"), _bearer(env["key_a"]["token"])):
            cases.append((f"auth-{method}-{path}", c.request(method, path, json={"name": "x", "scopes": ["a"]}
                                                             if method == "POST" else None, headers=h)))
    cases.append(("put-keys", c.put("/v1/keys", json={}, headers=AUTH)))
    for case, r in cases:
        assert 400 <= r.status_code < 500, (case, r.status_code, r.text[:200])
        err = r.json()["error"]
        assert isinstance(err["type"], str) and isinstance(err["message"], str) and err["message"], case
        assert len(r.content) < 4096, case  # a huge input is not echoed back
    status = dict((case, r.status_code) for case, r in cases)
    assert status["body-huge"] == 413 and status["revoke-000000000000"] == 404 and status["auth-GET-/v1/keys"] == 401
    assert status["put-keys"] == 405 and status["not-json"] == 422 and status["negative-rate"] == 422
    assert len(c.get("/v1/keys", headers=AUTH).json()["keys"]) == n_keys  # nothing was created
