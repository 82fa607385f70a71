"""A small HTTP client for a running service (used by ``bitdelta register/models`` and the demo)."""

from __future__ import annotations

import os
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


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class Client:
    def __init__(self, url: str, *, token: str | None = None, admin_token: str | None = None, timeout: float = 120.0):
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get(ENV_PREFIX + "CLASSIFY_TOKEN")
        self.admin_token = admin_token if admin_token is not None else os.environ.get(ENV_PREFIX + "ADMIN_TOKEN")
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

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

    def models(self) -> list[dict[str, Any]]:
        r = self._http.get("/v1/models", headers=_headers(self.token))
        _raise(r)
        return r.json()["models"]

    def classify(self, model: str, inputs: list, **kw) -> list[dict[str, Any]]:
        r = self._http.post("/v1/classify", json={"model": model, "inputs": inputs, **kw}, headers=_headers(self.token))
        _raise(r)
        return r.json()["predictions"]

    def health(self) -> dict[str, Any]:
        r = self._http.get("/healthz")
        _raise(r)
        return r.json()


__all__ = ["Client", "ServiceError"]
