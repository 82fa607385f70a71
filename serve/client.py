"""A small HTTP client for a running service (used by ``bitdelta register/models`` and the demo).

Reads (classify, list, health) are idempotent and are retried a few times, with backoff, when the
answer says a replica was unavailable rather than that the request was wrong: a connection error,
or a 500/502/503/504 — what Ray's proxy answers for a request in flight on a replica that dies,
while Serve starts a new one. Registrations and deletions are never retried blindly.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx

from .config import ENV_PREFIX


class ServiceError(RuntimeError):
    """The service answered with an error (``status``, ``type``, ``message``)."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(f"HTTP {status} {kind}: {message}")
        self.status, self.kind, self.message = status, kind, message


def _raise(r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    try:
        err = r.json()["error"]
        raise ServiceError(r.status_code, err.get("type", "?"), err.get("message", r.text))
    except (ValueError, KeyError, TypeError):
        raise ServiceError(r.status_code, "http_error", r.text[:500]) from None


RETRY_STATUSES = frozenset({500, 502, 503, 504})


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class Client:
    def __init__(self, url: str, *, token: str | None = None, admin_token: str | None = None, timeout: float = 120.0,
                 retries: int = 3, backoff_s: float = 0.5, transport: httpx.BaseTransport | None = None):
        self.url = url.rstrip("/")
        self.retries, self.backoff_s = retries, backoff_s
        self.token = token if token is not None else os.environ.get(ENV_PREFIX + "CLASSIFY_TOKEN")
        self.admin_token = admin_token if admin_token is not None else os.environ.get(ENV_PREFIX + "ADMIN_TOKEN")
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def register(self, name: str, file: str | os.PathLike | bytes, *, replace: bool = False) -> dict[str, Any]:
        data = file if isinstance(file, bytes) else Path(file).read_bytes()
        fname = "delta.safetensors" if isinstance(file, bytes) else Path(file).name
        r = self._http.post("/v1/models", data={"name": name, "replace": "true" if replace else "false"},
                            files={"file": (fname, data, "application/octet-stream")},
                            headers=_headers(self.admin_token))
        _raise(r)
        return r.json()

    def delete(self, name: str) -> None:
        _raise(self._http.delete(f"/v1/models/{name}", headers=_headers(self.admin_token)))

    def _read(self, method: str, path: str, **kw) -> httpx.Response:
        """An idempotent request, retried (bounded) while a replica is unavailable."""
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                r = self._http.request(method, path, **kw)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
                if last:
                    raise
            else:
                if r.status_code not in RETRY_STATUSES or last:
                    return r
            time.sleep(self.backoff_s * 2 ** attempt)
        raise AssertionError("unreachable")

    def models(self) -> list[dict[str, Any]]:
        r = self._read("GET", "/v1/models", headers=_headers(self.token))
        _raise(r)
        return r.json()["models"]

    def classify(self, model: str, inputs: list, **kw) -> list[dict[str, Any]]:
        r = self._read("POST", "/v1/classify", json={"model": model, "inputs": inputs, **kw},
                       headers=_headers(self.token))
        _raise(r)
        return r.json()["predictions"]

    def health(self) -> dict[str, Any]:
        r = self._read("GET", "/healthz")
        _raise(r)
        return r.json()


__all__ = ["Client", "ServiceError"]
