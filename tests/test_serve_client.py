"""serve.client without a server: idempotent reads retry while a replica is unavailable, writes never."""

from __future__ import annotations

import httpx
import pytest

from serve.client import Client, ServiceError


def _client(answers: list, calls: list) -> Client:
    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((request.method, request.url.path))
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    return Client("http://127.0.0.1:1", transport=httpx.MockTransport(handler), retries=3, backoff_s=0.001)


def test_classify_retries_a_dying_replica_then_succeeds():
    calls = []
    ok = httpx.Response(200, json={"model": "m", "predictions": [{"label": "pos", "score": 0.9}]})
    c = _client([httpx.ConnectError("refused"), httpx.Response(500, text="Internal Server Error"),
                 httpx.Response(503, json={"error": {"type": "unavailable", "message": "no replica"}}), ok], calls)
    assert c.classify("m", ["x"]) == [{"label": "pos", "score": 0.9}]
    assert calls == [("POST", "/v1/classify")] * 4


def test_retries_are_bounded():
    calls = []
    c = _client([httpx.Response(502, text="bad gateway")] * 4, calls)
    with pytest.raises(ServiceError) as ei:
        c.models()
    assert ei.value.status == 502 and len(calls) == 4


@pytest.mark.parametrize("status", [400, 401, 404, 413, 422])
def test_client_errors_are_not_retried(status):
    calls = []
    c = _client([httpx.Response(status, json={"error": {"type": "x", "message": "no"}})], calls)
    with pytest.raises(ServiceError) as ei:
        c.classify("m", ["x"])
    assert ei.value.status == status and len(calls) == 1


def test_registration_is_never_retried():
    calls = []
    c = _client([httpx.Response(503, json={"error": {"type": "unavailable", "message": "down"}})], calls)
    with pytest.raises(ServiceError):
        c.register("m", b"data")
    assert calls == [("POST", "/v1/models")]
