"""Bearer-token checks of the ingress without Ray: constant-time comparison, schemes, disabled admin."""

from __future__ import annotations

import hmac

import pytest
from pydantic import SecretStr
from starlette.requests import Request

from serve.http import _check_bearer
from serve.errors import ApiError

TOKEN = SecretStr("correct-horse-battery")


def _request(auth: str | None) -> Request:
    headers = [] if auth is None else [(b"authorization", auth.encode("latin-1"))]
    return Request({"type": "http", "method": "POST", "path": "/v1/models", "headers": headers})


@pytest.mark.parametrize("auth", [None, "", "Bearer", "Bearer ", "Bearer wrong", "Bearer correct-horse-batter",
                                  "Bearer correct-horse-battery-staple", "Basic correct-horse-battery",
                                  "correct-horse-battery", "Bearer\tcorrect-horse-batteryX"],
                         ids=["missing", "empty", "no-token", "blank", "wrong", "prefix", "longer", "basic", "no-scheme",
                              "tab"])
def test_wrong_or_missing_token_is_401(auth):
    with pytest.raises(ApiError) as ei:
        _check_bearer(_request(auth), TOKEN, "admin")
    assert ei.value.status == 401 and ei.value.type == "unauthorized"
    assert ei.value.headers == {"WWW-Authenticate": "Bearer"}
    assert TOKEN.get_secret_value() not in ei.value.message


@pytest.mark.parametrize("auth", ["Bearer correct-horse-battery", "bearer correct-horse-battery",
                                  "Bearer  correct-horse-battery "])
def test_right_token_passes(auth):
    _check_bearer(_request(auth), TOKEN, "admin")


def test_no_configured_token_disables_admin():
    with pytest.raises(ApiError, match="no admin token") as ei:
        _check_bearer(_request("Bearer anything-at-all"), None, "admin")
    assert ei.value.status == 401


def test_comparison_is_constant_time(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    for tok in ("x", "correct-horse-battery", "y" * 500):
        with pytest.raises(ApiError) if tok != "correct-horse-battery" else _nullcontext():
            _check_bearer(_request(f"Bearer {tok}"), TOKEN, "admin")
    # digests of equal length are compared, whatever the presented token's length
    assert calls == [(32, 32)] * 3


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
