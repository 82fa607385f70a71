"""The early 429 of a rate-limited API key (answered by the HTTP middleware before the body is
read) against the route's own 429, without Ray: the middleware runs over a stub app that plays
the route (it reads the body, then debits the buckets through ``AccessControl.check_rate`` and
answers through the service's real exception handler), with a stepped clock so both answers can
be compared byte for byte."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest

from serve import http
from serve.access import AccessControl, RateLimit, RateLimited, RateLimiter, Tarpit
from serve.metrics import Counter

ADMIN = "admin-token-for-tests"


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Service:
    """The middleware in front of a stand-in for the classify route (same order of checks)."""

    def __init__(self, tmp_path, monkeypatch, tarpit: Tarpit | None = None):
        self.clock = Clock()
        # no holds unless a test asks for them: the stepped clock does not move during a sleep
        self.access = AccessControl(tmp_path, admin_token=ADMIN, clock=self.clock, replica="r0",
                                    tarpit=tarpit or Tarpit(per_key=0))
        routes = http.Routes.__new__(http.Routes)
        routes.access = self.access
        routes.replica = SimpleNamespace(m_requests=Counter("requests", "", ["model", "code"]),
                                         m_http=Counter("http_requests", "", ["route", "code"]))
        self.routes = routes
        monkeypatch.setitem(http.settings(), "refuse_early", routes.refuse_early)
        monkeypatch.setitem(http.settings(), "replica", "r0")
        self.route_calls = 0
        self.middleware = http.BodyLimitMiddleware(self._route)

    async def _route(self, scope, receive, send):
        self.route_calls += 1
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        try:
            principal = self.access.principal(dict(scope["headers"]).get(b"authorization", b"").decode() or None)
            self.access.check_rate(principal, len(json.loads(body)["inputs"]))
            response = http.JSONResponse({"predictions": []})
        except RateLimited as e:
            response = await http._api_error(None, e)
        except http.ApiError as e:
            response = await http._api_error(None, e)
        await response(scope, receive, send)

    def request(self, token: str | None, n_inputs: int = 1, method: str = "POST", path: str = "/v1/classify"):
        """(status, headers, body, whether the body was read) of one request."""
        return asyncio.run(self.arequest(token, n_inputs, method, path))

    async def arequest(self, token: str | None, n_inputs: int = 1, method: str = "POST", path: str = "/v1/classify"):
        body = json.dumps({"model": "m", "inputs": ["x"] * n_inputs}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if token is not None:
            headers.append((b"authorization", f"Bearer {token}".encode()))
        scope = {"type": "http", "method": method, "path": path, "headers": headers}
        read = []
        sent = []

        async def receive():
            read.append(True)
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(msg):
            sent.append(msg)

        await self.middleware(scope, receive, send)
        start = next(m for m in sent if m["type"] == "http.response.start")
        out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return start["status"], sorted(start["headers"]), out, bool(read)


@pytest.fixture
def svc(tmp_path, monkeypatch):
    return Service(tmp_path, monkeypatch)


def test_early_429_is_byte_identical_to_the_routes_429(svc):
    rec, token = svc.access.keys.create("k", ["*"], rate_limit=RateLimit(requests_per_s=2, requests_burst=2))
    assert svc.request(token)[0] == 200 and svc.request(token)[0] == 200  # the burst
    calls = svc.route_calls
    early_check = http.settings().pop("refuse_early")
    try:
        in_route = svc.request(token)  # without the early check the route refuses (after reading the body)
    finally:
        http.settings()["refuse_early"] = early_check
    assert svc.route_calls == calls + 1 and in_route[3]
    early = svc.request(token)  # the middleware refuses: the body is never read, the route never runs
    assert svc.route_calls == calls + 1 and not early[3]
    assert early[:3] == in_route[:3]
    status, headers, body, _ = early
    assert status == 429 and (b"retry-after", b"1") in headers and (b"x-bitdelta-replica", b"r0") in headers
    assert json.loads(body) == {"error": {"type": "rate_limited", "message": "rate limit of this API key exceeded "
                                          "(2 requests/s, burst 2 per replica); retry after 0.500 s"}}
    # the refusal took nothing: half a second later one request passes, through the route
    svc.clock.t += 0.5
    assert svc.request(token)[0] == 200 and svc.route_calls == calls + 2
    assert svc.request(token)[0] == 429
    # the two early refusals are counted (the model is not known: the body was never read)
    assert [(d, v) for _, d, v in svc.routes.replica.m_requests.samples()] == [({"model": "_unread", "code": "429"}, 2.0)]
    assert [(d, v) for _, d, v in svc.routes.replica.m_http.samples()] == [({"route": "/v1/classify", "code": "429"}, 2.0)]


def test_early_check_skips_tokens_open_mode_and_get_routes_share_it(svc):
    # open mode and the admin token never reach a bucket
    assert svc.request(None)[0] == 200 and svc.request(ADMIN)[0] == 200
    rec, token = svc.access.keys.create("k", ["*"], rate_limit=RateLimit(requests_per_s=1, requests_burst=1))
    assert svc.request(token)[0] == 200
    for method, path in (("POST", "/v1/classify"), ("GET", "/v1/models"), ("GET", "/v1/models/m")):
        status, _, body, read = svc.request(token, method=method, path=path)
        assert status == 429 and not read and json.loads(body)["error"]["type"] == "rate_limited"
    for method, path in (("GET", "/v1/models/a/b"), ("POST", "/v1/models"), ("DELETE", "/v1/models/m"),
                         ("GET", "/v1/keys")):  # other routes answer as they always did (the stub: its own check)
        assert svc.request(token, method=method, path=path)[3]
    for _ in range(5):
        assert svc.request(ADMIN)[0] == 200


def test_revoked_or_wrong_key_over_its_limit_still_gets_401(svc):
    rec, token = svc.access.keys.create("k", ["*"], rate_limit=RateLimit(requests_per_s=1, requests_burst=1))
    assert svc.request(token)[0] == 200
    assert svc.request(token)[0] == 429
    wrong = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    for bad in (wrong, "bdk_000000000000_" + "A" * 43, "bdk_garbage"):
        status, headers, body, read = svc.request(bad)
        assert status == 401 and read and json.loads(body)["error"]["type"] == "unauthorized"
    svc.access.keys.revoke(rec.id)  # the limiter still holds the key's empty bucket
    status, headers, body, read = svc.request(token)
    assert status == 401 and read and (b"www-authenticate", b"Bearer") in headers
    assert svc.access.refusal(f"Bearer {token}") is None


def test_input_count_limit_is_still_checked_by_the_route(svc):
    rec, token = svc.access.keys.create("k", ["*"], rate_limit=RateLimit(inputs_per_s=2, inputs_burst=4))
    assert svc.request(token, n_inputs=3)[0] == 200  # 4 -> 1 input token left
    status, _, body, read = svc.request(token, n_inputs=2)  # the inputs bucket is the route's to check
    assert status == 429 and read and "retry after 0.500 s" in json.loads(body)["error"]["message"]
    assert svc.request(token, n_inputs=1)[0] == 200  # the route's refusal took nothing
    status, _, body, read = svc.request(token, n_inputs=1)
    assert status == 429 and read
    status, _, body, read = svc.request(token, n_inputs=5)  # over the burst: 413 before any 429, as always
    assert status == 413 and read and json.loads(body)["error"]["type"] == "too_many_inputs"
    # both buckets: an empty requests bucket refuses early, with the longer of the two waits
    rec, token = svc.access.keys.create("k2", ["*"], rate_limit=RateLimit(requests_per_s=4, requests_burst=1,
                                                                           inputs_per_s=1, inputs_burst=2))
    assert svc.request(token, n_inputs=2)[0] == 200  # requests 1 -> 0, inputs 2 -> 0
    status, headers, body, read = svc.request(token, n_inputs=1)
    assert status == 429 and not read and (b"retry-after", b"1") in headers
    assert json.loads(body)["error"]["message"].endswith("retry after 1.000 s")  # inputs: 1 s; requests: 0.25 s
    svc.clock.t += 0.25  # a request token, no input token: the route refuses
    status, _, body, read = svc.request(token, n_inputs=1)
    assert status == 429 and read and json.loads(body)["error"]["message"].endswith("retry after 0.750 s")


def test_peek_debits_nothing_and_matches_check():
    clock = Clock()
    rl = RateLimiter(clock=clock)
    lim = RateLimit(requests_per_s=4, requests_burst=2, inputs_per_s=10, inputs_burst=10)
    assert rl.peek("k", RateLimit(inputs_per_s=1)) is None  # no requests bucket: nothing to refuse early
    assert rl.peek("k", lim) is None  # no bucket yet: a new one starts full
    rl.check("k", lim, inputs=1)
    rl.check("k", lim, inputs=1)
    for _ in range(3):
        early = rl.peek("k", lim)
        assert early is not None and early.retry_after_s == pytest.approx(0.25)
    with pytest.raises(RateLimited) as ei:
        rl.check("k", lim, inputs=1)
    assert (ei.value.status, ei.value.message, ei.value.headers) == (early.status, early.message, early.headers)
    assert rl.peek("k", RateLimit(requests_per_s=4, requests_burst=3)) is None  # a changed limit: full again
    clock.t += 0.25
    assert rl.peek("k", lim) is None
    rl.check("k", lim)


def test_tarpit_counts_holds_per_key():
    t = Tarpit(max_hold_s=1.0, per_key=2)
    assert t.acquire("a", 0.25) == 0.25 and t.acquire("a", 5.0) == 1.0  # until the refill, at most max_hold_s
    assert t.acquire("a", 0.5) == 0.0 and t.held("a") == 2  # over per_key: answered at once
    assert t.acquire("b", 0.5) == 0.5  # another key has its own count
    assert t.acquire("c", 0.0) == 0.0 and t.held("c") == 0  # nothing to wait for: no hold
    t.release("a")
    assert t.held("a") == 1 and t.acquire("a", 0.3) == 0.3
    t.release("a"), t.release("a"), t.release("b")
    assert t.held("a") == 0 and t.held("b") == 0
    assert Tarpit(per_key=0).acquire("a", 1.0) == 0.0
    with pytest.raises(ValueError):
        Tarpit(max_hold_s=-1)


def test_tarpit_holds_a_refusal_until_the_bucket_refills_and_caps_holds_per_key(tmp_path, monkeypatch):
    """A key over its limit gets the same 429, later: held for the bucket's wait (capped); beyond
    ``per_key`` held answers the next one comes at once, so a key cannot pile up held requests."""
    svc = Service(tmp_path, monkeypatch, tarpit=Tarpit(max_hold_s=0.3, per_key=1))
    rec, token = svc.access.keys.create("k", ["*"], rate_limit=RateLimit(requests_per_s=0.5, requests_burst=1))
    assert svc.request(token)[0] == 200
    t0 = time.perf_counter()
    held = svc.request(token)  # bucket empty for 2 s: held for max_hold_s
    waited = time.perf_counter() - t0
    assert held[0] == 429 and not held[3] and 0.25 <= waited < 1.5, waited
    assert svc.access.tarpit.held(rec.id) == 0  # given back after the answer

    async def two_at_once():
        async def timed():
            t = time.perf_counter()
            r = await svc.arequest(token)
            return r, time.perf_counter() - t
        return await asyncio.gather(timed(), timed())

    (r1, d1), (r2, d2) = asyncio.run(two_at_once())
    assert r1[:3] == r2[:3] == held[:3]  # the same answer, held or not
    assert min(d1, d2) < 0.2 and max(d1, d2) >= 0.25, (d1, d2)
    assert svc.access.tarpit.held(rec.id) == 0
