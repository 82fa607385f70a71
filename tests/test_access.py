"""API keys, rate limits and the audit log without Ray or HTTP (serve.access).

References are computed independently here: the stored digest is recomputed with hashlib, the
bucket levels by hand from the refill formula, the audit lines counted per writer process.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from serve.access import (AccessControl, AuditLog, InvalidKeySpec, KeyStore, RateLimit, RateLimited, RateLimiter,
                          RequestOverBurst, Unauthorized, UnknownKey, check_scopes, scope_matches)
from serve.access.errors import Forbidden
from serve.access.keys import TOKEN_PATTERN
from serve.access.schemas import KeyCreate

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "admin-token-for-tests"
CLASSIFY = "classify-token-for-tests"


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _files_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


# =============================================================================================
# scopes
# =============================================================================================
SCOPE_CASES = [
    (["sst2"], "sst2", True),
    (["sst2"], "sst2-v2", False),
    (["sst2"], "SST2", False),  # case-sensitive
    (["acme-*"], "acme-sentiment", True),
    (["acme-*"], "acme-", True),
    (["acme-*"], "acme", False),
    (["acme-*"], "bob-acme-x", False),
    (["acme-*"], "xacme-1", False),
    (["team-?-prod"], "team-a-prod", True),
    (["team-?-prod"], "team-ab-prod", False),
    (["*"], "anything.v1", True),
    (["a", "b*"], "bee", True),
    (["a", "b*"], "c", False),
    (["*.v2"], "x.v2", True),
    (["*.v2"], "x.v20", False),
]


@pytest.mark.parametrize("scopes,model,want", SCOPE_CASES,
                         ids=[f"{'+'.join(s)}~{m}" for s, m, _ in SCOPE_CASES])
def test_scope_matching(scopes, model, want):
    assert scope_matches(check_scopes(scopes), model) is want


@pytest.mark.parametrize("scopes", [[], "acme-*", [""], ["a/b"], ["../x"], [".hidden"], ["-x"], ["[ab]"], ["a b"],
                                    ["é"], ["a" * 65], [3], [None], ["x"] * 0 + [f"m{i}" for i in range(65)]],
                         ids=["empty", "string", "blank", "slash", "dotdot", "dot", "dash", "bracket", "space",
                              "unicode", "long", "int", "none", "too-many"])
def test_bad_scopes_are_refused(scopes):
    with pytest.raises(InvalidKeySpec) as ei:
        check_scopes(scopes)
    assert ei.value.status == 422


def test_duplicate_scopes_are_dropped_in_order():
    assert check_scopes(["b", "a*", "b"]) == ("b", "a*")


# =============================================================================================
# keys: hashing, authentication, expiry, revocation, persistence
# =============================================================================================
def test_secret_is_shown_once_and_only_its_salted_digest_is_stored(tmp_path):
    ks = KeyStore(tmp_path)
    rec, token = ks.create("acme prod", ["acme-*"])
    m = TOKEN_PATTERN.fullmatch(token)
    assert m and m.group(1) == rec.id
    secret = m.group(2)
    assert rec.secret_sha256 == hashlib.sha256(bytes.fromhex(rec.salt) + secret.encode()).hexdigest()
    stored = _files_bytes(tmp_path)
    assert secret.encode() not in stored and token.encode() not in stored
    assert rec.secret_sha256.encode() in stored  # the digest is what is kept
    pub = rec.public()
    assert "secret_sha256" not in pub and "salt" not in pub and secret not in json.dumps(pub)
    assert secret not in repr(rec) and rec.secret_sha256 not in repr(rec)
    # two keys with the same name get different ids, secrets and salts
    rec2, token2 = ks.create("acme prod", ["acme-*"])
    assert rec2.id != rec.id and token2 != token and rec2.salt != rec.salt


def test_authenticate(tmp_path):
    ks = KeyStore(tmp_path)
    a, ta = ks.create("a", ["a-*"])
    b, tb = ks.create("b", ["b-*"])
    assert ks.authenticate(ta).id == a.id and ks.authenticate(tb).id == b.id
    sa = TOKEN_PATTERN.fullmatch(ta).group(2)
    flipped = ("A" if sa[0] != "A" else "B") + sa[1:]
    bad = [
        f"bdk_{a.id}_{flipped}",  # wrong secret, same length
        f"bdk_{b.id}_{sa}",  # a's secret under b's id
        f"bdk_{'0' * 12}_{sa}",  # unknown id
        ta[:-1], ta + "x", ta.upper(), "", "bdk_", "not-a-key", ta.replace("bdk_", "bdx_"),
    ]
    for t in bad:
        with pytest.raises(Unauthorized) as ei:
            ks.authenticate(t)
        assert ei.value.status == 401 and ei.value.headers == {"WWW-Authenticate": "Bearer"}
    msgs = set()
    for t in bad:
        try:
            ks.authenticate(t)
        except Unauthorized as e:
            msgs.add(e.message)
    assert len(msgs) == 1  # one answer for every failure


def test_expiry_uses_the_wall_clock(tmp_path):
    wall = Clock(1_700_000_000.0)
    ks = KeyStore(tmp_path, wall=wall)
    rec, tok = ks.create("tmp", ["x"], expires_at=wall.t + 60)
    assert ks.authenticate(tok).id == rec.id
    wall.t += 59.999
    assert ks.authenticate(tok).id == rec.id
    assert rec.public(wall.t)["status"] == "active"
    wall.t += 0.001  # exactly at expires_at: refused
    with pytest.raises(Unauthorized):
        ks.authenticate(tok)
    assert ks.get(rec.id).public(wall.t)["status"] == "expired"
    with pytest.raises(InvalidKeySpec, match="not in the future"):
        ks.create("late", ["x"], expires_at=wall.t - 1)


def test_revocation_is_seen_by_another_store_instance_at_its_next_call(tmp_path):
    replica1, replica2 = KeyStore(tmp_path), KeyStore(tmp_path)
    rec, tok = replica1.create("k", ["m"])
    assert replica2.authenticate(tok).id == rec.id  # created through replica 1, seen by replica 2
    v = replica2.version()
    revoked, changed = replica1.revoke(rec.id)
    assert changed and revoked.revoked_at is not None
    assert replica2.version() != v
    with pytest.raises(Unauthorized):
        replica2.authenticate(tok)
    assert replica2.get(rec.id).public()["status"] == "revoked"
    # a second revocation is a no-op that says so; an unknown id is 404
    again, changed = replica2.revoke(rec.id)
    assert not changed and again.revoked_at == revoked.revoked_at
    for bad in ("0" * 12, "nope", "../keys"):
        with pytest.raises(UnknownKey) as ei:
            replica2.revoke(bad)
        assert ei.value.status == 404


def test_a_change_the_stat_cannot_show_is_still_seen(tmp_path, monkeypatch):
    """Two writes within the filesystem's timestamp granularity may leave the same inode, size and
    times: a recently changed file is re-read rather than trusted to its stat."""
    writer, reader = KeyStore(tmp_path), KeyStore(tmp_path)
    rec, tok = writer.create("k", ["m"])
    assert reader.authenticate(tok).id == rec.id
    frozen = reader.version()
    monkeypatch.setattr(KeyStore, "version", lambda self: frozen)
    writer.revoke(rec.id)
    with pytest.raises(Unauthorized):
        reader.authenticate(tok)


def test_revocation_from_another_process(tmp_path):
    ks = KeyStore(tmp_path)
    rec, tok = ks.create("k", ["m"])
    assert ks.authenticate(tok).id == rec.id
    code = f"from serve.access import KeyStore; KeyStore({str(tmp_path)!r}).revoke({rec.id!r})"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    with pytest.raises(Unauthorized):
        ks.authenticate(tok)


def test_restart_reads_keys_and_audit_back(tmp_path):
    ac = AccessControl(tmp_path, admin_token=ADMIN)
    a, ta = ac.keys.create("a", ["a-*", "shared"], rate_limit=RateLimit(requests_per_s=5, inputs_per_s=50,
                                                                     inputs_burst=100), manage=True)
    b, tb = ac.keys.create("b", ["b-*"], expires_at=2_000_000_000.0)
    ac.keys.revoke(b.id)
    ac.audit("admin", "key_create", key_id=a.id)
    ac.audit("admin", "key_revoke", key_id=b.id)
    del ac
    ac2 = AccessControl(tmp_path, admin_token=ADMIN)  # a restarted service
    got = {r.id: r for r in ac2.keys.list()}
    assert got[a.id] == a and got[b.id].revoked_at is not None and got[b.id].expires_at == 2_000_000_000.0
    assert got[a.id].rate_limit == RateLimit(requests_per_s=5.0, requests_burst=5.0, inputs_per_s=50.0, inputs_burst=100.0)
    assert ac2.principal(f"Bearer {ta}").key.id == a.id
    with pytest.raises(Unauthorized):
        ac2.principal(f"Bearer {tb}")
    assert [(e["action"], e["key_id"]) for e in ac2.audit_log.read()] == [("key_create", a.id), ("key_revoke", b.id)]


def test_unreadable_keys_file_is_a_typed_error(tmp_path):
    ks = KeyStore(tmp_path)
    ks.create("k", ["m"])
    (tmp_path / "access" / "keys.json").write_text('{"format_version": 99, "keys": []}')
    from serve.access import AccessStoreError

    with pytest.raises(AccessStoreError, match="format_version 99"):
        KeyStore(tmp_path)


# =============================================================================================
# rate limits
# =============================================================================================
def test_request_bucket_refill_maths():
    clock = Clock()
    rl = RateLimiter(clock=clock)
    lim = RateLimit(requests_per_s=2, requests_burst=3)
    for _ in range(3):  # a new bucket starts full: the burst passes at once
        rl.check("k", lim)
    with pytest.raises(RateLimited) as ei:
        rl.check("k", lim)
    assert ei.value.retry_after_s == pytest.approx(0.5) and ei.value.status == 429
    assert ei.value.headers == {"Retry-After": "1"}  # whole seconds, rounded up
    clock.t += 0.25  # half a token: still refused, 0.25 s to go
    with pytest.raises(RateLimited) as ei:
        rl.check("k", lim)
    assert ei.value.retry_after_s == pytest.approx(0.25)
    clock.t += 0.25
    rl.check("k", lim)  # one token refilled, taken
    with pytest.raises(RateLimited):
        rl.check("k", lim)
    clock.t += 100.0  # a long pause refills to the burst, not beyond
    for _ in range(3):
        rl.check("k", lim)
    with pytest.raises(RateLimited):
        rl.check("k", lim)
    rl.check("other", lim)  # buckets are per key


def test_inputs_bucket_and_atomic_refusal():
    clock = Clock()
    rl = RateLimiter(clock=clock)
    lim = RateLimit(requests_per_s=10, requests_burst=2, inputs_per_s=5, inputs_burst=10)
    rl.check("k", lim, inputs=8)  # requests 2 -> 1, inputs 10 -> 2
    with pytest.raises(RateLimited) as ei:
        rl.check("k", lim, inputs=3)  # needs 1 more input token: 1/5 s
    assert ei.value.retry_after_s == pytest.approx(0.2)
    rl.check("k", lim, inputs=2)  # the refused request took nothing: 1 request token and 2 inputs remain
    with pytest.raises(RateLimited) as ei:
        rl.check("k", lim, inputs=1)  # both empty now: the longer wait wins (inputs 1/5 s vs requests 1/10 s)
    assert ei.value.retry_after_s == pytest.approx(0.2)
    with pytest.raises(RequestOverBurst) as ei:
        rl.check("k", lim, inputs=11)  # can never pass: 413, not 429
    assert ei.value.status == 413 and "10" in ei.value.message


def test_changed_limit_rebuilds_the_bucket_and_none_is_unlimited():
    clock = Clock()
    rl = RateLimiter(clock=clock)
    rl.check("k", RateLimit(requests_per_s=1))
    with pytest.raises(RateLimited):
        rl.check("k", RateLimit(requests_per_s=1))
    rl.check("k", RateLimit(requests_per_s=1, requests_burst=5))  # new limit: a new, full bucket
    for _ in range(1000):
        rl.check("k", None)


@pytest.mark.parametrize("kw", [dict(), dict(requests_per_s=0), dict(requests_per_s=-1), dict(inputs_per_s=float("nan")),
                                dict(requests_per_s=float("inf")), dict(requests_per_s=1, requests_burst=0.5),
                                dict(requests_burst=3), dict(requests_per_s="5"), dict(requests_per_s=True),
                                dict(inputs_per_s=2e6)],
                         ids=["empty", "zero", "negative", "nan", "inf", "burst<1", "burst-only", "string", "bool", "huge"])
def test_bad_rate_limits_are_refused(kw):
    with pytest.raises(InvalidKeySpec):
        RateLimit(**kw)


# =============================================================================================
# audit log
# =============================================================================================
def test_concurrent_appends_from_processes_never_tear(tmp_path):
    n_proc, n_lines = 4, 150
    code = textwrap.dedent(f"""
        import sys
        from serve.access import AuditLog
        log = AuditLog({str(tmp_path)!r})
        p = int(sys.argv[1])
        for i in range({n_lines}):
            log.append(actor="admin", action="register", model=f"p{{p}}-m{{i}}", sha256=f"{{p:064x}}", result="ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(p)], env=env) for p in range(n_proc)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    raw = (tmp_path / "access" / "audit.jsonl").read_bytes().splitlines()
    assert len(raw) == n_proc * n_lines
    entries = [json.loads(line) for line in raw]  # every line is one whole JSON object
    for p in range(n_proc):
        mine = [e["model"] for e in entries if e["sha256"] == f"{p:064x}"]
        assert mine == [f"p{p}-m{i}" for i in range(n_lines)]  # each writer's lines, complete and in order
    assert len(AuditLog(tmp_path).read(limit=10_000)) == n_proc * n_lines


def test_audit_filters_limit_and_torn_lines(tmp_path):
    log = AuditLog(tmp_path)
    log.append(actor="admin", action="register", model="a", sha256="a" * 64, time="2026-01-01T00:00:00.000+00:00")
    log.append(actor="admin", action="replace", model="a", sha256="b" * 64, time="2026-01-02T00:00:00.000+00:00")
    log.append(actor="0123456789ab", action="delete", model="a", sha256="b" * 64, result="unknown_model",
               time="2026-01-03T00:00:00.000+00:00")
    with open(log.path, "ab") as f:
        f.write(b'{"time": "2026-01-04", "act')  # a line cut short by a crash
    log.append(actor="admin", action="key_create", key_id="0123456789ab", time="2026-01-05T00:00:00.000+00:00")
    assert [e["action"] for e in log.read()] == ["register", "replace", "delete", "key_create"]
    assert [e["action"] for e in log.read(limit=2)] == ["delete", "key_create"]  # the newest, oldest first
    assert [e["action"] for e in log.read(model="a", actor="admin")] == ["register", "replace"]
    assert [e["action"] for e in log.read(action="delete")] == ["delete"]
    assert log.read(action="delete")[0]["result"] == "unknown_model"
    assert [e["action"] for e in log.read(since="2026-01-02T12:00:00Z")] == ["delete", "key_create"]
    assert [e["action"] for e in log.read(key_id="0123456789ab")] == ["key_create"]
    for bad in (dict(limit=0), dict(limit=10_001), dict(limit="5"), dict(action="drop"), dict(since="yesterday")):
        with pytest.raises(InvalidKeySpec):
            log.read(**bad)


@pytest.mark.parametrize("field,value", [("actor", "Bearer admin-token-for-tests"), ("actor", "bdk_0123456789ab_x"),
                                         ("model", "a b"), ("model", "x" * 65), ("sha256", "xyz"),
                                         ("key_id", "bdk_0123456789ab_secret"), ("result", "Bearer abc"),
                                         ("action", "key_leak")])
def test_audit_refuses_anything_but_ids_names_and_digests(tmp_path, field, value):
    kw = {"actor": "admin", "action": "register", "model": "m", **{field: value}}
    with pytest.raises(ValueError):
        AuditLog(tmp_path).append(**kw)
    assert not (tmp_path / "access" / "audit.jsonl").exists() or (tmp_path / "access" / "audit.jsonl").read_bytes() == b""


# =============================================================================================
# access control: who may do what
# =============================================================================================
def test_open_mode_until_the_first_key_even_after_revoking_it(tmp_path):
    ac = AccessControl(tmp_path, admin_token=ADMIN)
    assert ac.principal(None).kind == "open"
    assert ac.principal("Bearer something-unknown").kind == "open"  # an open service ignores it
    assert ac.principal(f"Bearer {ADMIN}").kind == "admin"
    rec, tok = ac.keys.create("k", ["m"])
    for header in (None, "", "Bearer something-unknown", "Basic abc"):
        with pytest.raises(Unauthorized):
            ac.principal(header)
    assert ac.principal(f"bearer {tok}").key.id == rec.id
    ac.keys.revoke(rec.id)
    with pytest.raises(Unauthorized):
        ac.principal(None)  # revoking the last key does not reopen the service


def test_classify_token_and_admin_token(tmp_path):
    ac = AccessControl(tmp_path, admin_token=ADMIN, classify_token=CLASSIFY)
    with pytest.raises(Unauthorized):
        ac.principal(None)
    p = ac.principal(f"Bearer {CLASSIFY}")
    assert p.kind == "classify" and p.sees("anything")
    assert ac.principal(f"Bearer {ADMIN}").kind == "admin"
    for bad in (f"Bearer {CLASSIFY}x", f"Bearer {CLASSIFY[:-1]}", CLASSIFY, f"Basic {CLASSIFY}"):
        with pytest.raises(Unauthorized):
            ac.principal(bad)
    with pytest.raises(Unauthorized):
        ac.admin(f"Bearer {CLASSIFY}")
    assert ac.admin(f"Bearer {ADMIN}").actor == "admin"
    with pytest.raises(Unauthorized, match="no admin token"):
        AccessControl(tmp_path).admin(f"Bearer {ADMIN}")


def test_key_principal_sees_only_its_scopes(tmp_path):
    ac = AccessControl(tmp_path, admin_token=ADMIN)
    rec, tok = ac.keys.create("acme", ["acme-*", "shared"])
    p = ac.principal(f"Bearer {tok}")
    assert p.actor == rec.id
    assert p.visible(["acme-a", "bob-a", "shared", "shared2", "acme-b"]) == ["acme-a", "shared", "acme-b"]
    with pytest.raises(Unauthorized):
        ac.admin(f"Bearer {tok}")  # keys never manage keys or read the audit trail


def test_manage_keys_act_within_their_scopes_only(tmp_path):
    ac = AccessControl(tmp_path, admin_token=ADMIN)
    reader, t_reader = ac.keys.create("reader", ["acme-*"])
    manager, t_manager = ac.keys.create("manager", ["acme-*"], manage=True)
    assert ac.manager(f"Bearer {t_manager}", "acme-x").actor == manager.id
    with pytest.raises(Forbidden):
        ac.manager(f"Bearer {t_manager}", "bob-x")
    with pytest.raises(Forbidden):
        ac.manager(f"Bearer {t_reader}", "acme-x")
    assert ac.manager(f"Bearer {ADMIN}", "bob-x").actor == "admin"
    with pytest.raises(Unauthorized):
        ac.manager("Bearer nope-nope-nope", "acme-x")


def test_rate_check_applies_to_keys_only(tmp_path):
    clock = Clock()
    ac = AccessControl(tmp_path, admin_token=ADMIN, clock=clock)
    rec, tok = ac.keys.create("k", ["*"], rate_limit=RateLimit(requests_per_s=1))
    p = ac.principal(f"Bearer {tok}")
    ac.check_rate(p)
    with pytest.raises(RateLimited):
        ac.check_rate(p)
    admin = ac.principal(f"Bearer {ADMIN}")
    for _ in range(100):
        ac.check_rate(admin)


# =============================================================================================
# the HTTP request model
# =============================================================================================
GOOD = {"name": "acme", "scopes": ["acme-*"]}
BAD_CREATE = [
    ("missing-name", {"scopes": ["a"]}),
    ("missing-scopes", {"name": "a"}),
    ("empty-scopes", {"name": "a", "scopes": []}),
    ("scopes-string", {"name": "a", "scopes": "a*"}),
    ("scope-int", {"name": "a", "scopes": [1]}),
    ("scope-slash", {"name": "a", "scopes": ["a/b"]}),
    ("scope-huge", {"name": "a", "scopes": ["a" * 100_000]}),
    ("name-huge", {"name": "a" * 100_000, "scopes": ["a"]}),
    ("name-int", {"name": 5, "scopes": ["a"]}),
    ("name-newline", {"name": "a\nb", "scopes": ["a"]}),
    ("unknown-field", {**GOOD, "admin": True}),
    ("negative-rate", {**GOOD, "rate_limit": {"requests_per_s": -1}}),
    ("zero-rate", {**GOOD, "rate_limit": {"inputs_per_s": 0}}),
    ("string-rate", {**GOOD, "rate_limit": {"requests_per_s": "5"}}),
    ("bool-rate", {**GOOD, "rate_limit": {"requests_per_s": True}}),
    ("empty-rate", {**GOOD, "rate_limit": {}}),
    ("rate-unknown-field", {**GOOD, "rate_limit": {"requests_per_s": 1, "per": "minute"}}),
    ("burst-below-1", {**GOOD, "rate_limit": {"requests_per_s": 1, "requests_burst": 0.5}}),
    ("naive-expiry", {**GOOD, "expires_at": "2030-01-01T00:00:00"}),
    ("bad-expiry", {**GOOD, "expires_at": "tomorrow"}),
    ("both-expiries", {**GOOD, "expires_at": "2030-01-01T00:00:00Z", "expires_in_s": 5}),
    ("negative-ttl", {**GOOD, "expires_in_s": -5}),
    ("manage-string", {**GOOD, "manage": "yes"}),
]


@pytest.mark.parametrize("body", [b for _, b in BAD_CREATE], ids=[i for i, _ in BAD_CREATE])
def test_key_create_schema_refuses(body):
    with pytest.raises(ValidationError):
        KeyCreate.model_validate(body)


def test_key_create_schema_accepts_and_converts():
    k = KeyCreate.model_validate({**GOOD, "rate_limit": {"requests_per_s": 2, "inputs_per_s": 10.5},
                                  "expires_in_s": 60, "manage": True})
    assert k.rate_limit.to_limit() == RateLimit(requests_per_s=2.0, requests_burst=2.0, inputs_per_s=10.5,
                                                inputs_burst=10.5)
    assert k.expiry(now=100.0) == 160.0
    k2 = KeyCreate.model_validate({**GOOD, "expires_at": "2030-01-01T00:00:00+01:00"})
    assert k2.expiry() == 1893452400.0
